"""Figures for run directories, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from deforest.core.outputs import atomic_output  # noqa: E402


def class_distribution_figure(counts: Mapping[str, Mapping[str, int]]) -> plt.Figure:
    """Grouped bars: tiles per class for each split; the legend sits outside the axes, so it
    never covers a bar."""
    splits = list(counts)
    classes = list(next(iter(counts.values())))
    x = np.arange(len(classes))
    width = 0.8 / max(len(splits), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(classes) + 2) + 1.2, 4), dpi=100)
    for i, split in enumerate(splits):
        ax.bar(x + i * width, [counts[split][c] for c in classes], width, label=split)
    ax.set_xticks(x + width * (len(splits) - 1) / 2)
    ax.set_xticklabels([c[:24] for c in classes], rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("class")
    ax.set_ylabel("tiles")
    ax.set_title("Class distribution per split")
    ax.legend(title="split", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def plot_class_distribution(counts: Mapping[str, Mapping[str, int]], path: str | Path) -> Path:
    """:func:`class_distribution_figure`, saved as a PNG."""
    return _save(class_distribution_figure(counts), path)


def _grid(n: int, max_cols: int) -> tuple[int, int]:
    cols = max(1, min(max_cols, n))
    return (n + cols - 1) // cols, cols


def _save(fig: plt.Figure, path: str | Path) -> Path:
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    try:
        # whole or not at all: a full disk leaves no truncated PNG under the final name
        with atomic_output(path, Path(path).suffix) as tmp:
            fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or None)
    finally:
        plt.close(fig)
    return Path(path)


def plot_confusion_matrix(counts: np.ndarray, normalized: np.ndarray, class_names: list[str], path: str | Path) -> Path:
    """Counts and row-normalised (recall per true class) matrices side by side."""
    n = len(class_names)
    side = max(4.0, 0.45 * n + 2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side, side), dpi=100)
    for ax, matrix, title, fmt in ((axes[0], counts, "counts", "{:.0f}"), (axes[1], normalized, "normalised by row", "{:.2f}")):
        shown = ax.imshow(matrix, cmap="Blues", vmin=0)
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
        if n <= 20:
            top = matrix.max() or 1
            for (i, j), value in np.ndenumerate(matrix):
                ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=7,
                        color="white" if value > 0.6 * top else "black")
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xticklabels([c[:20] for c in class_names], rotation=60, ha="right", fontsize=7)
        ax.set_yticklabels([c[:20] for c in class_names], fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"Confusion matrix ({title})")
    return _save(fig, path)


def plot_label_confusion(matrices: np.ndarray, class_names: list[str], path: str | Path) -> Path:
    """Multi-label: each label's TP/FN/FP/TN counts, one row per label (normalised colour per row)."""
    # torchmetrics' multilabel confusion matrix is [[TN, FP], [FN, TP]] per label
    table = np.stack([matrices[:, 1, 1], matrices[:, 1, 0], matrices[:, 0, 1], matrices[:, 0, 0]], axis=1)
    shade = table / np.maximum(table.sum(axis=1, keepdims=True), 1)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.3 * n + 1.5)), dpi=100)
    ax.imshow(shade, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for (i, j), value in np.ndenumerate(table):
        ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(4))
    ax.set_xticklabels(["TP", "FN", "FP", "TN"])
    ax.set_yticks(range(n))
    ax.set_yticklabels([c[:40] for c in class_names], fontsize=7)
    ax.set_title("Per-label confusion (tiles)")
    return _save(fig, path)


def plot_pr_curves(
    curves: list[tuple[np.ndarray, np.ndarray]], scores: list[float], class_names: list[str], path: str | Path
) -> Path:
    """One precision-recall panel per class, titled with its average precision."""
    rows, cols = _grid(len(class_names), 5)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.4 * rows), dpi=100, squeeze=False)
    for ax in axes.flat[len(class_names):]:
        ax.axis("off")
    for ax, (precision, recall), ap, name in zip(axes.flat, curves, scores, class_names):
        ax.plot(recall, precision)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{name[:22]}\nAP {ap:.3f}", fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_xlabel("recall", fontsize=7)
        ax.set_ylabel("precision", fontsize=7)
    return _save(fig, path)


