"""The run report: ``report.md`` with metric tables and PNG figures, plus ``predictions.csv``
(:mod:`deforest.runs.predictions`).

Training and ``deforest-eval`` both end here, so a user reads the same page whichever made
it. Every number is recomputed with :func:`deforest.training.metrics.compute_metrics` from the
predictions written beside it, so the page can be checked against them.
"""

from __future__ import annotations

import base64
import csv
import html
import logging
import re
import textwrap
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import markdown
import matplotlib.image
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from torch import Tensor
from torchmetrics.classification import MulticlassPrecisionRecallCurve, MultilabelPrecisionRecallCurve
from torchmetrics.functional.classification import multiclass_average_precision, multilabel_average_precision

from deforest.core.bands import canonical_band
from deforest.core.contract import InputSpec
from deforest.core.errors import TileError
from deforest.core.outputs import write_text_output
from deforest.core.vocabulary import MULTICLASS, MULTILABEL
from deforest.data.datamodule import TileDataModule
from deforest.data.io import resolve_bands
from deforest.runs.plots import (
    plot_class_distribution,
    plot_confusion_matrix,
    plot_examples,
    plot_label_confusion,
    plot_pr_curves,
    plot_reliability,
    plot_training_curves,
    quicklook,
)
from deforest.runs.predictions import Evaluation, decisions, label_names, write_predictions, wrong_rows
from deforest.training.metrics import compute_metrics, flatten_metrics
from deforest.training.module import TileClassifier

log = logging.getLogger(__name__)

TRUE_COLOUR = ("B04", "B03", "B02")
HEADLINE = {
    MULTICLASS: ("accuracy", "balanced_accuracy", "kappa", "f1_macro", "f1_weighted", "ece"),
    MULTILABEL: ("f1_micro", "f1_macro", "f2", "map", "hamming_loss", "ece", "ece_macro"),
}


HTML_STYLE = (
    "<style>body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
    "td:first-child{text-align:left}img{max-width:100%}</style>"
)


def rgb_bands(configured: Sequence[int | str] | None, band_names: Sequence[str] | None, count: int) -> list[int]:
    """1-based bands for true-colour quicklooks: the configured ones, else B04/B03/B02 when the
    sensor's band names have them, else the first three bands (one band: grey)."""
    if configured:
        indexes = resolve_bands(list(configured), band_names, count)
        if len(indexes) not in (1, 3):
            raise ValueError(f"report.rgb_bands takes 1 or 3 bands, got {list(configured)}")
        return indexes
    canonical = [canonical_band(name) for name in band_names or []]
    if set(TRUE_COLOUR) <= set(canonical):
        return [canonical.index(b) + 1 for b in TRUE_COLOUR]
    return [1, 2, 3] if count >= 3 else [1]


def _text(value: object) -> str:
    """Untrusted text (class and label names, paths) as literal markdown: ``<`` ``>`` ``&`` as
    entities, and the characters that make code spans, links or table cells backslash-escaped,
    so a label ``<script>...`` reads as text in ``report.md`` and in ``report.html``."""
    return re.sub(r"([\\`|\[\]])", r"\\\1", html.escape(str(value), quote=False))


def _detail(detail: str) -> str:
    """A detail line whose ```code``` spans stay code (where markdown escapes everything) and whose
    other text goes through :func:`_text`."""
    parts = detail.split("`")
    if len(parts) % 2 == 0:  # an unbalanced backtick: all of it as text
        return _text(detail)
    return "`".join(part if i % 2 else _text(part) for i, part in enumerate(parts))


def _html(text: str, figures: Mapping[str, Path]) -> str:
    """``report.md`` as one self-contained page (figures inlined), to mail or attach.

    Raw HTML in the markdown is not passed through (it is shown as text): the page holds
    names that come from data files.
    """
    converter = markdown.Markdown(extensions=["tables"])
    converter.preprocessors.deregister("html_block")
    converter.inlinePatterns.deregister("html")
    body = converter.convert(text)
    for path in figures.values():
        encoded = base64.b64encode(path.read_bytes()).decode()
        body = body.replace(f'src="{path.name}"', f'src="data:image/png;base64,{encoded}"')
    return f"<!doctype html><html><head><meta charset=\"utf-8\"><title>deforest report</title>{HTML_STYLE}</head><body>{body}</body></html>\n"


