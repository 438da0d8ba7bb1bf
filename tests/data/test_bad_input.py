"""Bad input ends in a clear error naming the file, or (data.on_bad_tile=skip) a counted skip.

Faulty tiles are real EuroSAT tiles corrupted in a tmp dir; nodata cases are windows of the
real Bahamas Landsat 7 scene (nodata 0 around a rotated footprint).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from deforest.core.errors import DatasetError, TileError
from deforest.data.bigearthnet import BigEarthNetLayout
from deforest.data.datamodule import TileDataModule
from deforest.data.layouts import FolderLayout, ManifestLayout
from deforest.data.transforms import BandNormalizer
from deforest.training.module import TileClassifier

SAMPLE_LICENCE = Path(__file__).resolve().parents[2] / "data" / "eurosat-ms" / "LICENSE.txt"


def _copy_classes(eurosat_root: Path, dest: Path, classes=("Forest", "River")) -> Path:
    for cls in classes:
        shutil.copytree(eurosat_root / "train" / cls, dest / cls)
    return dest


def _as_float32(root: Path) -> None:
    """Rewrite every tile under ``root`` as float32: NaN and inf need a float dataset (a float tile
    among uint16 ones is refused for its dtype before its pixels are read)."""
    for tile in root.rglob("*.tif"):
        _rewrite(tile, tile, dtype="float32")


def _rewrite(src: Path, dest: Path, data: np.ndarray | None = None, **profile_changes) -> None:
    """Write ``src``'s pixels (or ``data``) to ``dest`` with a changed profile."""
    with rasterio.open(src) as ds:
        profile, pixels = ds.profile, ds.read()
    profile.update(profile_changes)
    data = pixels if data is None else data
    with rasterio.open(dest, "w", **profile) as out:
        out.write(data.astype(profile["dtype"]))