def plot_reliability(confidence: np.ndarray, correct: np.ndarray, path: str | Path, title: str, bins: int = 15) -> Path:
    """A reliability diagram: per equal-width confidence bin, the observed rate of being right
    (bars) against the diagonal of perfect calibration, with the bins' tile counts below."""
    confidence, correct = np.asarray(confidence, np.float64).ravel(), np.asarray(correct, np.float64).ravel()
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    observed = np.bincount(which, weights=correct, minlength=bins) / np.maximum(counts, 1)
    mean_conf = np.bincount(which, weights=confidence, minlength=bins) / np.maximum(counts, 1)
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(4.2, 5.2), dpi=100, sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    centers, width = (edges[:-1] + edges[1:]) / 2, 1.0 / bins
    seen = counts > 0
    ax.bar(centers[seen], observed[seen], width=width * 0.9, color="tab:blue", alpha=0.8, label="observed")
    ax.plot(mean_conf[seen], mean_conf[seen], "o", color="tab:red", markersize=3, label="mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("observed frequency", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax_n.bar(centers, counts, width=width * 0.9, color="tab:grey")
    ax_n.set_yscale("symlog")
    ax_n.set_xlabel("predicted probability", fontsize=8)
    ax_n.set_ylabel("count", fontsize=8)
    return _save(fig, path)


TRAIN_LOSS = "train/loss_epoch"


def training_curves_figure(epochs: Mapping[str, Mapping[int, float]], tested_epoch: int | None = None) -> plt.Figure:
    """Per-epoch series in three panels: the training loss (weighted by the batch class
    weights, so on its own scale), the validation loss (unweighted) and the validation
    scores. Epochs are numbered from 0, as in checkpoint names and ``csv/metrics.csv``; a
    dashed line marks ``tested_epoch``, the checkpoint the test metrics come from."""
    panels = (
        ({k: v for k, v in epochs.items() if k == TRAIN_LOSS}, "training loss (batch-weighted)", "loss"),
        ({k: v for k, v in epochs.items() if k == "val/loss"}, "validation loss (unweighted)", "loss"),
        ({k: v for k, v in epochs.items() if not k.endswith("loss") and k != TRAIN_LOSS}, "validation scores", "score"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=100)
    for ax, (series, title, ylabel) in zip(axes, panels):
        for name, points in series.items():
            ax.plot(list(points), list(points.values()), marker="o", markersize=3, label=name)
        if tested_epoch is not None:
            ax.axvline(tested_epoch, color="0.3", linestyle="--", linewidth=1, label=f"tested checkpoint (epoch {tested_epoch})")
        ax.set_xlabel("epoch (from 0, as in checkpoint names)")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        if series or tested_epoch is not None:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_training_curves(
    epochs: Mapping[str, Mapping[int, float]], path: str | Path, tested_epoch: int | None = None
) -> Path:
    """:func:`training_curves_figure`, saved as a PNG."""
    return _save(training_curves_figure(epochs, tested_epoch), path)


def quicklook(image: np.ndarray, low: float = 2, high: float = 98) -> np.ndarray:
    """``[C, H, W]`` (1 or 3 bands) to an ``[H, W, 3]`` picture in [0, 1], each band stretched
    between its ``low`` and ``high`` percentiles of finite pixels."""
    bands = image if image.shape[0] == 3 else np.repeat(image[:1], 3, axis=0)
    out = np.zeros(bands.shape, np.float32)
    for i, band in enumerate(bands):
        finite = band[np.isfinite(band)]
        if finite.size == 0:
            continue
        lo, hi = np.percentile(finite, [low, high])
        out[i] = np.clip((band - lo) / (hi - lo), 0, 1) if hi > lo else 0.5
    return np.nan_to_num(out).transpose(1, 2, 0)


def plot_examples(pictures: list[np.ndarray], captions: list[str], wrong: list[bool], path: str | Path) -> Path:
    """A grid of quicklooks with captions; wrong predictions get a red frame and caption."""
    rows, cols = _grid(len(pictures), 6)
    caption_lines = max((c.count("\n") + 1 for c in captions), default=1)
    fig, axes = plt.subplots(
        rows, cols, figsize=(2.4 * cols, (2.2 + 0.13 * caption_lines) * rows), dpi=100, squeeze=False, layout="constrained"
    )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.flat[len(pictures):]:
        ax.axis("off")
    for ax, picture, caption, bad in zip(axes.flat, pictures, captions, wrong):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(caption, fontsize=6.5, color="red" if bad else "black", loc="left")
        for spine in ax.spines.values():
            spine.set_edgecolor("red" if bad else "0.6")
            spine.set_linewidth(3 if bad else 0.5)
    return _save(fig, path)