def write_report(
    output_dir: str | Path, run: Evaluation, examples: int = 18, seed: int = 0
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Write ``report.md`` (and ``report.html``), its PNGs and ``predictions.csv``; return the metrics for
    ``metrics.json`` and the figures by name.

    Multi-label metrics are given at the model's (tuned) thresholds under ``<split>/`` and at
    0.5 under ``<split>@0.5/``.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    c = len(run.class_names)
    tuned = compute_metrics(run.task, c, run.probs, run.target, run.thresholds)
    record: dict[str, Any] = flatten_metrics(tuned, run.class_names, run.split)
    record[f"{run.split}/confusion_matrix"] = tuned["confusion_matrix"].long().tolist()
    at_half = None
    if run.task != MULTICLASS:
        at_half = compute_metrics(run.task, c, run.probs, run.target, torch.full((c,), 0.5))
        record.update(flatten_metrics(at_half, run.class_names, f"{run.split}@0.5"))
        record.update({f"thresholds/{n}": float(t) for n, t in zip(run.class_names, run.thresholds)})

    figures = {"confusion_matrix": _confusion_figure(run, tuned, out / "confusion_matrix.png")}
    figures["pr_curves"] = _pr_figure(run, out / "pr_curves.png")
    figures["reliability"] = _reliability_figure(run, tuned, out / "reliability.png")
    if run.split_counts:
        figures["class_distribution"] = plot_class_distribution(run.split_counts, out / "class_distribution.png")
    curves = _epoch_series(run.csv_log) if run.csv_log and run.csv_log.is_file() else {}
    if curves:
        figures["training_curves"] = plot_training_curves(curves, out / "training_curves.png", run.tested_epoch)
    figures["examples"] = _examples_figure(run, examples, seed, out / "examples.png")
    write_predictions(run, out / "predictions.csv")
    text = _markdown(run, tuned, at_half, figures)
    write_text_output(out / "report.md", text)
    write_text_output(out / "report.html", _html(text, figures))
    log.info("report written to %s", out / "report.md")
    return record, figures


def report_on_split(
    model: TileClassifier,
    datamodule: TileDataModule,
    split: str,
    output_dir: str | Path,
    options: Mapping[str, Any],
    loggers: Sequence[Logger] = (),
    details: Sequence[str] = (),
    csv_log: Path | None = None,
    tested_epoch: int | None = None,
) -> dict[str, Any]:
    """The report on the predictions of ``model``'s last test run over ``datamodule``'s ``split``.

    ``options`` is the ``report`` config (``rgb_bands``, ``examples``); the CSV log for the
    training curves is the CSV logger's unless ``csv_log`` is given; ``tested_epoch`` (the
    checkpoint's epoch) is marked on them. Figures also go to TensorBoard loggers. Returns
    the metrics for ``metrics.json``.
    """
    predictions = model.predictions.get("test")
    if predictions is None or len(predictions["index"]) == 0:
        log.warning("no predictions on the %s split: no report written", split)
        return {}
    spec = model.input_spec
    dataset, layout = datamodule.datasets[split], datamodule.layout
    count = datamodule.source_band_count
    bands = rgb_bands(options.get("rgb_bands"), layout.band_names, count)
    for logger in loggers:
        if isinstance(logger, CSVLogger) and csv_log is None:
            csv_log = Path(logger.experiment.metrics_file_path)
    run = Evaluation(
        task=spec.task,
        class_names=spec.class_names,
        probs=predictions["probs"].float(),
        target=predictions["target"],
        thresholds=torch.as_tensor(spec.decision_thresholds()),
        sources=[dataset.sources[i] for i in predictions["index"].tolist()],
        read_rgb=lambda source: layout.read(source, bands),
        split=split,
        split_counts=datamodule.split_counts(),
        csv_log=csv_log,
        details=[*details, f"quicklook bands: {bands}", _contract_line(spec)],
        tested_epoch=tested_epoch,
    )
    record, figures = write_report(output_dir, run, examples=int(options.get("examples", 18)))
    log_figures(loggers, figures)
    return record


def _contract_line(spec: InputSpec) -> str:
    """The model's input contract in one line of the report."""
    norm = spec.normalization
    split = f", split {spec.split.kind} `{spec.split.digest}`" if spec.split else ""
    return (f"input: bands {spec.band_names or spec.bands} of {spec.source.band_count} ({spec.source.dtype}), "
            f"{spec.tile_size[0]}x{spec.tile_size[1]} px, nodata {spec.nodata} filled, "
            f"{norm.transform} normalisation ({norm.source}){split}")


def log_figures(loggers: Sequence[Logger], figures: Mapping[str, str | Path], step: int = 0) -> None:
    """Send the report's PNGs to every TensorBoard logger, under ``report/<name>``."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            for name, path in figures.items():
                image = matplotlib.image.imread(path)[..., :3]
                logger.experiment.add_image(f"report/{name}", image, step, dataformats="HWC")
            logger.experiment.flush()


# ---- figures ----------------------------------------------------------------------------
def _confusion_figure(run: Evaluation, values: dict[str, Tensor], path: Path) -> Path:
    if run.task == MULTICLASS:
        return plot_confusion_matrix(
            values["confusion_matrix"].numpy(), values["confusion_matrix_normalized"].numpy(), run.class_names, path
        )
    return plot_label_confusion(values["confusion_matrix"].numpy(), run.class_names, path)


def _pr_figure(run: Evaluation, path: Path) -> Path:
    c = len(run.class_names)
    if run.task == MULTICLASS:
        curve = MulticlassPrecisionRecallCurve(c, thresholds=None)
        target = run.target
    else:
        curve = MultilabelPrecisionRecallCurve(c, thresholds=None)
        target = run.target.long()
    precision, recall, _ = curve(run.probs, target)
    ap = _average_precision(run)
    return plot_pr_curves([(p.numpy(), r.numpy()) for p, r in zip(precision, recall)], ap, run.class_names, path)


def _reliability_figure(run: Evaluation, values: dict[str, Tensor], path: Path) -> Path:
    """Multi-class: the top-label confidence against being right; multi-label: every
    label-tile probability against the label being present (the pairs ``ece`` pools)."""
    if run.task == MULTICLASS:
        confidence, predicted = run.probs.max(dim=1)
        correct = predicted == run.target
        title = f"top-label reliability, ECE {float(values['ece']):.3f}"
    else:
        confidence, correct = run.probs, run.target.bool()
        title = f"label-tile reliability, ECE {float(values['ece']):.3f} (macro {float(values['ece_macro']):.3f})"
    return plot_reliability(confidence.float().numpy(), correct.numpy(), path, title)


def _average_precision(run: Evaluation) -> list[float]:
    c = len(run.class_names)
    if run.task == MULTICLASS:
        return multiclass_average_precision(run.probs, run.target, c, average="none").tolist()
    return multilabel_average_precision(run.probs, run.target.long(), c, average="none").tolist()


def _epoch_series(csv_log: Path) -> dict[str, dict[int, float]]:
    """Epoch-level series from a Lightning CSV log (the last value logged in each epoch)."""
    wanted = ("train/loss_epoch", "val/loss", "val/accuracy", "val/f1_macro", "val/f1_micro", "val/map", "val/f2")
    series: dict[str, dict[int, float]] = defaultdict(dict)
    with csv_log.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if not row.get("epoch"):
                continue
            for name in wanted:
                if row.get(name):
                    series[name][int(float(row["epoch"]))] = float(row[name])
    return dict(series)


def _examples_figure(run: Evaluation, count: int, seed: int, path: Path) -> Path:
    """Up to half the tiles wrong (when there are that many), the rest right, seeded."""
    predicted, target = decisions(run), run.target.numpy()
    wrong = wrong_rows(run, predicted)
    rng = np.random.default_rng(seed)
    bad, good = np.flatnonzero(wrong), np.flatnonzero(~wrong)
    n_bad = min(len(bad), max(count // 2, count - len(good)))
    chosen = np.concatenate([rng.permutation(bad)[:n_bad], rng.permutation(good)[: count - n_bad]])
    chosen = np.sort(chosen)
    pictures, captions = [], []
    for row in chosen:
        try:
            pictures.append(quicklook(run.read_rgb(run.sources[row])))
        except TileError as err:
            raise TileError(run.sources[row], f"quicklook for the report failed: {err}") from None
        mark = "[WRONG] " if wrong[row] else ""
        captions.append(_wrap(f"{mark}true: {label_names(run, row, target)}") + "\n" + _wrap(f"pred: {label_names(run, row, predicted)}"))
    return plot_examples(pictures, captions, wrong[chosen].tolist(), path)


def _wrap(text: str, width: int = 34, lines: int = 3) -> str:
    return "\n".join(textwrap.wrap(text, width, max_lines=lines, placeholder=" ..."))


# ---- markdown ---------------------------------------------------------------------------
def _markdown(run: Evaluation, tuned: dict[str, Tensor], at_half: dict[str, Tensor] | None, figures: dict[str, Path]) -> str:
    support = run.target.sum(dim=0) if run.task != MULTICLASS else torch.bincount(run.target, minlength=len(run.class_names))
    names = [_text(n) for n in run.class_names]
    split = _text(run.split)
    lines = [f"# deforest report: {split} split", "", *(f"- {_detail(d)}" for d in run.details),
             f"- {split} tiles: {len(run.sources)}, task: {_text(run.task)}, classes: {len(run.class_names)}", ""]
    lines += ["## Metrics", ""]
    if at_half is None:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {name} | {float(tuned[name]):.4f} |" for name in HEADLINE[run.task]]
    else:
        lines += ["| metric | tuned thresholds | threshold 0.5 |", "|---|---|---|"]
        lines += [f"| {name} | {float(tuned[name]):.4f} | {float(at_half[name]):.4f} |" for name in HEADLINE[run.task]]
    lines += ["", "## Per class", ""]
    if run.task == MULTICLASS:
        lines += ["| class | support | precision (user's accuracy) | recall (producer's accuracy) | F1 |", "|---|---|---|---|---|"]
        columns = ("precision", "recall", "f1")
    else:
        lines += ["| label | support | threshold | precision | recall | F1 | F1 at 0.5 | AP | AUROC |",
                  "|---|---|---|---|---|---|---|---|---|"]
        columns = ("threshold", "precision", "recall", "f1", "f1@0.5", "ap", "auroc")
    for i, name in enumerate(names):
        cells = []
        for column in columns:
            if column == "threshold":
                value = run.thresholds[i]
            elif column == "f1@0.5":
                value = at_half["f1"][i]
            else:
                value = tuned[column][i]
            cells.append(f"{float(value) + 0.0:.4f}")  # + 0.0: no "-0.0000"
        lines.append(f"| {name} | {int(support[i])} | " + " | ".join(cells) + " |")
    lines += ["", "## Confusion matrix", "", f"![confusion matrix]({figures['confusion_matrix'].name})", ""]
    if run.task == MULTICLASS and len(run.class_names) <= 20:
        matrix = tuned["confusion_matrix"].long()
        lines += ["Rows are true classes, columns predicted ones (counts).", "",
                  "| true \\ predicted | " + " | ".join(names) + " |",
                  "|---" * (len(run.class_names) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(str(int(v)) for v in matrix[i]) + " |" for i, name in enumerate(names)]
        lines.append("")
    sections = (("pr_curves", "Precision-recall curves"), ("reliability", "Reliability diagram"),
                ("class_distribution", "Class distribution"),
                ("training_curves", "Training curves"), ("examples", f"Example {split} tiles (wrong ones in red)"))
    for key, title in sections:
        lines += [f"## {title}", ""]
        lines.append(f"![{title.lower()}]({figures[key].name})" if key in figures else "_not available for this run_")
        lines.append("")
    lines += ["Per-tile predictions: `predictions.csv`; all numbers: `metrics.json`.", ""]
    return "\n".join(lines)
