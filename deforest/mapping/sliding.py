"""Sliding-window prediction without torch: a scene of any size -> a georeferenced
class/probability map, or tiles -> a CSV, around any batch -> probabilities function.

The scene is read one strip of window rows at a time and the output written as each
strip finishes, so memory follows the strip and the batch, never the scene. Everything
about the input comes from the model's :class:`~deforest.core.contract.InputSpec`: bands
(matched by name where the files name them), the nodata fill of training, classes, task,
tile size and thresholds.

The model is a :data:`Classify` function: a checkpoint's network (:mod:`deforest.mapping.predict`)
or an exported ONNX graph run by onnxruntime (:mod:`deforest.mapping.serve`); the map GeoTIFF is
written by :class:`~deforest.mapping.writer.MapWriter`. This module imports
neither torch nor Lightning, so ``deforest-predict`` on an ONNX model runs on rasterio,
numpy and onnxruntime alone (``pip install --no-deps`` plus the ``serve`` extra).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.windows import Window

from deforest.core.bands import match_band_names
from deforest.core.contract import InputSpec
from deforest.core.errors import TileError
from deforest.core.outputs import atomic_output, read_back_raster
from deforest.core.vocabulary import MULTICLASS, TIFF_SUFFIXES
from deforest.data.input_check import Allow, check_input, describe_scene, describe_tiles
from deforest.data.io import pixel_reads, read_header, read_raster
from deforest.mapping.scene import Scene
from deforest.mapping.writer import CSV_HEADER, WRITTEN_BY, MapWriter

log = logging.getLogger(__name__)

#: the model: float32 windows ``[N, bands, T, T]`` as :meth:`InputSpec.prepare` gives them (nodata
#: pixels already at their band's fill) -> float32 probabilities ``[N, classes]``
Classify = Callable[[np.ndarray], np.ndarray]


def match_bands(spec: InputSpec, names: Sequence[str | None], count: int, source: str) -> tuple[InputSpec, str]:
    """The contract with ``bands`` pointing at ``source``'s bands, and how their order was found.

    Where both the checkpoint and the source name their bands, bands are taken by name and
    a missing name is refused (naming both orders); otherwise the band count must match and
    the order is trusted, which the returned note says.
    """
    if spec.band_names and len(names) == count and all(names):
        names = list(names)
        # compared in one spelling (B1 = B01 = b01), as training selected and excluded them
        bands, missing = match_band_names(spec.band_names, names)
        if bands is None:
            raise TileError(
                source,
                f"has bands {names}; the checkpoint needs {spec.band_names} in this order ({missing or 'repeated names'} "
                "do not match): reorder or rename the bands",
            )
        note = f"matched by name: {spec.band_names} are bands {bands}"
        log.info("%s: band order %s", source, note)
        return replace(spec, bands=bands), note
    if count != spec.source.band_count:
        raise TileError(
            source,
            f"has {count} bands, the checkpoint was trained on {spec.source.band_count}-band tiles "
            f"(using bands {spec.bands})",
        )
    side = "the checkpoint has no band names" if not spec.band_names else "the file has no band descriptions"
    meaning = f" as {spec.band_names}" if spec.band_names else " in the training order"
    note = f"trusted ({side}): bands {spec.bands} of {count} are read{meaning}"
    log.warning("%s: band order %s", source, note)
    return spec, note


def _batches(indexes: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(indexes), size):
        yield indexes[start : start + size]


def _probabilities(classify: Classify, spec: InputSpec, windows: np.ndarray, nodata: float | None) -> np.ndarray:
    """``[N, C]`` probabilities for raw windows ``[N, B, T, T]``, preprocessed as in training
    (nodata pixels given their band's fill)."""
    return np.asarray(classify(spec.prepare(windows, nodata)), np.float32)


def window_starts(length: int, tile_size: int, stride: int) -> list[int]:
    """Window offsets every ``stride`` pixels, the last one flush with the far edge."""
    starts = list(range(0, length - tile_size + 1, stride))
    if starts[-1] + tile_size < length:
        starts.append(length - tile_size)
    return starts


def tent(tile_size: int) -> np.ndarray:
    """Blending weight across a window: highest at its centre, never zero."""
    t = np.arange(tile_size)
    return np.minimum(t + 1, tile_size - t).astype(np.float64)


def blend(values: np.ndarray, starts: Sequence[int], length: int, weight: np.ndarray) -> np.ndarray:
    """``[..., length]``: at each position, the sum over the windows covering it of
    ``weight[position - start] * values[..., window]`` (windows ``len(weight)`` long, at the
    distinct ``starts``). One pass per offset within a window, so memory follows ``length``,
    never windows x length (a dense weight matrix is 1 GB for a 10,980 px scene at stride 1)."""
    out = np.zeros((*values.shape[:-1], length))
    starts = np.asarray(starts)
    values = values.astype(np.float64, copy=False)
    for t, w in enumerate(weight):
        out[..., starts + t] += w * values  # distinct starts: no index repeats within a pass
    return out


def predict_scene(
    classify: Classify,
    spec: InputSpec,
    scene: Scene,
    out: str | os.PathLike,
    stride: int | None = None,
    batch_size: int = 256,
    full_resolution: bool = False,
    max_nodata: float = 0.5,
    dtype: str = "uint8",
    cog: bool = False,
    tags: dict[str, str] | None = None,
    gdal_cache_mb: int = 64,
    allow: Allow | None = None,
) -> dict[str, object]:
    """Classify ``scene`` window by window and write the map to ``out``; returns a summary.

    One output pixel per stride (the window centred on it) by default; with
    ``full_resolution`` the output is on the scene's grid and overlapping windows are
    blended with a centre-weighted tent. Windows with more than ``max_nodata`` nodata are
    not classified; their pixels, and every nodata input pixel, are nodata in the output.
    The nodata pixels of the windows classified get their band's training fill, as in
    training. The summary's ``band_order`` says whether bands were matched by name.

    Each window is read once, so GDAL's block cache (5% of RAM by default) only grows
    with the scene: ``gdal_cache_mb`` caps it, which keeps memory bounded by the batch.

    Before any window is classified, the scene's dtype, value scale and pixel size are compared
    with the contract's (:mod:`deforest.data.input_check`): a mismatch is refused unless ``allow``
    allows it (then a warning).
    """
    with rasterio.Env(GDAL_CACHEMAX=gdal_cache_mb * 1024**2):
        spec, band_order = match_bands(spec, scene.descriptions, scene.count, scene.name)
        check_input(spec, describe_scene(scene, spec.bands, scene.nodata), allow or Allow(), "predict")
        tile = spec.tile_size[0]
        stride = stride or tile
        if scene.crs is None:
            warnings.warn(f"{scene.name} has no CRS: the map is written without one", stacklevel=2)
        out = Path(out)
        tags = {"written_by": WRITTEN_BY, "tile_size": str(tile), "stride": str(stride),
                "full_resolution": str(full_resolution), "band_order": band_order, **(tags or {})}
        if tile > min(scene.height, scene.width):  # every window would be partly mirrored pixels
            raise TileError(
                scene.name,
                f"is {scene.height}x{scene.width} pixels, smaller than one {tile}x{tile} window (the checkpoint's "
                f"tile size): it cannot be classified without making up pixels; use a scene at least {tile}x{tile}",
            )
        # written beside out and renamed over it at the end: a failed run leaves an earlier map whole
        with atomic_output(out, ".tif", verify=read_back_raster) as final:
            target = final.with_name(final.name[: -len(".tif")] + ".gtiff.tif") if cog else final
            if full_resolution:
                writer = MapWriter(target, spec, scene, scene.width, scene.height, scene.transform, dtype, tags)
                run = _full_resolution
            else:
                width, height = math.ceil(scene.width / stride), math.ceil(scene.height / stride)
                writer = MapWriter(target, spec, scene, width, height, scene.transform @ Affine.scale(stride), dtype, tags)
                run = _per_window
            try:
                counts = run(classify, spec, scene, writer, stride, batch_size, max_nodata)
            finally:
                writer.close()
            if cog:
                try:
                    rasterio.shutil.copy(target, final, driver="COG", compress="DEFLATE", blocksize=256)
                finally:
                    target.unlink(missing_ok=True)
        return {"out": str(out), "tile_size": tile, "stride": stride, "band_order": band_order, **counts}


def _read_padded(scene: Scene, bands: list[int], row0: int, col0: int, height: int, width: int) -> np.ndarray:
    """Rows/cols of the scene, mirrored where the request reaches past an edge."""
    r0, r1 = max(row0, 0), min(row0 + height, scene.height)
    c0, c1 = max(col0, 0), min(col0 + width, scene.width)
    data = scene.read(Window(c0, r0, c1 - c0, r1 - r0), bands)
    pad = ((0, 0), (r0 - row0, row0 + height - r1), (c0 - col0, col0 + width - c1))
    return np.pad(data, pad, mode="symmetric") if any(p != (0, 0) for p in pad) else data


def _classify(
    classify: Classify, spec: InputSpec, scene: Scene, block: np.ndarray, origins: Sequence[tuple[int, int]],
    batch_size: int, max_nodata: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities ``[n, C]`` of the windows at ``origins`` (row, column) of ``block`` (0
    where not valid), and which windows are valid (at most ``max_nodata`` nodata)."""
    tile = spec.tile_size[0]
    nodata = scene.nodata_mask(block)
    valid = np.asarray([nodata[r : r + tile, c : c + tile].mean() <= max_nodata for r, c in origins])
    probs = np.zeros((len(origins), spec.num_classes), np.float32)
    for batch in _batches(np.flatnonzero(valid), batch_size):
        windows = np.stack([block[:, r : r + tile, c : c + tile] for r, c in (origins[i] for i in batch)])
        probs[batch] = _probabilities(classify, spec, windows, scene.nodata)
    return probs, valid


def _per_window(
    classify: Classify, spec: InputSpec, scene: Scene, writer: MapWriter, stride: int, batch_size: int,
    max_nodata: float,
) -> dict[str, int]:
    """One output pixel per ``stride`` block, from the window centred on that block. Enough
    rows of windows are read at once to fill a batch (a 2048 px scene has 32 per row)."""
    tile = spec.tile_size[0]
    offset = (tile - stride) // 2
    n_cols = writer.dst.width
    rows_per_read = max(1, batch_size // n_cols)
    classified = skipped = 0
    for i in range(0, writer.dst.height, rows_per_read):
        rows = min(rows_per_read, writer.dst.height - i)
        block = _read_padded(scene, spec.bands, i * stride - offset, -offset, (rows - 1) * stride + tile,
                             (n_cols - 1) * stride + tile)
        origins = [(r * stride, c * stride) for r in range(rows) for c in range(n_cols)]
        probs, valid = _classify(classify, spec, scene, block, origins, batch_size, max_nodata)
        writer.write(probs.T.reshape(-1, rows, n_cols), ~valid.reshape(rows, n_cols), Window(0, i, n_cols, rows))
        classified += int(valid.sum())
        skipped += int((~valid).sum())
    return {"windows": classified, "nodata_windows": skipped}


def _full_resolution(
    classify: Classify, spec: InputSpec, scene: Scene, writer: MapWriter, stride: int, batch_size: int,
    max_nodata: float,
) -> dict[str, int]:
    """Every scene pixel: the tent-weighted mean of the windows covering it.

    Weights are separable: each row of windows is blended along the row once (:func:`blend`),
    then added, weighted down the window, to the output rows it covers. Rows not yet written
    all lie within one window of the last row of windows, so they fit a ring of ``tile``
    rows: memory follows tile x width, whatever the stride."""
    tile = spec.tile_size[0]
    ys, xs = window_starts(scene.height, tile, stride), window_starts(scene.width, tile, stride)
    weight = tent(tile)
    num = np.zeros((spec.num_classes, tile, scene.width))  # output row y at y % tile
    den = np.zeros((tile, scene.width))
    done = classified = skipped = 0
    for r, y in enumerate(ys):
        strip = scene.read(Window(0, y, scene.width, tile), spec.bands)
        probs, valid = _classify(classify, spec, scene, strip, [(0, x) for x in xs], batch_size, max_nodata)
        classified, skipped = classified + int(valid.sum()), skipped + int((~valid).sum())
        along, count = blend((probs * valid[:, None]).T, xs, scene.width, weight), blend(valid, xs, scene.width, weight)
        for t, w in enumerate(weight):  # row by row: no [C, tile, W] temporaries
            num[:, (y + t) % tile] += w * along
            den[(y + t) % tile] += w * count
        final = ys[r + 1] if r + 1 < len(ys) else scene.height
        if final <= done:
            continue
        ready = np.arange(done, final) % tile
        rows = Window(0, done, scene.width, final - done)
        invalid = (den[ready] == 0) | scene.nodata_mask(scene.read(rows, spec.bands))
        writer.write(num[:, ready] / np.maximum(den[ready], 1e-12)[None], invalid, rows)
        num[:, ready], den[ready] = 0, 0
        done = final
    return {"windows": classified, "nodata_windows": skipped}


def tile_paths(tiles: str | os.PathLike) -> list[Path]:
    """The tiles of a manifest folder (``labels.csv`` order) or every GeoTIFF below a folder."""
    root = Path(tiles)
    manifest = root / "labels.csv"
    if manifest.is_file():
        with manifest.open(newline="", encoding="utf-8-sig") as handle:
            return [root / row["path"] for row in csv.DictReader(handle)]
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in TIFF_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"{root}: no labels.csv and no .tif tiles")
    return paths


def predict_tiles(
    classify: Classify, spec: InputSpec, tiles: str | os.PathLike, out: str | os.PathLike, batch_size: int = 256,
    allow: Allow | None = None,
) -> dict[str, object]:
    """One CSV row per tile: path, predicted class(es) and one probability per class.

    Tiles are preprocessed as in training (nodata pixels given their band's fill); returns
    the tile count and how the band order was established (``band_order``).
    """
    paths = tile_paths(tiles)
    first = read_header(paths[0])
    spec, band_order = match_bands(spec, first.descriptions, first.count, str(paths[0]))
    # the first tiles' dtype, value scale and pixel size against the contract's, before any inference
    check_input(spec, describe_tiles(paths, spec.bands, str(tiles)), allow or Allow(), "predict")
    thresholds = spec.decision_thresholds()
    out = Path(out)
    with atomic_output(out, ".csv") as target, target.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([*CSV_HEADER, *[f"p_{name}" for name in spec.class_names]])
        for batch in _batches(paths, batch_size):
            with pixel_reads():
                images = [read_raster(p, spec.bands) for p in batch]
            for path, image in zip(batch, images):
                if image.shape != images[0].shape:
                    raise TileError(path, f"is {image.shape[1]}x{image.shape[2]}, not {images[0].shape[1]}x{images[0].shape[2]} like {batch[0]}")
            probs = _probabilities(classify, spec, np.stack(images), first.nodata)
            for path, p in zip(batch, probs):
                if spec.task == MULTICLASS:
                    predicted = spec.class_names[int(p.argmax())]
                else:
                    predicted = " ".join(n for n, hit in zip(spec.class_names, p >= thresholds) if hit)
                writer.writerow([str(path), predicted, *[f"{v:.6f}" for v in p]])
    return {"out": str(out), "tiles": len(paths), "band_order": band_order}
