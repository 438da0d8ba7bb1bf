"""Where tiles come from: tile files, a local pack, a pack in object storage (one interface,
:class:`TileStore`), and the pack format.

Public names import from the package (``from deforest.data.stores import TileStore``) and resolve on first
use (:mod:`deforest.core.lazy`), so importing one light module does not load torch.
"""

from deforest.core.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "base": ("TileStore", "ScanRequest", "HeaderCheck", "BandSummary", "REFERENCE_SAMPLE"),
    "files": ("FileStore",),
    "pack": ("PackStore", "PackedLayout", "PackedTileDataset"),
    "remote": ("RemotePack", "RemotePackStore", "ChunkCache", "upload_pack"),
    "streaming": ("StreamedSplit",),
    "packing": ("pack_dataset", "check_pack", "PackResult"),
    "opening": ("open_store", "open_pack"),
    "format": ("read_record", "is_pack", "PACK_VERSION"),
})
