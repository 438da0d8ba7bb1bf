"""Nothing read from a checkpoint, a run directory, a pack or a cache runs code; reports escape names.

The crafted checkpoint is a real one (an untrained classifier on the EuroSAT sample's 13 bands)
whose saved hyper-parameters ask for ``torch.compile`` with a "C++ compiler" that is a shell
script writing a marker file. It loads with ``weights_only=True``: only plain data in it. Before
the fix, ``deforest-eval`` and ``deforest-predict`` rebuilt the module with those options and
inductor ran the script on the first forward pass.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from deforest.core.contract import untrained_spec
from deforest.core.safety import CheckpointError
from deforest.training.module import TileClassifier

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["Forest", "River"]


def _untrained(path: Path) -> Path:
    """A real checkpoint of an untrained classifier for the EuroSAT sample's Forest/River tiles."""
    spec = untrained_spec("multiclass", CLASSES, 13, 64)
    model = TileClassifier(spec, network={"width": 8, "band_statistics": False}, evaluation={"tta": False})
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return path


def _craft(src: Path, dest: Path, spec: dict | None = None, **hparams) -> Path:
    """``src`` with ``hparams`` set, and ``spec`` keys set in its saved input contract."""
    checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"].update(hparams)
    for key, value in (spec or {}).items():
        node = checkpoint["hyper_parameters"]["input_spec"]
        *parents, last = key.split(".")
        for parent in parents:
            node = node[parent]
        node[last] = value
    torch.save(checkpoint, dest)
    torch.load(dest, map_location="cpu", weights_only=True)  # plain data only: weights_only lets it through
    return dest


