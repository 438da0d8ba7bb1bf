"""deforest-export on models trained on the real samples: each format, run by its own runtime on
the raw values of real tiles, gives deforest's own probabilities, and carries the input contract."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import rasterio
import torch
from hydra import compose, initialize_config_module

from deforest.cli.export import export
from deforest.cli.train import train
from deforest.core.contract import InputSpec
from deforest.data.bigearthnet import BigEarthNetLayout
from deforest.data.layouts import FolderLayout
from deforest.mapping.export import FORMATS, METADATA_FILE, METADATA_KEY, read_metadata
from deforest.training.module import TileClassifier
from tests.conftest import REPO, compose_train_config

ATOL = 1e-4


def _train(tmp: Path, overrides: list[str]) -> str:
    # the default model: small CNN on 10 of the bands beside the band-statistics head on all of them
    cfg = compose_train_config(tmp, ["model.band_statistics=true", "report.enabled=false", *overrides])
    return train(cfg)["best_checkpoint"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, eurosat_root, bigearthnet_root) -> dict[str, dict]:
    """A multi-class model on EuroSAT and a multi-label one on BigEarthNet, trained one epoch,
    with raw values of real tiles (as read from the files) to feed them."""
    out = {}
    ckpt = _train(tmp_path_factory.mktemp("eurosat"), [])
    tiles = sorted((eurosat_root / "test").glob("*/*.tif"))[::9][:6]
    out["multiclass"] = {"ckpt": ckpt, "read": lambda spec: np.stack([FolderLayout(eurosat_root).read(str(t), spec.bands)
                                                                    for t in tiles])}
    ckpt = _train(tmp_path_factory.mktemp("bigearthnet"), ["data=bigearthnet", f"data.root={bigearthnet_root}"])
    layout = BigEarthNetLayout(bigearthnet_root)
    patches = sorted(p for p in bigearthnet_root.iterdir() if p.is_dir())[:5]
    out["multilabel"] = {"ckpt": ckpt, "read": lambda spec: np.stack([layout.read(str(p), spec.bands) for p in patches])}
    return out


def run_export(tmp_path: Path, ckpt: str, fmt: str, *overrides: str) -> Path:
    """The command's own function on the composed ``export`` config."""
    out = tmp_path / f"model{FORMATS[fmt]}"
    with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
        cfg = compose("export", overrides=[f"ckpt_path={ckpt}", f"format={fmt}", f"out={out}", *overrides])
    summary = export(cfg)
    assert summary["out"] == str(out) and out.is_file()
    return out


def run_exported(path: Path, fmt: str, raw: np.ndarray) -> np.ndarray:
    """The exported file run by its own runtime, without deforest."""
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (result,) = session.run(["probabilities"], {"raw": raw})
        return result
    program = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()
    with torch.no_grad():
        result = program(torch.from_numpy(raw))
    assert result.dtype == torch.float32
    return result.numpy()


def deforest_probabilities(ckpt: str, raw: np.ndarray, tta: bool = False) -> tuple[np.ndarray, InputSpec]:
    """What deforest itself predicts for these raw values (prepare, then predict_proba)."""
    model = TileClassifier.load_from_checkpoint(ckpt, map_location="cpu").eval()
    model.tta = tta
    spec = model.input_spec
    with torch.no_grad():
        return model.predict_proba(torch.from_numpy(spec.prepare(raw))).numpy(), spec


def with_holes(raw: np.ndarray, value: float) -> np.ndarray:
    """``raw`` with a corner block and a scattered line of pixels set to ``value`` in some bands."""
    raw = raw.copy()
    raw[0, :, :7, :9] = value
    raw[1, 2, 10, :] = value
    raw[-1, 0, ::3, 5] = value
    return raw


