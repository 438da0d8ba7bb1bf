"""Recycled batch memory: a packed batch is copied into a buffer nobody else holds any more.

Copying a batch out of a pack's memory map runs at memory speed only into memory the
process has already touched: a freshly allocated 7 MB tensor per batch of 64 EuroSAT tiles
costs a page fault per 4 kB and runs at a third of that speed (benchmarks/README.md). The
pool hands out views of its buffers and reuses a buffer only once every view, tensor and
NumPy array made from it is gone (its storage's use count is back to the pool's own), so a
caller that keeps a batch never sees it overwritten: the next batch gets another buffer.
"""

from __future__ import annotations

import math

import torch

#: dtypes a batch travels in: the integer ones float32 holds exactly, and float32
TORCH_DTYPES = {"uint8": torch.uint8, "int8": torch.int8, "uint16": torch.uint16, "int16": torch.int16,
                "float32": torch.float32}
#: buffers kept: the batch in training, Lightning's batch of look-ahead, and spares
POOL_SIZE = 4


def storage_users(tensor: torch.Tensor) -> int | None:
    """Tensors (views included) and NumPy arrays holding ``tensor``'s memory; None where this
    torch does not tell (then no buffer is ever reused)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else int(count(tensor.untyped_storage()._cdata))


class BatchBuffers:
    """Up to :data:`POOL_SIZE` reusable buffers of the latest shape and dtype asked for."""

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        #: the use count of a buffer only the pool holds (as :func:`storage_users` sees it)
        self._alone: int | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A view of a tensor of ``shape`` and ``dtype`` no one else holds (contents undefined)."""
        self._buffers = [b for b in self._buffers if b.shape == shape and b.dtype == dtype]
        for buffer in self._buffers:
            if self._alone is not None and storage_users(buffer) == self._alone:
                return buffer.view(shape)
        buffer = torch.empty(shape, dtype=dtype)
        self._alone = storage_users(buffer)  # before any view of it exists
        if self._alone is not None and len(self._buffers) < POOL_SIZE:
            self._buffers.append(buffer)
        return buffer.view(shape)

    def __getstate__(self) -> dict:
        return {"_buffers": [], "_alone": None}  # a DataLoader worker starts its own pool


def batch_tensor(shape: tuple[int, ...], dtype: torch.dtype, buffers: BatchBuffers | None) -> torch.Tensor:
    """Memory for one batch: in a DataLoader worker, shared memory the main process maps as it
    is (as ``default_collate`` allocates it); else a recycled buffer of ``buffers``."""
    if torch.utils.data.get_worker_info() is not None:
        numel = math.prod(shape)
        storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
    return buffers.take(shape, dtype) if buffers is not None else torch.empty(shape, dtype=dtype)