@pytest.fixture
def marker_compiler(tmp_path: Path) -> tuple[Path, Path]:
    """An executable that inductor would take for its C++ compiler; running it writes ``marker``."""
    marker = tmp_path / "PWNED"
    script = tmp_path / "cxx.sh"
    script.write_text(f"#!/bin/sh\necho ran >> {marker}\nexit 1\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, marker


@pytest.fixture
def crafted(tmp_path: Path, marker_compiler) -> tuple[Path, Path]:
    script, marker = marker_compiler
    plain = _untrained(tmp_path / "plain.ckpt")
    options = {"backend": "inductor", "options": {"cpp.cxx": [str(script)]}}
    return _craft(plain, tmp_path / "crafted.ckpt", compile=options), marker


@pytest.fixture
def two_classes(eurosat_root: Path, tmp_path: Path) -> Path:
    """A copy of the sample's Forest and River test tiles."""
    root = tmp_path / "data"
    for cls in CLASSES:
        shutil.copytree(eurosat_root / "test" / cls, root / "test" / cls)
    return root


def _run(tmp_path: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # no compiled-code cache reuse
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.mark.slow
def test_eval_never_compiles_with_options_from_the_checkpoint(crafted, two_classes, tmp_path):
    ckpt, marker = crafted
    done = _run(tmp_path, "deforest.cli.eval", f"hydra.run.dir={tmp_path / 'eval'}", f"ckpt_path={ckpt}", f"data.root={two_classes}",
                "report.enabled=false", "trainer.enable_progress_bar=false", f"paths.cache_dir={tmp_path / 'cache'}")
    assert not marker.exists(), "the checkpoint's compiler ran"
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "test/loss" in (tmp_path / "eval" / "metrics.json").read_text()


@pytest.mark.slow
def test_predict_never_compiles_with_options_from_the_checkpoint(crafted, two_classes, tmp_path):
    ckpt, marker = crafted
    out = tmp_path / "p.csv"
    done = _run(tmp_path, "deforest.cli.predict", f"hydra.run.dir={tmp_path / 'predict'}", f"ckpt_path={ckpt}",
                f"tiles={two_classes / 'test' / 'Forest'}", f"out={out}", "device=cpu")
    assert not marker.exists(), "the checkpoint's compiler ran"
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert len(out.read_text().splitlines()) > 5


def test_loading_takes_no_code_execution_setting_from_the_file(crafted, caplog):
    ckpt, marker = crafted
    with caplog.at_level(logging.INFO):
        model = TileClassifier.load_from_checkpoint(ckpt, map_location="cpu")
    assert model.compile_options is None and model.hparams.compile is False
    model.configure_model()  # what a Trainer calls: nothing to compile
    with torch.no_grad():
        assert model(torch.zeros(1, 13, 64, 64)).shape == (1, 2)
    assert not marker.exists()
    assert "ignoring the saved compile=" in caplog.text
    # the current config (the caller) may still ask for compilation
    assert TileClassifier.load_from_checkpoint(ckpt, compile={"mode": "default"}).compile_options == {"mode": "default"}


@pytest.mark.parametrize(
    "hparams,message",
    [
        ({"loss": {"scheme": "none", "criterion": {"_target_": "os.system", "command": "touch PWNED"}}},
         r"hyper-parameter loss\.criterion names code to run \(_target_="),
        ({"spec": {"class_names": ["Forest", {"class_path": "os.system"}]}},
         r"hyper-parameter input_spec\.class_names\[1\] names code to run"),
        ({"spec": {"normalization.mean": [float("nan")] * 13}}, r"normalisation mean holds nan"),
        ({"spec": {"thresholds": [2.0, 0.5]}}, r"thresholds holds 2\.0"),
    ],
    ids=["target-in-loss", "class-path", "nan-statistics", "threshold-out-of-range"],
)
def test_crafted_hyperparameters_are_refused(tmp_path, hparams, message):
    ckpt = _craft(_untrained(tmp_path / "plain.ckpt"), tmp_path / "crafted.ckpt", **hparams)
    with pytest.raises(CheckpointError, match=rf"crafted\.ckpt: refused: its {message}"):
        TileClassifier.load_from_checkpoint(ckpt, map_location="cpu")


def test_instantiator_and_unknown_keys_are_ignored(tmp_path, caplog):
    """Lightning imports ``_instantiator`` from the file (allow-listed); ours never imports anything it names."""
    evil = tmp_path / "evil_module.py"
    marker = tmp_path / "IMPORTED"
    evil.write_text(f"open({str(marker)!r}, 'w').write('imported')\ndef build(cls, kwargs):\n    return cls(**kwargs)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        ckpt = _craft(_untrained(tmp_path / "plain.ckpt"), tmp_path / "crafted.ckpt",
                      _instantiator="evil_module.build", _class_path="evil_module.Model", hook="x")
        with caplog.at_level(logging.WARNING):
            model = TileClassifier.load_from_checkpoint(ckpt, map_location="cpu")
    finally:
        sys.path.remove(str(tmp_path))
    assert isinstance(model, TileClassifier) and not marker.exists()
    assert "ignoring hyper-parameters the model does not take: ['_class_path', '_instantiator', 'hook']" in caplog.text


def test_report_html_escapes_class_names(tmp_path):
    from deforest.runs.predictions import Evaluation
    from deforest.runs.report import write_report

    names = ["<script>alert(1)</script>", "a|b", "[x](javascript:alert(1))", "Forest & <b>bold</b>"]
    rng = np.random.default_rng(0)
    probs = torch.from_numpy(rng.dirichlet(np.ones(4), 16).astype(np.float32))
    run = Evaluation(
        task="multiclass", class_names=names, probs=probs, target=torch.arange(16) % 4,
        thresholds=torch.full((4,), 0.5), sources=[f"<img src=x onerror=alert(1)>{i}.tif" for i in range(16)],
        read_rgb=lambda source: rng.random((3, 16, 16)).astype(np.float32),
        details=["data: `<script>x</script>`", "checkpoint: <iframe src=javascript:alert(1)>"],
    )
    write_report(tmp_path, run, examples=4)
    page = (tmp_path / "report.html").read_text()
    body = page.split("<body>", 1)[1]
    for raw in ("<script", "<b>", "<iframe", 'href="javascript', "<img src=x"):
        assert raw not in body, raw
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body and "Forest &amp; &lt;b&gt;bold&lt;/b&gt;" in body
    # one row per class in the per-class table, the pipe kept inside its cell
    rows = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| a\\|b |")]
    assert len(rows) == 2 and len(rows[0].replace("\\|", "").split("|")) == 7


def test_pack_with_object_array_is_refused_not_unpickled(eurosat_root, tmp_path):
    from deforest.core.errors import DatasetError
    from deforest.data.layouts import FolderLayout
    from deforest.data.stores.pack import PackedLayout
    from deforest.data.stores.packing import pack_dataset

    root = tmp_path / "d"
    shutil.copytree(eurosat_root / "train" / "Forest", root / "Forest")
    pack_dataset(FolderLayout(root), tmp_path / "pack")
    np.save(tmp_path / "pack" / "tiles.npy", np.array([subprocess.Popen] * 3, dtype=object), allow_pickle=True)
    with pytest.raises(DatasetError, match=r"tiles\.npy: not a pack array \(.*"):
        PackedLayout(tmp_path / "pack")


def test_compare_does_not_resolve_interpolations_from_run_dirs(tmp_path, monkeypatch):
    """A run directory's config is data: ``${oc.env:...}`` in it is shown, not resolved."""
    from deforest.runs.compare import compare_runs

    monkeypatch.setenv("DEFOREST_TEST_SECRET", "hunter2")
    for job, scheme in (("0", "${oc.env:DEFOREST_TEST_SECRET}"), ("1", "none")):
        run = tmp_path / "multirun" / job
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
        (run / ".hydra" / "config.yaml").write_text(json.dumps({"loss": {"scheme": scheme, "normalize": "mean"}}))
        (run / "metrics.json").write_text(json.dumps({"test/f1_macro": 0.5, "test/accuracy": 0.5, "test/recall/a": 1.0}))
        (run / "class_distribution.json").write_text(json.dumps({"train": {"a": 3}}))
    table, _, _ = compare_runs([tmp_path / "multirun"], rare_k=1)
    assert "hunter2" not in table.to_csv() and "${oc.env:DEFOREST_TEST_SECRET}" in set(table["loss.scheme"])