@pytest.mark.slow  # trains two models
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_exported_graph_gives_deforest_probabilities_on_raw_tiles(models, task, fmt, tmp_path):
    ckpt = models[task]["ckpt"]
    out = run_export(tmp_path, ckpt, fmt)
    model = TileClassifier.load_from_checkpoint(ckpt, map_location="cpu")
    assert model.band_statistics is not None and model.network_bands is not None  # both heads, a band subset
    raw = models[task]["read"](model.spec)
    assert raw.dtype == np.float32 and raw.shape[1:] == (len(model.spec.bands), *model.spec.tile_size)
    raw = with_holes(raw, np.nan)  # NaN pixels: filled inside the graph as prepare() fills them
    expected, spec = deforest_probabilities(ckpt, raw)
    got = run_exported(out, fmt, raw)
    assert got.dtype == np.float32 and got.shape == (len(raw), spec.num_classes)
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    if task == "multiclass":
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    else:  # sigmoid per label: rows need not sum to one
        assert np.all((got > 0) & (got < 1))
    # the batch axis is dynamic: one tile and three tiles, through the same file
    for rows in (slice(0, 1), slice(1, 4)):
        np.testing.assert_allclose(run_exported(out, fmt, raw[rows]), expected[rows], atol=ATOL, rtol=0)

    # the contract round-trips: inside the file and in <out>.json beside it
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert InputSpec.from_dict(sidecar["input_spec"]) == spec
    assert read_metadata(out).input_spec == spec
    assert sidecar["output"]["activation"] == ("softmax" if task == "multiclass" else "sigmoid")
    assert sidecar["output"]["classes"] == spec.class_names and sidecar["input"]["shape"][1:] == [len(spec.bands), *spec.tile_size]
    assert sidecar["tta"] is False and sidecar["input"]["nodata_filled_in_graph"] is True
    if fmt == "onnx":  # as any ONNX runtime reads it
        props = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
        assert json.loads(props[METADATA_KEY]) == sidecar
    else:
        files = {METADATA_FILE: ""}
        torch.jit.load(str(out), _extra_files=files) if fmt == "torchscript" else torch.export.load(str(out), extra_files=files)
        assert json.loads(files[METADATA_FILE]) == sidecar


@pytest.mark.slow  # trains two models
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_test_time_augmentation_inside_the_graph(models, fmt, tmp_path):
    ckpt = models["multiclass"]["ckpt"]
    out = run_export(tmp_path, ckpt, fmt, "tta=true")
    raw = models["multiclass"]["read"](TileClassifier.load_from_checkpoint(ckpt).spec)
    expected, _ = deforest_probabilities(ckpt, raw, tta=True)
    plain, _ = deforest_probabilities(ckpt, raw, tta=False)
    assert np.abs(expected - plain).max() > 10 * ATOL  # the eight views do change the answer
    np.testing.assert_allclose(run_exported(out, fmt, raw), expected, atol=ATOL, rtol=0)
    assert read_metadata(out).tta is True


@pytest.mark.slow  # trains a model
def test_declared_nodata_is_filled_inside_the_graph(tmp_path_factory, eurosat_root, tmp_path):
    """Real EuroSAT tiles whose headers declare nodata 0: the contract says so, and raw pixels
    equal to 0 go into the graph as they come from a scene."""
    root = tmp_path_factory.mktemp("nodata")
    for cls in ("Forest", "River", "Highway"):
        shutil.copytree(eurosat_root / "train" / cls, root / cls)
    for tile in root.rglob("*.tif"):
        with rasterio.open(tile, "r+") as ds:
            ds.nodata = 0
    ckpt = _train(tmp_path_factory.mktemp("nodata-run"), [f"data.root={root}"])
    spec = TileClassifier.load_from_checkpoint(ckpt).spec
    assert spec.nodata == 0
    tiles = sorted(root.rglob("*.tif"))[::20][:4]
    raw = with_holes(np.stack([FolderLayout(root).read(str(t), spec.bands) for t in tiles]), 0.0)
    expected, _ = deforest_probabilities(ckpt, raw)
    unfilled, _ = deforest_probabilities(ckpt, np.where(raw == 0, 1.0, raw).astype(np.float32))
    assert np.abs(expected[:2] - unfilled[:2]).max() > 10 * ATOL  # the fill matters for these tiles
    for fmt in FORMATS:
        out = run_export(tmp_path, ckpt, fmt)
        np.testing.assert_allclose(run_exported(out, fmt, raw), expected, atol=ATOL, rtol=0)
        assert read_metadata(out).input_spec == TileClassifier.load_from_checkpoint(ckpt).input_spec


