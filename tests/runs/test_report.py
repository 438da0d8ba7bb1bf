"""The run report and deforest-eval, on short real trainings (EuroSAT sample, BigEarthNet)."""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from lightning.pytorch.callbacks import RichProgressBar
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCohenKappa,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MultilabelAveragePrecision,
    MultilabelF1Score,
    MultilabelHammingDistance,
)

from deforest.cli.eval import evaluate
from deforest.cli.train import train
from deforest.core.errors import DatasetError
from deforest.core.progress import LineProgress, progress_callbacks
from deforest.runs.build import build_datamodule
from deforest.training.module import TileClassifier
from deforest.training.thresholds import cross_fitted_thresholds, tune_thresholds
from tests.conftest import REPO, compose_train_config

PNGS = ("confusion_matrix", "pr_curves", "reliability", "class_distribution", "training_curves", "examples")


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _train(run_dir: Path, overrides: list[str]) -> tuple[dict, list[str]]:
    """Train with the plain progress lines on (pytest's stdout is no terminal); return metrics and lines."""
    lines = _Lines()
    logger = logging.getLogger("deforest.core.progress")
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    try:
        metrics = train(compose_train_config(run_dir, ["trainer.enable_progress_bar=true", *overrides]))
    finally:
        logger.removeHandler(lines)
    return metrics, lines.lines


@pytest.fixture(scope="module")
def eurosat_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eurosat_run")
    metrics, lines = _train(run_dir, ["trainer.max_epochs=2", "+trainer.limit_train_batches=3", "logger=many"])
    return run_dir, metrics, lines


@pytest.fixture(scope="module")
def bigearthnet_run(tmp_path_factory, bigearthnet_root):
    run_dir = tmp_path_factory.mktemp("bigearthnet_run")
    data = ["data=bigearthnet", f"data.root={bigearthnet_root}"]
    metrics, _ = _train(run_dir, [*data, "trainer.max_epochs=2", "tune_thresholds=f1"])
    return run_dir, metrics, data


