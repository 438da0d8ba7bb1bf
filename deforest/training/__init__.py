"""Training: the classifier task (:class:`TileClassifier`) and the parts it is built from:
losses and batch weights, settings, evaluation (metrics, thresholds, calibration), the
non-finite-loss policy, optimization, and safe checkpoints.

Public names import from the package (``from deforest.training import TileClassifier``) and resolve on first
use (:mod:`deforest.core.lazy`), so importing one light module does not load torch.
"""

from deforest.core.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "module": ("TileClassifier",),
    "settings": ("EvaluationSettings", "NetworkSettings", "OptimizationSettings"),
    "losses": ("Criterion", "DynamicWeightedLoss", "EmaOptions", "MULTILABEL_ONLY", "NORMALIZATIONS", "SCHEMES"),
    "batch_weights": ("batch_class_counts", "class_weights", "label_weights"),
    "evaluation": ("EpochEvaluator", "gather_predictions"),
    "nonfinite": ("NonFinitePolicy",),
    "optimization": ("build_optimization",),
    "loading": ("load_classifier",),
    "checkpoints": ("AtomicCheckpointIO", "checkpoint_problem", "read_checkpoint"),
    "metrics": ("compute_metrics", "decide"),
    "thresholds": ("ThresholdTuner", "tune_thresholds"),
    "calibration": ("apply_calibration", "calibration_errors", "fit_calibration"),
})