def _command(*args: str) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    script = Path(sys.executable).parent / "deforest-export"
    return subprocess.run([str(script), *args], cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    ("make", "fmt", "message"),
    [
        (lambda d: d / "absent.ckpt", "onnx", "CheckpointError: {ckpt}: checkpoint not found"),
        (lambda d: (d / "garbage.ckpt").write_bytes(b"not a checkpoint\x00" * 40) and d / "garbage.ckpt", "torchscript",
         "CheckpointError: {ckpt}: is not a readable checkpoint: truncated or corrupt (680 bytes; not a torch file)"),
        (lambda d: d / "absent.ckpt", "tflite", "ConfigError: invalid config: format='tflite' must be one of ['onnx', 'torchscript', 'exported_program']"),
    ],
    ids=["missing", "garbage", "unknown-format"],
)
def test_bad_checkpoint_or_format_ends_in_one_line(make, fmt, message, tmp_path):
    ckpt = make(tmp_path)
    done = _command(f"ckpt_path={ckpt}", f"format={fmt}", f"out={tmp_path / 'model'}", f"hydra.run.dir={tmp_path / 'run'}")
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    errors = [line.split("] - ", 1)[1] for line in output.splitlines() if "][ERROR] - " in line]
    assert errors == [message.format(ckpt=ckpt)]
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("nodata", [0.1, -3.4028234663852886e+38], ids=["0.1", "float32-min-as-double"])
def test_exported_graph_and_files_share_the_nodata_rule(nodata, tmp_path):
    """A contract nodata that float32 cannot hold exactly: pixels are read as float32, so a
    pixel holding float32(nodata) is nodata in the files' rule (validation.is_nodata), and the
    exported graph must fill the same pixels, and only those."""
    from deforest.core.nodata import is_nodata
    from tests.mapping.test_predict import save_untrained

    ckpt = save_untrained(tmp_path / "nodata.ckpt", "multiclass", ["a", "b", "c"], bands=3, tile=16, nodata=nodata)
    spec = TileClassifier.load_from_checkpoint(ckpt, map_location="cpu").spec
    assert spec.nodata == nodata
    stored = np.float32(nodata)
    rng = np.random.default_rng(0)
    raw = rng.uniform(2.0, 6.0, (4, 3, 16, 16)).astype(np.float32)
    raw = with_holes(raw, stored)
    raw[2, 1, 3, :4] = np.nextafter(stored, np.float32(np.inf))  # one float32 step away: a value, not nodata
    holes = is_nodata(raw, nodata)
    assert holes.sum() == (raw == stored).sum() > 0
    assert torch.equal(is_nodata(torch.from_numpy(raw), nodata), torch.from_numpy(holes))  # one rule, NumPy or torch
    expected, _ = deforest_probabilities(ckpt, raw)
    fill = np.asarray(spec.fill, np.float32)[:, None, None]
    np.testing.assert_array_equal(spec.prepare(raw), np.where(holes, fill, raw))  # the files' rule fills those pixels
    as_values = TileClassifier.load_from_checkpoint(ckpt, map_location="cpu").eval()
    with torch.no_grad():  # the same pixels read as values: what a graph with another rule would give
        other = as_values.predict_proba(torch.from_numpy(np.where(np.isfinite(raw), raw, fill))).numpy()
    gap = np.abs(other - expected).max()
    assert gap > 0
    for fmt in FORMATS:
        out = run_export(tmp_path, str(ckpt), fmt)
        got = run_exported(out, fmt, raw)
        assert np.abs(got - expected).max() < gap / 10, fmt  # far closer to the rule's answer than to the other


def test_an_onnx_model_with_a_flat_contract_still_loads(tmp_path):
    """ONNX files exported before the contract had sub-records keep every field at its top level."""
    import onnx

    from deforest.core.contract import Calibration, SourceRecord
    from deforest.mapping.serve import load_onnx
    from tests.mapping.test_predict import save_untrained

    ckpt = save_untrained(tmp_path / "m.ckpt", "multiclass", ["a", "b"], bands=3, tile=16,
                          source=SourceRecord(3, "uint16", [10.0] * 3, [900.0] * 3, [30.0, 30.0], "m"))
    out = run_export(tmp_path, str(ckpt), "onnx")
    graph = onnx.load(str(out))
    entry = next(p for p in graph.metadata_props if p.key == METADATA_KEY)
    data = json.loads(entry.value)
    plain = {k: v for k, v in data["input_spec"].items() if k not in ("source", "network", "calibration")}
    data["input_spec"] = {
        **plain, "source_band_count": 3, "source_dtype": "uint16", "value_low": [10.0] * 3, "value_high": [900.0] * 3,
        "pixel_size": [30.0, 30.0], "pixel_units": "m", "network_bands": None, "input_pool": 1,
        "calibration_temperature": 1.0, "calibration_bias": [0.0, 0.0],
    }
    entry.value = json.dumps(data)
    onnx.save(graph, str(tmp_path / "flat.onnx"))
    classify, spec = load_onnx(tmp_path / "flat.onnx", "cpu")
    assert spec == load_onnx(out, "cpu")[1] == TileClassifier.load_from_checkpoint(ckpt, map_location="cpu").input_spec
    assert spec.source.pixel_size == [30.0, 30.0] and spec.calibration == Calibration(1.0, [0.0, 0.0])
    raw = np.random.default_rng(0).uniform(0, 900, (2, 3, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(classify(raw), run_exported(out, "onnx", raw))
