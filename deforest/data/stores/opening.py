"""The store the ``data`` settings name: tile files through their layout, a local pack, or a pack
in object storage (``s3://...``)."""

from __future__ import annotations

from deforest.data.layouts import TileLayout
from deforest.data.settings import StoreSettings
from deforest.data.stores.base import TileStore
from deforest.data.stores.files import FileStore
from deforest.data.stores.pack import PackedLayout, PackStore


def open_store(layout: TileLayout | None, settings: StoreSettings) -> TileStore:
    """``settings.packed`` when given (it stands alone: ``layout`` may be ``None``), else the
    files of ``layout``."""
    if settings.packed:
        return open_pack(settings.packed, settings.cache_dir, settings.cache_chunks)
    if layout is None:
        raise ValueError("a layout or data.packed is needed")
    return FileStore(layout, settings.cache_dir)


def open_pack(path: str, cache_dir: str | None = None, cache_chunks: bool = True) -> PackStore:
    """The pack at a local folder, or at an object-store URL (the ``stream`` extra;
    ``cache_chunks``: see :class:`deforest.data.stores.remote.ChunkCache`)."""
    if "://" in str(path):
        from deforest.data.stores.remote import RemotePack, RemotePackStore  # zarr and s3fs only when used

        return RemotePackStore(RemotePack(str(path), cache_dir, cache_chunks))
    return PackStore(PackedLayout(path))