def _predictions(run_dir: Path, class_names: list[str]) -> tuple[torch.Tensor, list[dict]]:
    with (run_dir / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    probs = torch.tensor([[float(row[f"p:{c}"]) for c in class_names] for row in rows])
    return probs, rows


def _report_row(report: str, first_cell: str) -> list[str]:
    match = re.search(rf"^\| {re.escape(first_cell)} \| (.*) \|$", report, re.MULTILINE)
    assert match, f"no row {first_cell!r} in report.md"
    return [cell.strip() for cell in match.group(1).split("|")]


def test_report_numbers_equal_torchmetrics_on_the_predictions(eurosat_run):
    run_dir, metrics, _ = eurosat_run
    model = TileClassifier.load_from_checkpoint(metrics["best_checkpoint"], map_location="cpu")
    names = model.class_names
    probs, rows = _predictions(run_dir, names)
    target = torch.tensor([names.index(row["true"]) for row in rows])
    assert len(rows) == 54 and all(row["predicted"] == names[int(p.argmax())] for row, p in zip(rows, probs))
    direct = {
        "accuracy": MulticlassAccuracy(10, average="micro")(probs, target),
        "balanced_accuracy": MulticlassAccuracy(10, average="macro")(probs, target),
        "kappa": MulticlassCohenKappa(10)(probs, target),
        "f1_macro": MulticlassF1Score(10, average="macro")(probs, target),
        "f1_weighted": MulticlassF1Score(10, average="weighted")(probs, target),
    }
    written = json.loads((run_dir / "metrics.json").read_text())
    report = (run_dir / "report.md").read_text()
    for name, value in direct.items():
        assert written[f"test/{name}"] == pytest.approx(float(value), abs=1e-6), name
        assert _report_row(report, name) == [f"{float(value):.4f}"]
    precision = MulticlassPrecision(10, average="none")(probs, target)
    for i, name in enumerate(names):
        assert written[f"test/precision/{name}"] == pytest.approx(float(precision[i]), abs=1e-6)
        assert _report_row(report, name)[1] == f"{float(precision[i]):.4f}"
    matrix = MulticlassConfusionMatrix(10)(probs, target)
    assert written["test/confusion_matrix"] == matrix.tolist()
    # Lightning's logged test metrics (the same torchmetrics, batch by batch) agree
    assert metrics["test/accuracy"] == pytest.approx(float(direct["accuracy"]), abs=1e-6)


def test_every_png_opens_with_a_sane_size_and_tensorboard_has_them(eurosat_run):
    run_dir, _, _ = eurosat_run
    report = (run_dir / "report.md").read_text()
    for name in PNGS:
        image = matplotlib.image.imread(run_dir / f"{name}.png")
        height, width = image.shape[:2]
        assert 300 <= width <= 4000 and 250 <= height <= 4000, (name, image.shape)
        assert image[..., :3].std() > 0.01, f"{name}.png is blank"
        assert f"]({name}.png)" in report
    page = (run_dir / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(PNGS) and "<table>" in page
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert {f"report/{name}" for name in PNGS} <= set(events.Tags()["images"])


def test_progress_is_plain_lines_without_a_terminal(eurosat_run):
    _, _, lines = eurosat_run
    epochs = [line for line in lines if line.startswith("epoch ") and " done in " in line]
    assert [line.split()[1] for line in epochs] == ["0/1", "1/1"] and "val/loss=" in epochs[-1]
    assert any(line.startswith("test done") for line in lines)
    bar, shown = progress_callbacks(True, interactive=True)
    assert isinstance(bar[0], RichProgressBar) and shown
    plain, shown = progress_callbacks(True, interactive=False)
    assert isinstance(plain[0], LineProgress) and not shown
    assert progress_callbacks(False) == ([], False)


def _eval_config(run_dir: Path, out: Path, ckpt: str, overrides: list[str] = ()):
    with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
        return compose("eval", overrides=[
            f"paths.root_dir={REPO}", f"paths.output_dir={out}", f"paths.cache_dir={run_dir / 'cache'}",
            f"ckpt_path={ckpt}", "split=test", "trainer.enable_progress_bar=false", *overrides,
        ])


def test_deforest_eval_reproduces_the_training_test_metrics(eurosat_run, tmp_path):
    run_dir, metrics, _ = eurosat_run
    evaluated = evaluate(_eval_config(run_dir, tmp_path, metrics["best_checkpoint"]))
    written = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("test/accuracy", "test/f1_macro", "test/kappa", "test/recall/Forest", "test/loss"):
        assert written[key] == pytest.approx(metrics[key], abs=1e-6), key
    assert evaluated["test/confusion_matrix"] == metrics["test/confusion_matrix"]
    assert (tmp_path / "report.md").is_file() and (tmp_path / "training_curves.png").is_file()


def test_deforest_eval_on_a_test_only_folder(eurosat_run, eurosat_root, tmp_path):
    """A folder holding only test/ tiles: the checkpoint brings statistics, so no train/val needed."""
    run_dir, metrics, _ = eurosat_run
    shutil.copytree(eurosat_root / "test", tmp_path / "data" / "test")
    cfg = _eval_config(run_dir, tmp_path / "out", metrics["best_checkpoint"], [f"data.root={tmp_path / 'data'}"])
    evaluate(cfg)
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for key in ("test/accuracy", "test/f1_macro", "test/recall/Forest"):
        assert written[key] == pytest.approx(metrics[key], abs=1e-6), key


def test_deforest_eval_names_classes_the_checkpoint_does_not_know(eurosat_run, eurosat_root, tmp_path):
    run_dir, metrics, _ = eurosat_run
    tiles = {name: sorted((eurosat_root / "train" / name).glob("*.tif"))[:6] for name in ("Forest", "SeaLake")}
    rows = ["path,labels,split"]
    for name, label in (("Forest", "Forest"), ("SeaLake", "Glacier")):  # SeaLake tiles posing as an unknown class
        rows += [f"{t},{label},{split}" for t, split in zip(tiles[name], ["train"] * 3 + ["val", "test", "test"])]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    other = ["data=manifest", f"data.root={tmp_path}", "data.layout.allow_outside_root=true"]  # the shipped tiles
    with pytest.raises(DatasetError, match=r"none of the 270 tiles of the checkpoint's split is here; .* resplit=true"):
        evaluate(_eval_config(run_dir, tmp_path / "out", metrics["best_checkpoint"], other))
    cfg = _eval_config(run_dir, tmp_path / "out", metrics["best_checkpoint"], [*other, "resplit=true"])
    with pytest.raises(DatasetError, match=r"\['Glacier'\] are not among the checkpoint's classes"):
        evaluate(cfg)


def test_deforest_eval_uses_the_checkpoint_thresholds(bigearthnet_run, tmp_path):
    run_dir, metrics, data = bigearthnet_run
    evaluate(_eval_config(run_dir, tmp_path, metrics["best_checkpoint"], data))
    written = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("test/f1_macro", "test/f1_micro", "test/f2", "test/map", "test@0.5/f1_macro"):
        assert written[key] == pytest.approx(metrics[key], abs=1e-6), key


def test_validation_scores_use_thresholds_tuned_on_other_tiles(bigearthnet_run):
    """The checkpoint keeps the thresholds tuned on all validation tiles; the logged validation
    score (what checkpoints and sweeps select on) scores each tile at thresholds tuned on the
    other half, not the optimistic in-sample score."""
    run_dir, metrics, data = bigearthnet_run
    model = TileClassifier.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", map_location="cpu").eval()
    # the checkpoint's own split: the validation tiles in the order they were scored
    datamodule = build_datamodule(compose_train_config(run_dir, data).data, input_spec=model.input_spec)
    datamodule.setup("fit")
    val = datamodule.datasets["val"]
    with torch.no_grad():
        probs = model.predict_proba(torch.stack([torch.from_numpy(val.read(i)) for i in range(len(val))]))
    target = torch.as_tensor(val.targets).long()
    c = len(model.class_names)
    assert not torch.allclose(model.thresholds, torch.full((c,), 0.5))
    assert torch.allclose(tune_thresholds(probs, target, "f1"), model.thresholds, atol=1e-5)
    f1 = MultilabelF1Score(c, average="macro")
    in_sample = float(f1((probs >= model.thresholds).float(), target))
    held_out = float(f1((probs >= cross_fitted_thresholds(probs, target, "f1")).float(), target))
    assert metrics["val/f1_macro"] == pytest.approx(held_out, abs=1e-6)
    assert in_sample > held_out  # tuning on the scored tiles would have reported more


def test_multilabel_report_shows_tuned_and_half_thresholds(bigearthnet_run):
    run_dir, metrics, _ = bigearthnet_run
    model = TileClassifier.load_from_checkpoint(metrics["best_checkpoint"], map_location="cpu")
    names, c = model.class_names, len(model.class_names)
    probs, rows = _predictions(run_dir, names)
    target = torch.tensor([[int(n in row["true"].split("; ")) for n in names] for row in rows])
    written = json.loads((run_dir / "metrics.json").read_text())
    report = (run_dir / "report.md").read_text()
    decided = (probs >= model.thresholds).float()
    for name, metric in (("f1_macro", MultilabelF1Score(c, average="macro")),
                         ("f1_micro", MultilabelF1Score(c, average="micro")),
                         ("hamming_loss", MultilabelHammingDistance(c))):
        tuned, half = float(metric(decided, target)), float(metric(probs, target))
        assert written[f"test/{name}"] == pytest.approx(tuned, abs=1e-6)
        assert written[f"test@0.5/{name}"] == pytest.approx(half, abs=1e-6)
        assert _report_row(report, name) == [f"{tuned:.4f}", f"{half:.4f}"]
    assert written["test/map"] == pytest.approx(float(MultilabelAveragePrecision(c)(probs, target)), abs=1e-6)
    assert [written[f"thresholds/{n}"] for n in names] == pytest.approx(model.thresholds.tolist())
    assert np.isclose(metrics["test/f1_macro"], written["test/f1_macro"])


def test_eval_prints_its_headline_metrics_like_training(eurosat_run, tmp_path, caplog):
    from deforest.cli.eval import main as eval_main

    run_dir, metrics, _ = eurosat_run
    with caplog.at_level(logging.INFO, logger="deforest.cli.eval"):
        eval_main(_eval_config(run_dir, tmp_path, metrics["best_checkpoint"]))
    written = json.loads((tmp_path / "metrics.json").read_text())
    expected = {k: round(written[k], 4) for k in ("test/accuracy", "test/f1_macro")}
    assert f"metrics: {expected}" in caplog.messages


def test_epochs_are_numbered_alike_in_checkpoints_csv_and_curves(eurosat_run):
    from deforest.runs.plots import training_curves_figure
    from deforest.runs.report import _epoch_series
    from deforest.training.checkpoints import checkpoint_epoch

    run_dir, metrics, _ = eurosat_run
    best = Path(metrics["best_checkpoint"])
    epoch = int(re.fullmatch(r"epoch_(\d{3})\.ckpt", best.name).group(1))
    assert checkpoint_epoch(best) == epoch
    series = _epoch_series(run_dir / "csv" / "metrics.csv")
    assert sorted(series["val/loss"]) == [0, 1] and epoch in series["val/loss"]
    figure = training_curves_figure(series, tested_epoch=epoch)
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["training loss (batch-weighted)", "validation loss (unweighted)", "validation scores"]
    for ax in figure.axes:
        assert ax.get_xlabel().startswith("epoch") and ax.get_ylabel() in ("loss", "score")
        marks = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert len(marks) == 1 and list(marks[0].get_xdata()) == [epoch, epoch]
    labels = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in figure.axes]
    assert labels[0][0] == "train/loss_epoch" and labels[1][0] == "val/loss" and "val/accuracy" in labels[2]


def test_class_distribution_legend_covers_no_bar(eurosat_run):
    from deforest.runs.plots import class_distribution_figure

    run_dir, _, _ = eurosat_run
    counts = json.loads((run_dir / "class_distribution.json").read_text())
    figure = class_distribution_figure(counts)
    figure.canvas.draw()
    ax = figure.axes[0]
    legend = ax.get_legend().get_window_extent()
    bars = [patch.get_window_extent() for patch in ax.patches]
    assert len(bars) == 3 * 10 and not any(legend.overlaps(bar) for bar in bars)
    assert ax.get_xlabel() == "class" and ax.get_ylabel() == "tiles"


def test_summary_names_the_bands_and_those_the_network_sees(eurosat_run):
    run_dir, _, _ = eurosat_run
    summary = (run_dir / "summary.md").read_text()
    assert "- bands: B01, B02, B03, B04, B05, B06, B07, B08, B09, B10, B11, B12, B8A (13)" in summary
    assert ("- the network sees: B02, B03, B04, B05, B06, B07, B08, B11, B12, B8A (10); "
            "the band-statistics head sees every band") in summary


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--enable-logging=stderr",
                  "--v=0", "--virtual-time-budget=10000", "--dump-dom")
