"""From a trained model to maps: scenes, labelled tiles cut from them, sliding-window prediction
(with a checkpoint, or an exported ONNX model without torch), change maps of two dates, and
class areas with confidence intervals from a reference sample.

Public names import from the package (``from deforest.mapping import Scene``) and resolve on first
use (:mod:`deforest.core.lazy`), so importing one light module does not load torch.
"""

from deforest.core.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "scene": ("Scene",),
    "labelling": ("RasterLabels", "VectorLabels"),
    "tiling": ("tile_scene",),
    "predict": ("load_classifier", "predict_scene", "predict_tiles"),
    "writer": ("MapWriter",),
    "change": ("PairScene", "change_map", "predict_change"),
    "area": ("AreaEstimate", "estimate_area"),
    "strata": ("MapStrata",),
    "sampling_design": ("draw_sample",),
    "export": ("read_metadata",),
    "serve": ("load_model",),
})
