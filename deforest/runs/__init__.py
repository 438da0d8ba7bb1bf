"""What a run is made of and leaves behind: building the datamodule, model and trainer from the
Hydra config, config checks, callbacks, the report and its figures, and reading sweeps back
for comparison.

Public names import from the package (``from deforest.runs import build_datamodule``) and resolve on first
use (:mod:`deforest.core.lazy`), so importing one light module does not load torch.
"""

from deforest.core.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "build": ("build_datamodule", "build_model", "build_trainer"),
    "callbacks": ("ClassDistribution", "SaveOnSigterm"),
    "report": ("report_on_split", "write_report"),
    "predictions": ("Evaluation",),
    "sweeps": ("SweepSummary", "collect_runs"),
    "compare": ("compare_runs", "write_comparison"),
    "config_checks": ("check_ranges",),
})
