"""Networks: backbones with a band-count stem, the band-statistics head, the siamese two-date
network, pretrained weights mapped onto the data's bands, and backbone fine-tuning.

Public names import from the package (``from deforest.models import build_backbone``) and resolve on first
use (:mod:`deforest.core.lazy`), so importing one light module does not load torch.
"""

from deforest.core.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "networks": ("build_backbone", "BACKBONES", "FUSIONS", "BandStatistics", "SiameseNetwork", "SmallCNN", "backbone_modules", "backbone_names", "build_siamese", "smallest_tile"),
    "weights": ("PretrainedWeights", "WeightsError", "band_plan", "input_normalization", "load_pretrained", "resolve_weights"),
    "finetuning": ("BackboneFinetuning",),
})