# appended to a copy of the page: reports, once loaded, how each figure decoded
FIGURE_PROBE = ("<script>window.addEventListener('load', () => console.info('deforest-figures ' + JSON.stringify("
                "[...document.images].map(i => [i.alt, i.complete && i.naturalWidth > 0 ? i.naturalWidth : 0]))));</script>")


@pytest.mark.slow
def test_report_html_loads_in_a_real_browser_with_every_figure(eurosat_run, tmp_path):
    """Debian's chromium, headless, opens report.html: no console message from the page, and
    every figure of report.md is an image the browser decoded."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:  # .ci/run installs it; a missing browser must not pass as a skip
        pytest.fail("chromium is not installed: apt-get install -y chromium (.ci/run does)")
    run_dir, _, _ = eurosat_run
    page = tmp_path / "report.html"
    page.write_text((run_dir / "report.html").read_text().replace("</body>", FIGURE_PROBE + "</body>"))
    done = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    probes = [line for line in console if "deforest-figures" in line]
    assert len(probes) == 1 and len(console) == 1, console  # nothing else: no error, no warning
    figures = json.loads(re.search(r'"deforest-figures (.*)", source:', probes[0]).group(1).replace('\\"', '"'))
    report = (run_dir / "report.md").read_text()
    expected = re.findall(r"!\[([^\]]+)\]\(([^)]+\.png)\)", report)
    assert [alt for alt, _ in figures] == [alt for alt, _ in expected] and len(expected) == len(PNGS)
    for (alt, width), (_, png) in zip(figures, expected):
        assert width == matplotlib.image.imread(run_dir / png).shape[1], alt
    dom = done.stdout
    assert dom.count("<img") == len(PNGS) and "<table>" in dom
