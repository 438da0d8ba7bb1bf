"""The LightningModule: one classifier for multi-class and multi-label tiles.

The module is built from the datamodule's :class:`~deforest.contract.InputSpec` and
stores it in every checkpoint (with the thresholds of the checkpoint's own weights), so
evaluation and prediction read what the model expects of its input from one place. It
receives raw band values (nodata already filled) and normalises them itself.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import IO, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BaseFinetuning
import numpy as np
import torch
from torch import Tensor

from deforest.change import date_band_positions
from deforest.calibration import apply_calibration, calibration_errors, fit_calibration, probabilities
from deforest.checkpoints import check_numbers, model_kwargs, read_checkpoint
from deforest.contract import InputSpec
from deforest.datasets import MULTICLASS, MULTILABEL
from deforest.losses import Criterion, DynamicWeightedLoss
from deforest.metrics import compute_metrics
from deforest.models import FUSIONS, BandStatistics, backbone_modules, build_backbone, build_siamese
from deforest.safety import CheckpointError
from deforest.thresholds import ThresholdTuner
from deforest.transforms import BandNormalizer, d4_views

log = logging.getLogger(__name__)

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]


class TileClassifier(pl.LightningModule):
    """A CNN over N-band tiles with a multi-class (softmax) or multi-label (sigmoid) head.

    Args:
        input_spec: the input contract (an :class:`InputSpec` or its ``to_dict()``): task,
            classes, bands, normalisation, tile size, the bands the network sees
            (``network_bands``; the band-statistics head always sees every band), the
            input pooling, the initial thresholds and the split.
        backbone, small_tile_stem, width, dropout: see :func:`deforest.models.build_backbone`.
        band_statistics: add a linear head on per-band statistics
            (:class:`deforest.models.BandStatistics`), trained beside the CNN with the same
            loss; predictions average the two heads' logits.
        pretrained: where the network's weights started (:func:`deforest.weights.band_plan`:
            weights name, band-to-kernel mapping); a record, nothing is loaded from it.
        input_resize: resize (bilinear) the tile to this many pixels a side before the network,
            as pretrained weights' published figures do (224); ``None`` keeps the tile size.
        freeze_backbone: keep everything but the classifier head frozen (a linear probe).
        backbone_lr_multiplier: the backbone's learning rate is the optimizer's times this.
        loss: keyword arguments of :class:`DynamicWeightedLoss` (``scheme``, ``normalize``, ...).
        optimizer: ``optimizer(params)`` factory (a Hydra partial).
        scheduler: ``scheduler(optimizer, ...)`` factory; ``total_steps`` / ``T_max`` are
            filled in from the trainer when the scheduler takes them and the config does not.
        scheduler_interval: ``step`` or ``epoch``.
        tta: average predictions over the eight flips/rotations in val, test and predict.
        tune_thresholds: multi-label: ``f1`` or ``f2`` re-tunes the thresholds on every
            validation epoch to maximise that score per label, so each checkpoint carries
            the thresholds of its own weights; ``None`` keeps them fixed. The validation
            scores are then computed at thresholds tuned on the other half of the
            validation tiles (:class:`deforest.thresholds.ThresholdTuner`).
        nonfinite_loss: ``error`` stops on a NaN/inf loss naming the batch; ``skip`` skips it.
        criterion: optional custom loss receiving the batch weights.
        channels_last: run the network in NHWC memory layout (faster convolutions on GPUs).
        compile: ``torch.compile`` the network: ``True`` or a dict of its keyword arguments.
        calibrate: fit the probability correction (:mod:`deforest.calibration`) on every
            validation epoch, before the thresholds are tuned, so each checkpoint carries the
            correction of its own weights; ``False`` keeps the one it has (identity when new).
        fusion: how the dates of a two-date sample meet (:data:`deforest.models.FUSIONS`):
            ``early`` feeds their stacked bands to one network; ``siamese`` runs one shared
            backbone on each date's bands (taken apart by the contract's dated band names,
            ``B04@t0``/``B04@t1``) and classifies their features and difference
            (:class:`deforest.models.SiameseNetwork`). The band-statistics head sees every band.
    """

    def __init__(
        self,
        input_spec: InputSpec | Mapping[str, Any],
        backbone: str = "small_cnn",
        small_tile_stem: bool = True,
        width: int = 32,
        dropout: float = 0.2,
        band_statistics: bool = False,
        pretrained: Mapping[str, Any] | None = None,
        input_resize: int | None = None,
        freeze_backbone: bool = False,
        backbone_lr_multiplier: float = 1.0,
        loss: Mapping[str, Any] | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "step",
        tta: bool = False,
        nonfinite_loss: str = "error",
        criterion: Criterion | None = None,
        tune_thresholds: str | None = None,
        channels_last: bool = False,
        compile: bool | Mapping[str, Any] = False,
        fusion: str = "early",
        calibrate: bool = True,
    ) -> None:
        super().__init__()
        spec = input_spec if isinstance(input_spec, InputSpec) else InputSpec.from_dict(input_spec)
        if spec.task not in (MULTICLASS, MULTILABEL):
            raise ValueError(f"model.task must be {MULTICLASS} or {MULTILABEL}, not {spec.task!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"model.fusion must be one of {list(FUSIONS)}, not {fusion!r}")
        if nonfinite_loss not in ("error", "skip"):
            raise ValueError(f"model.nonfinite_loss must be error or skip, not {nonfinite_loss!r}")
        tuner = ThresholdTuner(tune_thresholds) if tune_thresholds is not None else None
        input_spec = spec.to_dict()  # plain data in the checkpoint's hyper-parameters
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "criterion"])
        self.spec = spec
        self.task = spec.task
        self.class_names = list(spec.class_names)
        num_classes = len(self.class_names)
        norm = spec.normalization
        self.normalizer = BandNormalizer(norm.mean, norm.std, norm.transform == "log1p", norm.scale)
        band_count = len(spec.bands)
        network_bands = spec.network_bands
        if network_bands is not None:
            if not network_bands or not all(0 <= b < band_count for b in network_bands):
                raise ValueError(f"network_bands {list(network_bands)} must be positions in 0..{band_count - 1}")
            # a buffer, so the selection runs on the device without a host copy per step
            self.register_buffer("network_bands", torch.as_tensor(list(network_bands)), persistent=False)
        else:
            self.network_bands = None
        if input_resize is not None and input_resize < 1:
            raise ValueError(f"model.input_resize must be >= 1 or null, not {input_resize}")
        self.input_resize = input_resize
        pool = spec.input_pool
        image_size = (input_resize // pool,) * 2 if input_resize else tuple(t // pool for t in spec.tile_size)
        if fusion == "siamese":
            names = spec.band_names
            network_names = names if names is None or network_bands is None else [names[i] for i in network_bands]
            dates = date_band_positions(network_names)
            self.net = build_siamese(backbone, dates, num_classes, small_tile_stem, width, dropout, pool, image_size)
        else:
            self.net = build_backbone(
                backbone, len(network_bands or spec.bands), num_classes, small_tile_stem, width, dropout, pool, image_size
            )
        self.band_statistics = BandStatistics(band_count, num_classes) if band_statistics else None
        if backbone_lr_multiplier <= 0:
            raise ValueError(f"model.backbone_lr_multiplier must be > 0, not {backbone_lr_multiplier}")
        self.freeze_backbone = freeze_backbone
        self.backbone_lr_multiplier = backbone_lr_multiplier
        loss_options = dict(loss or {})
        self.criterion = DynamicWeightedLoss(spec.task, num_classes, criterion=criterion, **loss_options)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.tta = tta
        self.nonfinite_loss = nonfinite_loss
        self.threshold_tuner = tuner if spec.task == MULTILABEL else None
        self.channels_last = channels_last
        self.compile_options = ({} if compile is True else dict(compile)) if compile else None
        self.register_buffer("thresholds", torch.as_tensor(spec.decision_thresholds(), dtype=torch.float32))
        self.calibrate = calibrate
        temperature = 1.0 if spec.calibration_temperature is None else spec.calibration_temperature
        bias = [0.0] * num_classes if spec.calibration_bias is None else spec.calibration_bias
        self.register_buffer("calibration_temperature", torch.tensor(float(temperature)))
        self.register_buffer("calibration_bias", torch.as_tensor(bias, dtype=torch.float32))
        self._outputs: dict[str, list[dict[str, Tensor]]] = {"val": [], "test": []}
        #: per training step since the last check: step, batch, loss finite?, loss, tile indexes
        self._pending: list[tuple[int, int, Tensor, Tensor, Tensor]] = []
        #: ``skip``: the accumulation window's finite flag and its batch-norm statistics at its start
        self._skip_state: tuple[Tensor, list[Tensor]] | None = None
        #: ``skip``: the finite flag, and each stepped parameter with its value and optimizer state before the step
        self._step_snapshot: tuple[Tensor, list[tuple[Tensor, Tensor, dict[str, Tensor]]]] | None = None
        #: The last val/test epoch's ``probs``, ``target`` and dataset ``index`` (on the CPU), for reports.
        self.predictions: dict[str, dict[str, Tensor]] = {}

    @property
    def backbone(self) -> torch.nn.ModuleList:
        """The network without its classifier head (what fine-tuning freezes)."""
        return backbone_modules(self.net)

    @property
    def input_spec(self) -> InputSpec:
        """The contract, with the thresholds these weights decide at and their probability correction."""
        return replace(
            self.spec.with_thresholds(self.thresholds.detach().cpu().tolist()),
            calibration_temperature=float(self.calibration_temperature),
            calibration_bias=self.calibration_bias.detach().cpu().tolist(),
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

    # ---- loading ------------------------------------------------------------------------
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
        """Rebuild a classifier from a checkpoint without running anything the file says.

        Unlike Lightning's loader, the saved hyper-parameters pass through
        :func:`deforest.checkpoints.model_kwargs`: ``compile`` (whose options name compilers
        that ``torch.compile`` runs) and other code-execution settings are never taken from
        the file, only from ``kwargs`` (the caller's, i.e. the current config); ``configure_model``
        is not called here. A missing, truncated or crafted file raises
        :class:`~deforest.safety.CheckpointError` naming it.
        """
        if hparams_file is not None or weights_only is False:
            raise ValueError("TileClassifier.load_from_checkpoint takes no hparams_file and always loads weights only")
        if map_location is None:
            from lightning.pytorch.core.saving import _default_map_location as map_location
        checkpoint = read_checkpoint(checkpoint_path, map_location)
        hparams = checkpoint.get(cls.CHECKPOINT_HYPER_PARAMS_KEY) or {}
        if not isinstance(hparams, Mapping):
            raise CheckpointError(checkpoint_path, f"refused: its hyper-parameters are a {type(hparams).__name__}")
        options = model_kwargs(cls, hparams, checkpoint_path, kwargs)
        spec = options.get("input_spec")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("normalization"), Mapping):
            raise CheckpointError(checkpoint_path, "refused: it has no input contract (input_spec); was it written by deforest?")
        check_numbers(checkpoint_path, "normalisation mean", spec["normalization"].get("mean"))
        check_numbers(checkpoint_path, "normalisation std", spec["normalization"].get("std"), low=1e-12)
        check_numbers(checkpoint_path, "thresholds", spec.get("thresholds"), low=0.0, high=1.0)
        try:
            model = cls(**options)
            model.on_load_checkpoint(checkpoint)
            model.load_state_dict(checkpoint["state_dict"], strict=True if strict is None else strict)
        except (TypeError, ValueError, RuntimeError, KeyError) as err:
            raise CheckpointError(
                checkpoint_path, f"cannot rebuild the model from it ({type(err).__name__}: {str(err).splitlines()[0][:300]})"
            ) from None
        check_numbers(checkpoint_path, "thresholds", model.thresholds.tolist(), low=0.0, high=1.0)
        check_numbers(checkpoint_path, "calibration temperature", [float(model.calibration_temperature)], low=1e-6)
        check_numbers(checkpoint_path, "calibration bias", model.calibration_bias.tolist())
        tensors = (t for t in checkpoint["state_dict"].values() if isinstance(t, Tensor))
        return model.to(next(tensors, torch.tensor(0)).device)

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
        set, after the checkpoint's probability correction (:mod:`deforest.calibration`)."""
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

    # ---- steps --------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        """One step without a device-to-host sync: the non-finite-loss policy acts through
        ``torch.where`` and is reported at the next check (:meth:`_check_nonfinite`)."""
        n, targets = batch["target"].shape[0], batch["target"]
        if n == 0 and self.trainer.world_size == 1:  # every tile of the batch was a skipped bad tile
            return None
        # batch-norm statistics see a NaN batch in the forward pass: keep them, as they were at
        # the start of the accumulation window, to restore if any of its micro-batches is skipped
        skip, window = self.nonfinite_loss == "skip", self._skip_state
        saved = window[1] if window is not None else [b.clone() for b in self._head_buffers()] if skip else None
        if n == 0:  # DDP: this rank still runs the loss's collectives and a (zero) backward, or the others hang
            zero = self._zero_loss().expand(0, len(self.class_names))
            heads = [zero] * (1 if self.band_statistics is None else 2)
            targets = targets.reshape(0) if self.task == MULTICLASS else targets.reshape(0, len(self.class_names))
        else:
            heads = self.head_logits(batch["image"])
        # each head learns from the same batch weights, as if trained alone
        loss = self.criterion(heads, targets)
        finite = torch.isfinite(loss.detach()).float()
        if self.trainer.world_size > 1:  # every rank takes the same decision
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        finite = finite.bool()
        self._pending.append((self.global_step, batch_idx, finite, loss.detach(), batch["index"]))
        if saved is not None:  # restored after the backward pass, which still needs them
            # one non-finite micro-batch poisons the window's summed gradients: skip the whole step
            self._skip_state = (finite if window is None else window[0] & finite, saved)
            loss = torch.where(finite, loss, self._zero_loss())
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

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """``skip``: when a micro-batch of this accumulation window had a non-finite loss, the
        batch-norm statistics go back to the window's start, and the parameters and optimizer
        state are kept so that :meth:`_undo_skipped_step` can undo the step; all on the device."""
        if self._skip_state is None:
            return
        (finite, saved), self._skip_state = self._skip_state, None
        with torch.no_grad():
            for buffer, value in zip(self._head_buffers(), saved):
                buffer.copy_(torch.where(finite, buffer, value))
            state = getattr(optimizer, "optimizer", optimizer).state
            kept = [
                (p, p.detach().clone(), {k: v.clone() for k, v in state.get(p, {}).items() if isinstance(v, Tensor)})
                for group in optimizer.param_groups for p in group["params"] if p.grad is not None
            ]
        self._step_snapshot = (finite, kept)

    def _undo_skipped_step(self, optimizer: torch.optim.Optimizer) -> None:
        """After the optimizer step (a step post-hook): a skipped step's parameters and optimizer
        state (moments, step count; weight decay moved the parameters too) back to the values
        before it, by ``torch.where`` on the device.

        Undoing works for any optimizer, where the fused optimizers' ``found_inf`` serves only
        fused Adam/AdamW/SGD/Adagrad; it costs a copy of the parameters and state per step,
        paid only under ``skip``. The step runs on NaN gradients and the ``where`` discards it.
        State the step created (the first step) goes back to zeros: the fresh state of
        torch's Adam family, and a zero momentum buffer acts as a fresh one in SGD.
        """
        snapshot, self._step_snapshot = self._step_snapshot, None
        if snapshot is None:
            return
        finite, kept = snapshot
        state = getattr(optimizer, "optimizer", optimizer).state
        with torch.no_grad():
            for p, value, before in kept:
                p.copy_(torch.where(finite, p, value))
                for key, now in state[p].items():
                    if isinstance(now, Tensor):
                        old = before.get(key)
                        old = torch.zeros_like(now) if old is None else old
                        # a host-side step counter (see _device_step_counters) would need the flag on the host
                        flag = finite if now.device == finite.device else finite.to(now.device)
                        now.copy_(torch.where(flag, now, old))

    def on_train_start(self) -> None:
        """After the optimizer state of a resumed run is loaded: where the step counters live,
        and the static loss weights."""
        self._skip_state = self._step_snapshot = None
        self._device_step_counters()
        self._static_weights()

    def _device_step_counters(self) -> None:
        """``skip`` on a GPU: optimizers with a ``capturable`` mode (Adam, AdamW, ...) keep their
        step counter on the device, where :meth:`_undo_skipped_step` restores it without a sync;
        by default they keep it on the host. Set after a resumed checkpoint's optimizer state is
        loaded (which brings its own setting), and undone on the CPU, where capturable is refused."""
        from torch.optim.optimizer import _get_capturable_supported_devices

        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                if "capturable" not in group or group.get("fused") or not group["params"]:
                    continue
                device = group["params"][0].device
                wanted = self.nonfinite_loss == "skip" and device.type in _get_capturable_supported_devices()
                if group["capturable"] == wanted:
                    continue
                group["capturable"] = wanted
                # capturable is chosen for the device-side counter, not for CUDA graphs: torch's
                # once-per-instance warning about running it uncaptured does not apply
                optimizer._warned_capturable_if_run_uncaptured = True
                for p in group["params"]:  # once, before training: moved where the new mode keeps them
                    step = optimizer.state.get(p, {}).get("step")
                    if isinstance(step, Tensor):
                        optimizer.state[p]["step"] = step.to(p.device if wanted else "cpu")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        last = batch_idx + 1 >= self.trainer.num_training_batches
        if last or self.trainer.global_step % max(self.trainer.log_every_n_steps, 1) == 0:
            self._check_nonfinite()

    def _check_nonfinite(self) -> None:
        """The steps since the last check with a non-finite loss: ``error`` raises naming the
        first one's step and files, ``skip`` warns. One host sync per check, not per step."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        flags = torch.stack([p[2] for p in pending]).cpu().tolist()
        for (step, batch_idx, _, loss, index), ok in zip(pending, flags):
            if ok:
                continue
            files = self._batch_files(index)
            if self.nonfinite_loss == "error":
                world = self.trainer.world_size
                if world > 1:
                    # the decision was all-reduced in the step: every rank raises here together, so
                    # the line can name every rank's files, and the command line prints rank 0's only
                    gathered: list[Any] = [None] * world
                    torch.distributed.all_gather_object(gathered, files)
                    files = [f for rank_files in gathered for f in rank_files]
                error = FloatingPointError(
                    f"non-finite training loss ({loss.item()}) at global step {step}, batch {batch_idx}; files: {files}"
                )
                if world > 1:
                    error.ddp_rank = self.trainer.global_rank
                raise error
            log.warning("skipped non-finite training loss at global step %d, batch %d; files: %s", step, batch_idx, files)

    def _head_buffers(self) -> list[Tensor]:
        """The heads' batch-norm statistics."""
        heads = [self.net] if self.band_statistics is None else [self.net, self.band_statistics]
        return [b for head in heads for b in head.buffers()]

    def _batch_files(self, index: Tensor) -> list[str]:
        """The training batch's files, from the contract's train list (dataset order)."""
        indexes = index.tolist()
        if self.spec.split is None:
            return [str(i) for i in indexes]
        train, root = self.spec.split.lists.get("train", []), self.spec.split.root
        return [os.path.join(root, train[i]) if i < len(train) else str(i) for i in indexes]

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
        self._outputs[stage].append({"probs": probs.detach(), "scores": scores.detach().float(), "target": target,
                                     "index": batch["index"]})

    def _log_metrics(self, stage: str) -> None:
        """Metrics over the whole epoch's predictions, after tuning thresholds on validation.

        Decisions wait for the epoch end so that validation metrics (and the checkpoint
        saved right after) use the thresholds tuned on this very epoch. Under DDP every rank
        enters the gather, with or without predictions of its own, then computes the metrics
        on all the de-duplicated predictions itself: the same numbers on every rank, each tile
        counted once, and no metric collective that a rank without predictions would miss.
        """
        outputs, self._outputs[stage] = self._outputs[stage], []
        if not outputs and self.trainer.world_size == 1:
            return
        empty = self._no_outputs()
        local = {key: torch.cat([o[key] for o in outputs]).to(empty[key].dtype) if outputs else value
                 for key, value in empty.items()}
        gathered = self._gather(local)
        if gathered["index"].numel() == 0:  # every tile of every rank was skipped: nothing to score
            return
        if stage == "val" and self.calibrate and not self.trainer.sanity_checking:
            # before the thresholds: they are tuned on the corrected probabilities
            temperature, bias = fit_calibration(self.task, gathered["scores"], gathered["target"])
            self.calibration_temperature.copy_(temperature)
            self.calibration_bias.copy_(bias)
        raw_probs = gathered["probs"]
        gathered = {**gathered, "probs": probabilities(self.task, self.calibrated(gathered["scores"]))}
        thresholds: Tensor = self.thresholds
        if stage == "val" and self.threshold_tuner is not None and not self.trainer.sanity_checking:
            kept, scoring = self.threshold_tuner.fit(gathered["probs"].cpu(), gathered["target"].cpu())
            self.thresholds.copy_(kept)
            # each tile scored at thresholds tuned on the other tiles: the checkpoint and sweep
            # selection then see what the thresholds give on data they were not tuned on
            thresholds = scoring
        predictions = self.predictions[stage] = {key: value.cpu() for key, value in gathered.items()}
        values = compute_metrics(self.task, len(self.class_names), predictions["probs"], predictions["target"],
                                 thresholds.cpu())
        # the calibration error the correction removed: the same tiles' uncorrected probabilities
        uncorrected = calibration_errors(self.task, raw_probs.cpu(), predictions["target"])
        values.update({f"{name}_uncorrected": value for name, value in uncorrected.items()})
        for name, value in values.items():
            if value.ndim == 0:
                self.log(f"{stage}/{name}", value, prog_bar=name in ("accuracy", "f1_macro"))
            elif value.ndim == 1:  # per class; confusion matrices go to the report only
                for class_name, v in zip(self.class_names, value):
                    self.log(f"{stage}/{name}/{class_name}", v)

    def _no_outputs(self) -> dict[str, Tensor]:
        """Evaluation outputs of no tile, in the keys, dtypes and shapes every rank gathers
        (targets as the datasets give them: class indexes, or 0/1 labels as uint8)."""
        c = len(self.class_names)
        target = (torch.zeros(0, dtype=torch.long) if self.task == MULTICLASS
                  else torch.zeros(0, c, dtype=torch.uint8))
        empty = {"probs": torch.zeros(0, c), "scores": torch.zeros(0, c), "target": target,
                 "index": torch.zeros(0, dtype=torch.long)}
        return {key: value.to(self.device) for key, value in empty.items()}

    def _gather(self, local: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every process's predictions, once per dataset index (samplers pad with repeats).

        Ranks hold different numbers of predictions where a tile turned out bad as it was
        read on one of them (``data.on_bad_tile=skip``), none at all where every tile of
        theirs did; ``all_gather`` needs one shape on every rank. So the counts are gathered
        first, every rank pads its share to the largest and the padding is cut off again.
        """
        if self.trainer.world_size == 1:
            return local
        counts = self.all_gather(torch.tensor([local["index"].shape[0]], device=self.device)).flatten().tolist()
        most = max(counts)
        gathered = {}
        for key, value in local.items():
            padded = torch.cat([value, value.new_zeros((most - value.shape[0], *value.shape[1:]))])
            every = self.all_gather(padded)  # [world, most, ...]
            gathered[key] = torch.cat([every[rank, :n] for rank, n in enumerate(counts)])
        _, first = np.unique(gathered["index"].cpu().numpy(), return_index=True)
        return {key: value[torch.as_tensor(first, device=value.device)] for key, value in gathered.items()}

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

    # ---- speed switches -----------------------------------------------------------------
    def configure_model(self) -> None:
        """Memory layout and compilation, applied once the trainer has placed the model."""
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.compile_options is not None and not getattr(self.net, "_compiled_call_impl", None):
            self.net.compile(**self.compile_options)  # in place: state_dict keys stay the same

    # ---- fit hooks ----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """A linear probe freezes the backbone, batch norm included, before the optimizer is built."""
        if stage == "fit" and self.freeze_backbone:
            BaseFinetuning.freeze(self.backbone, train_bn=False)

    def _static_weights(self) -> None:
        """``static`` weighting takes the whole training split's label counts from the contract."""
        if self.criterion.scheme != "static":
            return
        if self.spec.split is None or "train" not in self.spec.split.class_counts:
            raise ValueError("loss.scheme=static needs the training split's label counts (the input contract has no split)")
        per_class = self.spec.split.class_counts["train"]
        counts = torch.as_tensor([float(per_class.get(name, 0)) for name in self.class_names])
        self.criterion.set_static_counts(counts, float(len(self.spec.split.lists["train"])))

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError("no optimizer configured (model.optimizer)")
        optimizer = self.optimizer_factory(params=self._param_groups())
        if self.nonfinite_loss == "skip":  # looked up per call, so wrappers of the method see it
            optimizer.register_step_post_hook(lambda opt, args, kwargs: self._undo_skipped_step(opt))
        if self.scheduler_factory is None:
            return optimizer
        kwargs: dict[str, Any] = {}
        target = getattr(self.scheduler_factory, "func", self.scheduler_factory)
        params = inspect.signature(target).parameters
        given = getattr(self.scheduler_factory, "keywords", {})
        if len(optimizer.param_groups) > 1 and "max_lr" in given:  # OneCycleLR: one peak per group
            kwargs["max_lr"] = [given["max_lr"] * g.get("lr_scale", 1.0) for g in optimizer.param_groups]
        steps = int(self.trainer.estimated_stepping_batches)
        if self.scheduler_interval == "epoch":
            steps = int(self.trainer.max_epochs or 1)
        for name in ("total_steps", "T_max"):
            if name in params and name not in given:
                kwargs[name] = steps
        scheduler = self.scheduler_factory(optimizer, **kwargs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}

    def _param_groups(self) -> Any:
        """All parameters; with ``backbone_lr_multiplier`` two groups, the backbone's at the scaled rate.

        Frozen parameters stay in the optimizer (they have no gradient, so it skips them):
        ``BackboneFinetuning`` unfreezes them later without adding a group.
        """
        if self.backbone_lr_multiplier == 1.0:
            return self.parameters()
        lr = getattr(self.optimizer_factory, "keywords", {}).get("lr")
        if lr is None:
            raise ValueError("model.backbone_lr_multiplier needs model.optimizer.lr")
        backbone = {id(p) for p in self.backbone.parameters()}
        scale = self.backbone_lr_multiplier
        return [
            {"params": [p for p in self.parameters() if id(p) not in backbone], "lr": lr, "lr_scale": 1.0},
            {"params": [p for p in self.parameters() if id(p) in backbone], "lr": lr * scale, "lr_scale": scale},
        ]
