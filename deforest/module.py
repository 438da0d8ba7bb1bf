"""The LightningModule: one classifier for multi-class and multi-label tiles.

The module receives raw band values and normalises them itself, so a checkpoint carries
everything a prediction needs: bands, statistics, class names, task and thresholds.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from deforest.checkpoints import check_numbers, model_kwargs, read_checkpoint
from deforest.datasets import MULTICLASS, MULTILABEL
from deforest.losses import Criterion, DynamicWeightedLoss
from deforest.metrics import TUNING_BETAS, build_metrics, metric_inputs, tune_thresholds
from deforest.models import BandStatistics, build_backbone
from deforest.safety import CheckpointError
from deforest.transforms import BandNormalizer, d4_views

log = logging.getLogger(__name__)

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]


class TileClassifier(pl.LightningModule):
    """A CNN over N-band tiles with a multi-class (softmax) or multi-label (sigmoid) head.

    Args:
        task: ``multiclass`` or ``multilabel``.
        class_names: one per output.
        band_mean, band_std, log_scale: input normalisation (see :class:`BandNormalizer`).
        bands, tile_size: what the model was trained on, kept for prediction.
        source_band_count: band count of the files trained on; prediction checks scenes by it.
        backbone, small_tile_stem, width, dropout, input_pool: see :func:`deforest.models.build_backbone`.
        band_statistics: add a linear head on per-band statistics
            (:class:`deforest.models.BandStatistics`), trained beside the CNN with the same
            loss; predictions average the two heads' logits.
        network_bands: positions (0-based, among the loaded bands) of the bands the network
            sees; ``None``: all. The band-statistics head always sees every band.
        loss: keyword arguments of :class:`DynamicWeightedLoss` (``scheme``, ``normalize``, ...).
        optimizer: ``optimizer(params)`` factory (a Hydra partial).
        scheduler: ``scheduler(optimizer, ...)`` factory; ``total_steps`` / ``T_max`` are
            filled in from the trainer when the scheduler takes them and the config does not.
        scheduler_interval: ``step`` or ``epoch``.
        tta: average predictions over the eight flips/rotations in val, test and predict.
        thresholds: multi-label decision thresholds, one per label (0.5 when not given).
        tune_thresholds: multi-label: ``f1`` or ``f2`` re-tunes ``thresholds`` on every
            validation epoch to maximise that score per label, so each checkpoint carries
            the thresholds of its own weights; ``None`` keeps them fixed.
        nonfinite_loss: ``error`` stops on a NaN/inf loss naming the batch; ``skip`` skips it.
        criterion: optional custom loss receiving the batch weights.
        channels_last: run the network in NHWC memory layout (faster convolutions on GPUs).
        compile: ``torch.compile`` the network: ``True`` or a dict of its keyword arguments.
    """

    def __init__(
        self,
        task: str,
        class_names: Sequence[str],
        band_mean: Sequence[float],
        band_std: Sequence[float],
        log_scale: bool = True,
        bands: Sequence[int] | None = None,
        tile_size: Sequence[int] | None = None,
        source_band_count: int | None = None,
        backbone: str = "small_cnn",
        small_tile_stem: bool = True,
        width: int = 32,
        dropout: float = 0.2,
        input_pool: int = 1,
        band_statistics: bool = False,
        network_bands: Sequence[int] | None = None,
        loss: Mapping[str, Any] | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "step",
        tta: bool = False,
        thresholds: Sequence[float] | None = None,
        nonfinite_loss: str = "error",
        criterion: Criterion | None = None,
        tune_thresholds: str | None = None,
        channels_last: bool = False,
        compile: bool | Mapping[str, Any] = False,
    ) -> None:
        super().__init__()
        if task not in (MULTICLASS, MULTILABEL):
            raise ValueError(f"model.task must be {MULTICLASS} or {MULTILABEL}, not {task!r}")
        if nonfinite_loss not in ("error", "skip"):
            raise ValueError(f"model.nonfinite_loss must be error or skip, not {nonfinite_loss!r}")
        if tune_thresholds is not None and tune_thresholds not in TUNING_BETAS:
            raise ValueError(f"model.tune_thresholds must be one of {sorted(TUNING_BETAS)} or null, not {tune_thresholds!r}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "criterion"])
        self.task = task
        self.class_names = list(class_names)
        num_classes = len(self.class_names)
        self.normalizer = BandNormalizer(band_mean, band_std, log_scale)
        network_band_count = len(band_mean)
        if network_bands is not None:
            if not network_bands or not all(0 <= b < len(band_mean) for b in network_bands):
                raise ValueError(f"network_bands {list(network_bands)} must be positions in 0..{len(band_mean) - 1}")
            network_band_count = len(network_bands)
            # a buffer, so the selection runs on the device without a host copy per step
            self.register_buffer("network_bands", torch.as_tensor(list(network_bands)), persistent=False)
        else:
            self.network_bands = None
        self.net = build_backbone(
            backbone, network_band_count, num_classes, small_tile_stem, width, dropout, input_pool
        )
        self.band_statistics = BandStatistics(len(band_mean), num_classes) if band_statistics else None
        loss_options = dict(loss or {})
        self.criterion = DynamicWeightedLoss(task, num_classes, criterion=criterion, **loss_options)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.tta = tta
        self.nonfinite_loss = nonfinite_loss
        self.tune_thresholds = tune_thresholds if task == MULTILABEL else None
        self.channels_last = channels_last
        self.compile_options = ({} if compile is True else dict(compile)) if compile else None
        self.register_buffer(
            "thresholds",
            torch.as_tensor(thresholds if thresholds is not None else [0.5] * num_classes, dtype=torch.float32),
        )
        self.metrics = torch.nn.ModuleDict({stage: self._metrics() for stage in ("val", "test")})
        self._outputs: dict[str, list[dict[str, Tensor]]] = {"val": [], "test": []}
        #: The last val/test epoch's ``probs``, ``target`` and dataset ``index`` (on the CPU), for reports.
        self.predictions: dict[str, dict[str, Tensor]] = {}

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
        check_numbers(checkpoint_path, "band_mean", options.get("band_mean"))
        check_numbers(checkpoint_path, "band_std", options.get("band_std"), low=1e-12)
        check_numbers(checkpoint_path, "thresholds", options.get("thresholds"), low=0.0, high=1.0)
        try:
            model = cls(**options)
            model.on_load_checkpoint(checkpoint)
            model.load_state_dict(checkpoint["state_dict"], strict=True if strict is None else strict)
        except (TypeError, ValueError, RuntimeError, KeyError) as err:
            raise CheckpointError(
                checkpoint_path, f"cannot rebuild the model from it ({type(err).__name__}: {str(err).splitlines()[0][:300]})"
            ) from None
        check_numbers(checkpoint_path, "thresholds", model.thresholds.tolist(), low=0.0, high=1.0)
        tensors = (t for t in checkpoint["state_dict"].values() if isinstance(t, Tensor))
        return model.to(next(tensors, torch.tensor(0)).device)

    # ---- metrics ------------------------------------------------------------------------
    def _metrics(self) -> torch.nn.ModuleDict:
        """The collections of :func:`deforest.metrics.build_metrics` for one stage."""
        return torch.nn.ModuleDict(build_metrics(self.task, len(self.class_names)))

    # ---- forward ------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Logits for raw band values ``[N, C, H, W]``: the mean of the heads' logits."""
        heads = self.head_logits(x)
        return heads[0] if len(heads) == 1 else torch.stack(heads).mean(dim=0)

    def head_logits(self, x: Tensor) -> list[Tensor]:
        """Each head's logits: the network's, then the band-statistics head's if there is one."""
        x = self.normalizer(x)
        x_net = x if self.network_bands is None else x.index_select(1, self.network_bands)
        heads = [self.net(x_net.contiguous(memory_format=torch.channels_last) if self.channels_last else x_net)]
        if self.band_statistics is not None:
            heads.append(self.band_statistics(x))
        return heads

    def predict_proba(self, x: Tensor) -> Tensor:
        """Class probabilities (softmax) or label probabilities (sigmoid), with TTA if set."""
        views = d4_views(x) if self.tta else [x]
        activate = (lambda z: z.softmax(dim=1)) if self.task == MULTICLASS else torch.sigmoid
        return torch.stack([activate(self(v)) for v in views]).mean(dim=0)

    # ---- steps --------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        if batch["target"].shape[0] == 0:  # every tile of the batch was a skipped bad tile
            return None
        # batch-norm statistics see a NaN batch in the forward pass: keep them to restore on skip
        saved = [b.clone() for b in self._head_buffers()] if self.nonfinite_loss == "skip" else None
        heads = self.head_logits(batch["image"])
        # each head learns from the same batch weights, as if trained alone
        loss = self.criterion(heads, batch["target"])
        if not torch.isfinite(loss):  # one host sync per step, outside the loss path
            if saved is not None:
                with torch.no_grad():
                    for buffer, value in zip(self._head_buffers(), saved):
                        buffer.copy_(value)
                log.warning(
                    "skipping non-finite training loss at global step %d, batch %d; files: %s",
                    self.global_step, batch_idx, self._batch_files(batch),
                )
                self.log("train/skipped_batches", 1.0, on_step=False, on_epoch=True, reduce_fx="sum")
                return None
            raise FloatingPointError(
                f"non-finite training loss ({loss.detach().item()}) at global step {self.global_step}, "
                f"batch {batch_idx}; files: {self._batch_files(batch)}"
            )
        n = batch["target"].shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)
        counts, weights = self.criterion.last_counts, self.criterion.last_weights
        for name, value in (("count", counts), ("weight", weights)):
            self.log(f"train/{name}_mean", value.mean(), on_step=False, on_epoch=True, batch_size=n)
            self.log(f"train/{name}_min", value.min(), on_step=False, on_epoch=True, reduce_fx="min", batch_size=n)
            self.log(f"train/{name}_max", value.max(), on_step=False, on_epoch=True, reduce_fx="max", batch_size=n)
        return loss

    def _head_buffers(self) -> list[Tensor]:
        """The heads' batch-norm statistics."""
        heads = [self.net] if self.band_statistics is None else [self.net, self.band_statistics]
        return [b for head in heads for b in head.buffers()]

    def _batch_files(self, batch: dict[str, Tensor]) -> list[str]:
        datamodule = getattr(self.trainer, "datamodule", None)
        dataset = getattr(datamodule, "datasets", {}).get("train") if datamodule else None
        indexes = batch["index"].tolist()
        return [dataset.sources[i] for i in indexes] if dataset is not None else [str(i) for i in indexes]

    def _eval_step(self, batch: dict[str, Tensor], stage: str) -> None:
        if batch["target"].shape[0] == 0:  # every tile of the batch was a skipped bad tile
            return
        probs = self.predict_proba(batch["image"])
        target = batch["target"]
        if self.task == MULTICLASS:
            loss = torch.nn.functional.nll_loss(probs.clamp_min(1e-8).log(), target)
        else:
            loss = torch.nn.functional.binary_cross_entropy(probs.clamp(1e-7, 1 - 1e-7), target.float())
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=stage == "val", batch_size=target.shape[0], sync_dist=True)
        self._outputs[stage].append({"probs": probs.detach(), "target": target, "index": batch["index"]})

    def _log_metrics(self, stage: str) -> None:
        """Metrics over the whole epoch's predictions, after tuning thresholds on validation.

        Decisions wait for the epoch end so that validation metrics (and the checkpoint
        saved right after) use the thresholds tuned on this very epoch.
        """
        outputs, self._outputs[stage] = self._outputs[stage], []
        if not outputs:
            return
        local = {key: torch.cat([o[key] for o in outputs]) for key in outputs[0]}
        gathered = self._gather(local)
        if stage == "val" and self.tune_thresholds and not self.trainer.sanity_checking:
            self.thresholds.copy_(tune_thresholds(gathered["probs"].cpu(), gathered["target"].cpu(), self.tune_thresholds))
        self.predictions[stage] = {key: value.cpu() for key, value in gathered.items()}
        collections = self.metrics[stage]
        for kind, inputs in metric_inputs(self.task, local["probs"], local["target"], self.thresholds).items():
            collections[kind].update(*inputs)
        for kind in collections:
            for name, value in collections[kind].compute().items():
                if value.ndim == 0:
                    self.log(f"{stage}/{name}", value, prog_bar=name in ("accuracy", "f1_macro"))
                elif value.ndim == 1:  # per class; confusion matrices go to the report only
                    for class_name, v in zip(self.class_names, value):
                        self.log(f"{stage}/{name}/{class_name}", v)
            collections[kind].reset()

    def _gather(self, local: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every process's predictions, once per dataset index (samplers pad with repeats)."""
        if self.trainer.world_size == 1:
            return local
        gathered = {key: self.all_gather(value).flatten(0, 1) for key, value in local.items()}
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
    def on_train_start(self) -> None:
        """``static`` weighting takes the whole training split's label counts, once."""
        if self.criterion.scheme != "static":
            return
        targets = torch.as_tensor(self.trainer.train_dataloader.dataset.targets)
        if self.task == MULTICLASS:
            counts = torch.bincount(targets, minlength=len(self.class_names)).float()
        else:
            counts = targets.float().sum(dim=0)
        self.criterion.set_static_counts(counts, float(len(targets)))

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError("no optimizer configured (model.optimizer)")
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        kwargs: dict[str, Any] = {}
        target = getattr(self.scheduler_factory, "func", self.scheduler_factory)
        params = inspect.signature(target).parameters
        given = getattr(self.scheduler_factory, "keywords", {})
        steps = int(self.trainer.estimated_stepping_batches)
        if self.scheduler_interval == "epoch":
            steps = int(self.trainer.max_epochs or 1)
        for name in ("total_steps", "T_max"):
            if name in params and name not in given:
                kwargs[name] = steps
        scheduler = self.scheduler_factory(optimizer, **kwargs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}
