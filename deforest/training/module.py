"""The LightningModule: one classifier for multi-class and multi-label tiles, built from parts.

The module is built from the datamodule's :class:`~deforest.core.contract.InputSpec` and
stores it in every checkpoint (with the thresholds of the checkpoint's own weights), so
evaluation and prediction read what the model expects of its input from one place. It
receives raw band values (nodata already filled) and normalises them itself.

As TorchGeo's tasks, it builds its parts in ``configure_*`` hooks from grouped settings
(:mod:`deforest.training.settings`); DDP gathering, calibration and thresholds
(:mod:`~deforest.training.evaluation`), the non-finite-loss policy
(:mod:`~deforest.training.nonfinite`), checkpoint loading (:mod:`~deforest.training.loading`)
and the optimizer (:mod:`~deforest.training.optimization`) live in their own modules.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import IO, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from torch import Tensor

from deforest.core.contract import Calibration, InputSpec
from deforest.core.errors import unknown_setting
from deforest.core.vocabulary import MULTICLASS, MULTILABEL
from deforest.data.pairs import date_band_positions
from deforest.data.transforms import BandNormalizer, d4_views
from deforest.models.networks import BandStatistics, backbone_modules, build_backbone, build_siamese
from deforest.training.calibration import apply_calibration, probabilities
from deforest.training.evaluation import EpochEvaluator
from deforest.training.loading import load_classifier
from deforest.training.losses import Criterion, DynamicWeightedLoss
from deforest.training.nonfinite import NonFinitePolicy, training_files
from deforest.training.optimization import OptimizerFactory, SchedulerFactory, build_optimization
from deforest.training.settings import (
    GROUP_KEYS,
    EvaluationSettings,
    NetworkSettings,
    OptimizationSettings,
    grouped,
    plain,
    settings,
)
from deforest.training.thresholds import ThresholdTuner


class TileClassifier(pl.LightningModule):
    """A CNN over N-band tiles with a multi-class (softmax) or multi-label (sigmoid) head.

    Args:
        input_spec: the input contract (an :class:`InputSpec` or its ``to_dict()``): task,
            classes, bands, normalisation, tile size, the bands the network sees
            (``network.bands``; the band-statistics head always sees every band), the
            input pooling, the initial thresholds and the split.
        network: :class:`~deforest.training.settings.NetworkSettings` (or a mapping of its fields).
        loss: keyword arguments of :meth:`DynamicWeightedLoss.from_keys` (the ``loss`` config group).
        optimizer: ``optimizer(params)`` factory (a Hydra partial).
        scheduler: ``scheduler(optimizer, ...)`` factory; ``total_steps`` / ``T_max`` are
            filled in from the trainer when the scheduler takes them and the config does not.
        optimization: :class:`~deforest.training.settings.OptimizationSettings`: scheduler
            interval, linear probe, the backbone's learning-rate multiplier.
        evaluation: :class:`~deforest.training.settings.EvaluationSettings`: TTA, threshold
            tuning, probability correction.
        nonfinite_loss: ``error`` stops on a NaN/inf loss naming the batch; ``skip`` skips it
            (:class:`~deforest.training.nonfinite.NonFinitePolicy`).
        criterion: optional custom loss receiving the batch weights.
        channels_last: run the network in NHWC memory layout (faster convolutions on GPUs).
        compile: ``torch.compile`` the network: ``True`` or a dict of its keyword arguments.
            Never taken from a checkpoint (:mod:`deforest.training.loading`).
    """

    def __init__(
        self,
        input_spec: InputSpec | Mapping[str, Any],
        network: NetworkSettings | Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        optimization: OptimizationSettings | Mapping[str, Any] | None = None,
        evaluation: EvaluationSettings | Mapping[str, Any] | None = None,
        nonfinite_loss: str = "error",
        criterion: Criterion | None = None,
        channels_last: bool = False,
        compile: bool | Mapping[str, Any] = False,
    ) -> None:
        super().__init__()
        spec = input_spec if isinstance(input_spec, InputSpec) else InputSpec.from_dict(input_spec)
        if spec.task not in (MULTICLASS, MULTILABEL):
            raise ValueError(f"model.task must be {MULTICLASS} or {MULTILABEL}, not {spec.task!r}")
        self.network_settings = settings(NetworkSettings, network)
        self.optimization = settings(OptimizationSettings, optimization)
        self.evaluation = settings(EvaluationSettings, evaluation)
        self.nonfinite = NonFinitePolicy(nonfinite_loss)
        # plain data in the checkpoint's hyper-parameters: what loading rebuilds the model from
        input_spec, loss = spec.to_dict(), dict(loss or {})
        network, optimization = plain(self.network_settings), plain(self.optimization)
        evaluation = plain(self.evaluation)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "criterion"])
        self.spec = spec
        self.task = spec.task
        self.class_names = list(spec.class_names)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.tta = self.evaluation.tta
        self.channels_last = channels_last
        self.compile_options = ({} if compile is True else dict(compile)) if compile else None
        self.register_buffer("thresholds", torch.as_tensor(spec.decision_thresholds(), dtype=torch.float32))
        calibration = spec.calibration or Calibration(1.0, [0.0] * len(self.class_names))
        temperature, bias = calibration.temperature, calibration.bias
        self.register_buffer("calibration_temperature", torch.tensor(float(temperature)))
        self.register_buffer("calibration_bias", torch.as_tensor(bias, dtype=torch.float32))
        #: The last val/test epoch's ``probs``, ``target`` and dataset ``index`` (on the CPU), for reports.
        self.predictions: dict[str, dict[str, Tensor]] = {}
        self.configure_models()
        self.configure_losses(criterion)
        self.configure_metrics()

    @classmethod
    def from_keys(cls, input_spec: InputSpec | Mapping[str, Any], **keys: Any) -> TileClassifier:
        """A classifier from the flat ``model.*`` config keys (``backbone``, ``width``, ``tta``,
        ``freeze_backbone``, ...; the ``_target_`` of ``conf/model``), sorted into the settings
        groups (:func:`deforest.training.settings.grouped`); the other keys as the constructor's."""
        known = set(inspect.signature(cls).parameters) | {k for names in GROUP_KEYS.values() for k in names}
        for key in keys:
            if key not in known:
                raise unknown_setting("model", key, known - {"input_spec"})
        return cls(input_spec, **grouped(keys))

    # ---- parts --------------------------------------------------------------------------
    def configure_models(self) -> None:
        """The input normalisation, the network (one, or siamese over two dates) and the
        optional band-statistics head, from the contract and the network settings."""
        spec, options = self.spec, self.network_settings
        num_classes = len(self.class_names)
        norm = spec.normalization
        self.normalizer = BandNormalizer(norm.mean, norm.std, norm.transform == "log1p", norm.scale)
        band_count = len(spec.bands)
        network_bands = spec.network.bands
        if network_bands is not None:
            if not network_bands or not all(0 <= b < band_count for b in network_bands):
                raise ValueError(f"network bands {list(network_bands)} must be positions in 0..{band_count - 1}")
            # a buffer, so the selection runs on the device without a host copy per step
            self.register_buffer("network_bands", torch.as_tensor(list(network_bands)), persistent=False)
        else:
            self.network_bands = None
        self.input_resize = options.input_resize
        pool = spec.network.pool
        resize = options.input_resize
        image_size = (resize // pool,) * 2 if resize else tuple(t // pool for t in spec.tile_size)
        net_options = (options.small_tile_stem, options.width, options.dropout, pool, image_size)
        if options.fusion == "siamese":
            names = spec.band_names
            network_names = names if names is None or network_bands is None else [names[i] for i in network_bands]
            self.net = build_siamese(options.backbone, date_band_positions(network_names), num_classes, *net_options)
        else:
            channels = len(network_bands or spec.bands)
            self.net = build_backbone(options.backbone, channels, num_classes, *net_options)
        self.band_statistics = BandStatistics(band_count, num_classes) if options.band_statistics else None

    def configure_losses(self, criterion: Criterion | None = None) -> None:
        """The batch-weighted loss from the ``loss`` options; ``criterion`` replaces its formula."""
        self.criterion = DynamicWeightedLoss.from_keys(self.task, len(self.class_names), criterion, **self.hparams.loss)

    def configure_metrics(self) -> None:
        """The epoch evaluation: threshold tuning (multi-label only) and probability correction."""
        options = self.evaluation
        tuner = ThresholdTuner(options.tune_thresholds) if options.tune_thresholds is not None else None
        self.threshold_tuner = tuner if self.task == MULTILABEL else None
        self.evaluator = EpochEvaluator(self.task, len(self.class_names), self.threshold_tuner, options.calibrate)

    def configure_optimizers(self) -> Any:
        # looked up per call, so wrappers of the method see it
        hooks = [lambda opt: self._undo_skipped_step(opt)] if self.nonfinite.skip else []
        return build_optimization(self, self.backbone, self.optimizer_factory, self.scheduler_factory,
                                  self.optimization, self.trainer, hooks)

    def configure_model(self) -> None:
        """Memory layout and compilation, applied once the trainer has placed the model."""
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.compile_options is not None and not getattr(self.net, "_compiled_call_impl", None):
            self.net.compile(**self.compile_options)  # in place: state_dict keys stay the same

    @property
    def backbone(self) -> torch.nn.ModuleList:
        """The network without its classifier head (what fine-tuning freezes)."""
        return backbone_modules(self.net)

    # ---- the contract in checkpoints ----------------------------------------------------
    @property
    def input_spec(self) -> InputSpec:
        """The contract, with the thresholds these weights decide at and their probability correction."""
        return replace(
            self.spec.with_thresholds(self.thresholds.detach().cpu().tolist()),
            calibration=Calibration(float(self.calibration_temperature), self.calibration_bias.detach().cpu().tolist()),
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The contract as plain data at the checkpoint's top level, thresholds included, so
        readers need neither the model class nor its state dict."""
        checkpoint["input_spec"] = self.input_spec.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint written before the probability correction existed has no correction in
        its state: it loads with the identity (its probabilities as they were)."""
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):
            state.setdefault("calibration_temperature", torch.ones(()))
            state.setdefault("calibration_bias", torch.zeros(len(self.class_names)))

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | os.PathLike | IO,
        map_location: Any = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> TileClassifier:
        """Rebuild a classifier from a checkpoint without running anything the file says
        (:func:`deforest.training.loading.load_classifier`); ``kwargs`` (the current config's)
        set what the file may not, such as ``compile``."""
        if hparams_file is not None or weights_only is False:
            raise ValueError("TileClassifier.load_from_checkpoint takes no hparams_file and always loads weights only")
        return load_classifier(cls, checkpoint_path, map_location, strict, kwargs)

    # ---- forward ------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Logits for raw band values ``[N, C, H, W]``: the mean of the heads' logits."""
        heads = self.head_logits(x)
        return heads[0] if len(heads) == 1 else torch.stack(heads).mean(dim=0)

    def head_logits(self, x: Tensor) -> list[Tensor]:
        """Each head's logits: the network's, then the band-statistics head's if there is one."""
        x = self.normalizer(x)
        x_net = x if self.network_bands is None else x.index_select(1, self.network_bands)
        if self.input_resize:
            x_net = torch.nn.functional.interpolate(x_net, size=(self.input_resize,) * 2, mode="bilinear", align_corners=False)
        heads = [self.net(x_net.contiguous(memory_format=torch.channels_last) if self.channels_last else x_net)]
        if self.band_statistics is not None:
            heads.append(self.band_statistics(x))
        return heads

    def predict_proba(self, x: Tensor) -> Tensor:
        """Class probabilities (softmax) or label probabilities (sigmoid) in float32, with TTA if
        set, after the checkpoint's probability correction (:mod:`deforest.training.calibration`)."""
        _, scores = self._probabilities(x)
        return probabilities(self.task, self.calibrated(scores))

    def calibrated(self, scores: Tensor) -> Tensor:
        """Logits after the probability correction: ``scores / T + b``."""
        return apply_calibration(scores, self.calibration_temperature, self.calibration_bias)

    def _probabilities(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """float32 probabilities and the scores the evaluation loss reads as logits.

        Under autocast (bf16-mixed) the network's logits are bf16: they are cast to float32
        before softmax/sigmoid, so thresholds, AP and reports see unquantised scores. Without
        TTA the scores are the logits themselves; with TTA they are the logits of the averaged
        probabilities (log for softmax, logit for sigmoid), so the loss still rates the
        averaged prediction.
        """
        logits = [self(v).float() for v in (d4_views(x) if self.tta else [x])]
        if self.task == MULTICLASS:
            probs = torch.stack([z.softmax(dim=1) for z in logits]).mean(dim=0)
            scores = logits[0] if len(logits) == 1 else probs.clamp_min(1e-8).log()
        else:
            probs = torch.stack([torch.sigmoid(z) for z in logits]).mean(dim=0)
            scores = logits[0] if len(logits) == 1 else torch.logit(probs, eps=1e-7)
        return probs, scores

    # ---- training -----------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        """One step without a device-to-host sync: the non-finite-loss policy acts through
        ``torch.where`` and is reported at the next check (:meth:`NonFinitePolicy.check`)."""
        n, targets = batch["target"].shape[0], batch["target"]
        if n == 0 and self.trainer.world_size == 1:  # every tile of the batch was a skipped bad tile
            return None
        saved = self.nonfinite.window_start(self._head_buffers)
        if n == 0:  # DDP: this rank still runs the loss's collectives and a (zero) backward, or the others hang
            zero = self._zero_loss().expand(0, len(self.class_names))
            heads = [zero] * (1 if self.band_statistics is None else 2)
            targets = targets.reshape(0) if self.task == MULTICLASS else targets.reshape(0, len(self.class_names))
        else:
            heads = self.head_logits(batch["image"])
        # each head learns from the same batch weights, as if trained alone
        loss = self.criterion(heads, targets)
        where = (self.global_step, batch_idx, batch["index"])
        loss, finite = self.nonfinite.guard(loss, self.trainer.world_size, where, saved, self._zero_loss)
        if saved is not None:
            self.log("train/skipped_batches", (~finite).float(), on_step=False, on_epoch=True, reduce_fx="sum")
        n = max(n, 1)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)
        counts, weights = self.criterion.last_counts, self.criterion.last_weights
        for name, value in (("count", counts), ("weight", weights)):
            self.log(f"train/{name}_mean", value.mean(), on_step=False, on_epoch=True, batch_size=n)
            self.log(f"train/{name}_min", value.min(), on_step=False, on_epoch=True, reduce_fx="min", batch_size=n)
            self.log(f"train/{name}_max", value.max(), on_step=False, on_epoch=True, reduce_fx="max", batch_size=n)
        return loss

    def _zero_loss(self) -> Tensor:
        """A zero that reaches every parameter: a backward pass with zero gradients."""
        return torch.stack([p.reshape(-1)[0] for p in self.parameters() if p.requires_grad]).sum() * 0.0

    def _head_buffers(self) -> list[Tensor]:
        """The heads' batch-norm statistics."""
        heads = [self.net] if self.band_statistics is None else [self.net, self.band_statistics]
        return [b for head in heads for b in head.buffers()]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.nonfinite.before_optimizer_step(optimizer, self._head_buffers())

    def _undo_skipped_step(self, optimizer: torch.optim.Optimizer) -> None:
        """After the optimizer step: undo a skipped one (:meth:`NonFinitePolicy.undo_step`)."""
        self.nonfinite.undo_step(optimizer)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        last = batch_idx + 1 >= self.trainer.num_training_batches
        if last or self.trainer.global_step % max(self.trainer.log_every_n_steps, 1) == 0:
            self.nonfinite.check(self.trainer, lambda index: training_files(self.spec.split, index))

    def setup(self, stage: str) -> None:
        """A linear probe freezes the backbone, batch norm included, before the optimizer is built."""
        if stage == "fit" and self.optimization.freeze_backbone:
            BaseFinetuning.freeze(self.backbone, train_bn=False)

    def on_train_start(self) -> None:
        """After the optimizer state of a resumed run is loaded: where the step counters live,
        and the static loss weights."""
        self.nonfinite.reset()
        self.nonfinite.device_step_counters(self.trainer.optimizers)
        if self.criterion.scheme == "static":  # the whole training split's label counts, from the contract
            self.criterion.set_split_counts(self.spec.split, self.class_names)

    # ---- evaluation ---------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, Tensor], stage: str) -> None:
        if batch["target"].shape[0] == 0:  # every tile of the batch was a skipped bad tile
            if self.trainer.world_size > 1:  # the loss's epoch-end all-reduce needs it logged on every rank
                empty = torch.zeros((), device=self.device)  # weight 0: no effect on the mean
                self.log(f"{stage}/loss", empty, on_epoch=True, prog_bar=stage == "val", batch_size=0, sync_dist=True)
            return
        probs, scores = self._probabilities(batch["image"])
        target = batch["target"]
        # from float32 logits: CUDA autocast refuses binary_cross_entropy on probabilities
        # ("unsafe to autocast"), and both of these run in float32 under autocast
        if self.task == MULTICLASS:
            loss = torch.nn.functional.cross_entropy(scores, target)
        else:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(scores, target.float())
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=stage == "val", batch_size=target.shape[0], sync_dist=True)
        self.evaluator.add(stage, probs, scores, target, batch["index"])

    def _log_metrics(self, stage: str) -> None:
        """Metrics over the whole epoch's predictions (:class:`EpochEvaluator`), after the
        correction and thresholds are fitted on validation."""
        fitting = stage == "val" and not self.trainer.sanity_checking
        buffers = {"thresholds": self.thresholds, "calibration_temperature": self.calibration_temperature,
                   "calibration_bias": self.calibration_bias}
        result = self.evaluator.finish(stage, self.trainer.world_size, self.all_gather, self.device, fitting, buffers)
        if result is None:
            return
        self.predictions[stage] = result.predictions
        for name, value in result.values.items():
            if value.ndim == 0:
                self.log(f"{stage}/{name}", value, prog_bar=name in ("accuracy", "f1_macro"))
            elif value.ndim == 1:  # per class; confusion matrices go to the report only
                for class_name, v in zip(self.class_names, value):
                    self.log(f"{stage}/{name}/{class_name}", v)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def predict_step(self, batch: dict[str, Tensor] | Tensor, batch_idx: int) -> Tensor:
        image = batch["image"] if isinstance(batch, dict) else batch
        return self.predict_proba(image)


__all__ = ["TileClassifier"]