def _truncated(src: Path, dest: Path) -> None:
    dest.write_bytes(src.read_bytes()[: src.stat().st_size // 2])


def _zero_bytes(src: Path, dest: Path) -> None:
    dest.write_bytes(b"")


def _not_a_tiff(src: Path, dest: Path) -> None:
    shutil.copy(SAMPLE_LICENCE, dest)  # a real text file


def _twelve_bands(src: Path, dest: Path) -> None:
    with rasterio.open(src) as ds:
        data = ds.read()
    _rewrite(src, dest, data[:12], count=12)


def _small(src: Path, dest: Path) -> None:
    with rasterio.open(src) as ds:
        data = ds.read()
    _rewrite(src, dest, data[:, :32, :32], width=32, height=32)


def _complex(src: Path, dest: Path) -> None:
    _rewrite(src, dest, dtype="complex64")


def _nan(src: Path, dest: Path) -> None:
    with rasterio.open(src) as ds:
        data = ds.read().astype(np.float32)
    data[3, 10:12, 20:25] = np.nan
    _rewrite(src, dest, data, dtype="float32")


def _inf(src: Path, dest: Path) -> None:
    with rasterio.open(src) as ds:
        data = ds.read().astype(np.float32)
    data[0, 0, 0] = np.inf
    _rewrite(src, dest, data, dtype="float32")


# fault, message, whether validate=quick (headers only) already finds it
FAULTS: list[tuple[Callable[[Path, Path], None], str, bool]] = [
    (_truncated, r"is truncated: its pixel data needs \d+ bytes, the file has \d+", True),
    (_zero_bytes, r"is empty \(0 bytes\)", True),
    (_not_a_tiff, r"is named \.tif but is not a TIFF file \(it starts with b'MIT '\)", True),
    (_twelve_bands, r"has 12 bands, the dataset's tiles have 13", True),
    (_small, r"is 32x32 pixels, the dataset's tiles are 64x64", True),
    (_complex, r"has unsupported dtype complex64 \(supported: \['float32', .*\]\)", True),
    (_nan, r"contains 10 NaN or infinite pixel values", False),
    (_inf, r"contains 1 NaN or infinite pixel values", False),
]


@pytest.mark.parametrize("fault,message,quick", FAULTS, ids=[f[0].__name__.strip("_") for f in FAULTS])
def test_bad_tile_is_named_or_skipped(eurosat_root, tmp_path, fault, message, quick):
    root = _copy_classes(eurosat_root, tmp_path / "d")
    if not quick:
        _as_float32(root)
    bad = root / "River" / "River_bad.tif"
    fault(next((root / "River").glob("*.tif")), bad)
    validate = "quick" if quick else "full"

    def datamodule(policy: str) -> TileDataModule:
        return TileDataModule.from_keys(
            FolderLayout(root), val_fraction=0.2, test_fraction=0.2, cache_dir=str(tmp_path / "c"),
            validate=validate, on_bad_tile=policy,
        )

    with pytest.raises(TileError, match=rf"River_bad\.tif: {message} \(data\.on_bad_tile=skip"):
        datamodule("error").setup()
    dm = datamodule("skip")
    dm.setup()
    assert list(dm.bad_tiles.problems) == [str(bad)]
    kept = [s for d in dm.datasets.values() for s in d.sources]
    assert str(bad) not in kept and len(kept) == len(list(root.rglob("*.tif"))) - 1


def _bahamas_tiles(scenes_root: Path, dest: Path, windows: dict[str, list[tuple[int, int]]]) -> dict[str, Path]:
    """64x64 windows of the real Bahamas scene as tiles, one folder per (made-up) class."""
    scene = scenes_root / "landsat7-bahamas" / "RGB.byte.tif"
    written = {}
    with rasterio.open(scene) as src:
        for cls, offsets in windows.items():
            (dest / cls).mkdir(parents=True)
            for row, col in offsets:
                window = Window(col, row, 64, 64)
                profile = {**src.profile, "width": 64, "height": 64, "transform": src.window_transform(window)}
                path = dest / cls / f"{cls}_{row}_{col}.tif"
                with rasterio.open(path, "w", **profile) as out:
                    out.write(src.read(window=window))
                written[path.stem] = path
    return written


# (row, col) offsets: inside the rotated footprint, across its upper edge, and its empty corner
INSIDE_A = [(64, 192), (64, 256), (128, 256), (192, 128), (192, 192), (192, 320)]
INSIDE_B = [(256, 128), (256, 192), (256, 256), (320, 128), (320, 192), (320, 256), (384, 128)]
EDGE = [(0, 128), (0, 192)]
CORNER = (0, 0)


def test_nodata_rule_on_real_scene_windows(scenes_root, tmp_path):
    tiles = _bahamas_tiles(scenes_root, tmp_path / "d", {"a": INSIDE_A + EDGE, "b": INSIDE_B + [CORNER]})
    corner = tiles["b_0_0"]

    def datamodule(policy: str, validate: str = "quick") -> TileDataModule:
        return TileDataModule.from_keys(
            FolderLayout(tmp_path / "d"), batch_size=4, val_fraction=0.2, test_fraction=0.2, seed=1,
            cache_dir=str(tmp_path / "c"), validate=validate, on_bad_tile=policy, augment=None,
        )

    with pytest.raises(TileError, match=r"b_0_0\.tif: every pixel is nodata"):
        datamodule("error", "full").setup()
    dm = datamodule("skip", "full")
    dm.setup()
    assert dm.nodata == 0 and list(dm.bad_tiles.problems) == [str(corner)]

    # statistics come from valid pixels only
    train = dm.datasets["train"]
    pixels = [train.read_valid(i) for i in range(len(train))]
    for band in range(3):
        values = np.concatenate([np.log1p(im[band][v[band]]) for im, v in pixels])
        assert dm.input_spec.normalization.mean[band] == pytest.approx(values.mean(), rel=1e-6)

    # a partly covered tile: its nodata pixels normalise to 0, its valid pixels are untouched
    edge = tiles["a_0_192"]
    with rasterio.open(edge) as src:
        raw = src.read().astype(np.float32)
    holes = raw == 0
    assert 0 < holes.mean() < 1
    owner = next(d for d in dm.datasets.values() if str(edge) in d.sources)
    filled = owner.read(owner.sources.index(str(edge)))
    np.testing.assert_array_equal(filled[~holes], raw[~holes])
    norm = dm.input_spec.normalization
    normalised = BandNormalizer(norm.mean, norm.std, norm.transform == "log1p")(torch.from_numpy(filled)[None])[0]
    assert normalised[torch.from_numpy(holes)].abs().max() < 1e-4


def _model_for(dm: TileDataModule) -> TileClassifier:
    return TileClassifier.from_keys(dm.input_spec, width=8, tta=False)


def test_bad_tile_met_in_a_worker_is_raised_in_the_main_process(eurosat_root, tmp_path):
    """validate=quick does not read test pixels: the NaN tile is met by a DataLoader worker."""
    for split in ("train", "test"):
        for cls in ("Forest", "River"):
            shutil.copytree(eurosat_root / split / cls, tmp_path / "d" / split / cls)
    _as_float32(tmp_path / "d")
    bad = tmp_path / "d" / "test" / "River" / "River_nan.tif"
    _nan(next((tmp_path / "d" / "test" / "River").glob("*.tif")), bad)

    def run(policy: str) -> TileDataModule:
        dm = TileDataModule.from_keys(
            FolderLayout(tmp_path / "d"), batch_size=8, num_workers=1, val_fraction=0.2,
            cache_dir=str(tmp_path / "c"), on_bad_tile=policy,
        )
        dm.setup()
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.test(_model_for(dm), datamodule=dm, verbose=False)
        return dm

    with pytest.raises(TileError) as caught:
        run("error")
    assert str(caught.value).startswith(f"{bad}: contains 10 NaN or infinite pixel values")
    assert "DataLoader worker" not in str(caught.value) and "Traceback" not in str(caught.value)
    dm = run("skip")
    assert list(dm.bad_tiles.problems) == [str(bad)]


def _manifest(root: Path, eurosat_root: Path, text: str, encoding: str = "utf-8") -> Path:
    tiles = sorted((eurosat_root / "train" / "Forest").glob("*.tif"))[:3]
    (root / "t").mkdir(parents=True)
    for t in tiles:
        shutil.copy(t, root / "t" / t.name)
    (root / "labels.csv").write_bytes(text.format(*[f"t/{t.name}" for t in tiles]).encode(encoding))
    return root


@pytest.mark.parametrize(
    "text,message",
    [
        ("path,labels\n{0},forest\nt/gone.tif,forest\n", r"labels\.csv, line 3: file .*t/gone\.tif does not exist"),
        ("path,labels\n{0},forest\n{1},water\n{0},forest\n", r"labels\.csv, line 4: duplicate of line 2"),
        ("path,label\n{0},forest\n", r"labels\.csv: missing column\(s\) \['labels'\]"),
        ("path,labels\n{0},forest\n{1},wter\n", r"labels\.csv, line 3: unknown label\(s\) \['wter'\]"),
    ],
    ids=["missing-file", "duplicate-row", "missing-column", "unknown-label"],
)
def test_manifest_faults_name_the_line(eurosat_root, tmp_path, text, message):
    root = _manifest(tmp_path, eurosat_root, text)
    names = ["forest", "water"] if "wter" in text else None
    with pytest.raises(DatasetError, match=message):
        ManifestLayout(root, class_names=names).build_index()


def test_non_utf8_manifest(eurosat_root, tmp_path):
    root = _manifest(tmp_path, eurosat_root, "path,labels\n{0},for\xeat\n", "latin-1")
    with pytest.raises(DatasetError, match=r"labels\.csv: not UTF-8 text \(invalid continuation byte at byte \d+\)"):
        ManifestLayout(root).build_index()


def test_class_absent_from_training_split(eurosat_root, tmp_path):
    shutil.copytree(eurosat_root / "train" / "Forest", tmp_path / "train" / "Forest")
    for cls in ("Forest", "River"):
        shutil.copytree(eurosat_root / "test" / cls, tmp_path / "test" / cls)
    dm = TileDataModule.from_keys(FolderLayout(tmp_path), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DatasetError, match=r"class\(es\) \['River'\] have no tile in the training split"):
        dm.setup()


def _patches(bigearthnet_root: Path, dest: Path, n: int = 2) -> list[Path]:
    out = []
    for patch in sorted(p for p in bigearthnet_root.iterdir() if p.is_dir())[:n]:
        shutil.copytree(patch, dest / patch.name)
        out.append(dest / patch.name)
    return out


def test_bigearthnet_patch_faults(bigearthnet_root, tmp_path):
    first, second = _patches(bigearthnet_root, tmp_path / "ben")
    (first / f"{first.name}_B8A.tif").unlink()
    with pytest.raises(DatasetError, match=rf"{first.name}: missing band file\(s\) \['B8A'\]"):
        BigEarthNetLayout(tmp_path / "ben").build_index()
    shutil.rmtree(first)
    labels = second / f"{second.name}_labels_metadata.json"
    original = labels.read_text()
    labels.write_text(original[: len(original) // 2])
    with pytest.raises(DatasetError, match=rf"{labels.name}: malformed labels JSON \(JSONDecodeError"):
        BigEarthNetLayout(tmp_path / "ben").build_index()
    labels.write_text(json.dumps({"labels": ["Rainforest"]}))
    with pytest.raises(DatasetError, match=r"unknown BigEarthNet label\(s\) \['Rainforest'\]"):
        BigEarthNetLayout(tmp_path / "ben").build_index()
    labels.unlink()
    with pytest.raises(DatasetError, match=rf"{labels.name}: labels JSON missing"):
        BigEarthNetLayout(tmp_path / "ben").build_index()


def test_bigearthnet_samples_carry_all_twelve_bands(bigearthnet_root, tmp_path):
    """The header file of a patch is one single-band GeoTIFF: the sample still has 12 bands."""
    dm = TileDataModule.from_keys(BigEarthNetLayout(bigearthnet_root), val_fraction=0.15, cache_dir=str(tmp_path / "c"))
    dm.setup()
    assert dm.bands == list(range(1, 13)) and dm.source_band_count == 12
    assert dm.datasets["train"][0]["image"].shape == (12, 120, 120)
