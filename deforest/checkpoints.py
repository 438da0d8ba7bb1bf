"""Checkpoint files that are never half-written and are loaded without running pickled code.

Lightning's own save goes through an fsspec transaction whose temporary file lives in the
system temp dir: moving it onto another filesystem is a copy, not an atomic rename, and
nothing is fsynced. Here the temporary file sits beside the target, is fsynced, and
``os.replace`` swaps it in, so a kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Atomic local saves; loads with ``weights_only=True`` unless told otherwise.

    Remote paths (``s3://`` ...) fall back to Lightning's transaction-based save.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a save that was killed
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)

    def load_checkpoint(
        self,
        path: str | os.PathLike,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location, True if weights_only is None else weights_only)


def checkpoint_epoch(path: str | os.PathLike) -> int | None:
    """The 0-based epoch a Lightning checkpoint was saved in (its file name's number), read
    with ``weights_only=True``; ``None`` when the file does not record one."""
    epoch = torch.load(path, map_location="cpu", weights_only=True).get("epoch")
    return int(epoch) if epoch is not None else None
