"""The ground floor: the input contract, the shared vocabulary and errors, nodata and band-name
rules, and the run-safety utilities (atomic outputs, locks, paths, CPU threads, progress).
Imports nothing of deforest's other packages.

Public names import from the package (``from deforest.core import InputSpec``) and resolve on first
use (:mod:`deforest.core.lazy`), so importing one light module does not load torch.
"""

from deforest.core.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "contract": ("InputSpec", "Normalization", "SplitRecord", "untrained_spec"),
    "vocabulary": ("CONFIG_PATH", "MULTICLASS", "MULTILABEL", "POLICIES", "SPLITS", "TASKS", "TIFF_SUFFIXES"),
    "errors": ("ConfigError", "DatasetError", "TileError"),
    "nodata": ("fill_nodata", "is_nodata", "valid_pixels"),
    "bands": ("canonical_band", "match_band_names"),
    "safety": ("CheckpointError", "RunDirLocked", "RunInterrupted", "UnsafeCheckpointError", "RunLock", "run_dir_lock"),
    "outputs": ("OutputError", "atomic_output", "check_outputs", "write_text_output"),
})
