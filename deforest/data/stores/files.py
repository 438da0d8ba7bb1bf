"""Tile files as a :class:`~deforest.data.stores.base.TileStore`: each header checked and the
training tiles read for the band statistics, both cached as JSON keyed by the files they read."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from deforest.core.errors import DatasetError, TileError
from deforest.data.checks import BadTiles, band_order, check_header, constant_tile, reference_header
from deforest.data.dataset import TileDataset
from deforest.data.index import TileIndex
from deforest.data.input_check import PERCENTILES, PixelSample
from deforest.data.io import RasterHeader, file_fingerprint, pixel_reads, read_header
from deforest.data.layouts import TileLayout
from deforest.data.statistics import JsonCache, measure_band_statistics
from deforest.data.stores.base import BandSummary, HeaderCheck, ScanRequest, TileStore

log = logging.getLogger(__name__)


class FileStore(TileStore):
    """The tiles of ``layout``, read file by file; ``cache_dir`` keeps the header checks and
    band statistics (``None``: nothing is cached)."""

    def __init__(self, layout: TileLayout, cache_dir: str | None = None) -> None:
        self.layout = layout
        self.cache = JsonCache(cache_dir)

    @property
    def layout_name(self) -> str:
        return type(self.layout).__name__

    def reference_header(self, index: TileIndex, wanted: int, bad_tiles: BadTiles) -> RasterHeader:
        headers = []
        for source in index.sources:
            try:
                headers.append(read_header(self.layout.header_source(source)))
            except TileError as err:
                bad_tiles.add(err, source)
            if len(headers) == wanted:
                break
        if not headers:
            raise DatasetError(f"{self.layout.root}: no tile can be read")
        return reference_header(headers)

    def reads_by_name(self, reference: RasterHeader) -> bool:
        # BigEarthNet's one file per band and a pair's two dates: the header file is not the sample
        return self.layout.band_count(reference.count) == reference.count

    def check_headers(self, request: ScanRequest, reference: RasterHeader, validate: str,
                      bad_tiles: BadTiles) -> HeaderCheck:
        """Every tile must have the dataset's band count and size and a supported dtype (``quick``)."""
        size = (reference.height, reference.width)
        if validate == "off":
            return HeaderCheck(size, {})
        key = self._cache_key("headers", request)
        cached = self.cache.load("headers", key, _valid_headers_cache)
        if cached is None:
            bad, orders = {}, {}
            for source in request.index.sources:
                path = self.layout.header_source(source)
                try:
                    header = read_header(path)
                    check_header(path, header, reference)
                    loaded = _tile_bands(path, header, request)
                except TileError as err:
                    bad[source] = [err.path, err.problem]
                    continue
                if loaded is not None:
                    orders[source] = loaded
            cached = {"tile_size": list(size), "bad": bad, "orders": orders}
            self.cache.store("headers", key, cached)
        orders = {source: list(bands) for source, bands in cached["orders"].items()}
        if orders:
            log.info("%d tile(s) store their bands in another order than %s (e.g. %s): read by name",
                     len(orders), request.names, next(iter(orders)))
        for source, (path, problem) in cached["bad"].items():
            bad_tiles.add(TileError(path, problem), source, more=len(cached["bad"]) - 1)
        return HeaderCheck(tuple(cached["tile_size"]), orders)

    def statistics(self, request: ScanRequest, orders: Mapping[str, Sequence[int]],
                   bad_tiles: BadTiles) -> BandSummary:
        """Read once (the value range in the same pass), then cached as JSON."""
        bands = len(request.bands)
        key = self._cache_key("stats", request)
        cached = self.cache.load("stats", key, lambda value: _valid_stats_cache(value, bands))
        if cached is None:
            rows = request.stats_rows
            index = request.index
            reader = TileDataset(self.layout, [index.sources[i] for i in rows], index.targets[rows], request.bands,
                                 orders=orders)
            constant = []

            def read_valid(i: int) -> tuple[np.ndarray, np.ndarray | None]:
                image, valid = reader.read_valid(i)
                if constant_tile(image, valid) is not None:
                    constant.append(reader.sources[i])
                return image, valid

            sample = PixelSample(bands, len(reader))
            with pixel_reads():
                mean, std = measure_band_statistics(
                    read_valid, len(reader), bands, request.log_scale,
                    lambda err, i: bad_tiles.add(err, reader.sources[i]), sample.add,
                )
            cached = {"mean": mean, "std": std, "constant": constant}
            cached["low"], cached["high"] = sample.percentiles() or (None, None)
            self.cache.store("stats", key, cached)
        warn_constant(cached.get("constant", []), "of the training tiles read for the band statistics", refused=False)
        return BandSummary(cached["mean"], cached["std"], cached.get("low"), cached.get("high"))

    def _cache_key(self, kind: str, request: ScanRequest) -> str:
        """What a cached result depends on: the (training) files, bands and settings."""
        rows = request.train_rows if kind == "stats" else range(len(request.index))
        files = [f for i in rows for f in self.layout.stamp_files(request.index.sources[i])]
        payload = {
            "bands": request.bands,
            # the names tiles are matched to by their descriptions (each tile's band order)
            "band_names": request.names,
            "log_scale": request.log_scale,
            "max_samples": request.stats_max_samples,
            "seed": request.seed,
            "files": file_fingerprint(files),
        }
        if kind == "stats":  # entries written before they held the value range are not reused
            payload["range"] = list(PERCENTILES)
        return JsonCache.key(kind, payload)


def _tile_bands(path: str, header: RasterHeader, request: ScanRequest) -> list[int] | None:
    """The file bands holding the loaded bands of the tile ``header`` describes, where they
    differ from the loaded bands (``None``: read those); raises TileError for a tile that
    names its bands without one of the names matched to."""
    order = band_order(path, header, request.names)
    if order is None:
        return None
    loaded = order if request.names_loaded else [order[b - 1] for b in request.bands]
    return None if loaded == request.bands else loaded


def warn_constant(sources: Sequence[str], read: str, refused: bool) -> None:
    """One warning line for the tiles of one value per band that declare no nodata (every pixel
    0, or constant): they carry no signal, yet would train as real samples."""
    if not sources:
        return
    what = ("they are bad tiles (data.on_bad_tile)" if refused
            else "they train as they are; data.validate=full refuses them")
    log.warning("%d tile(s) %s hold one value in every band (all 0, or constant) and declare no nodata, the "
                "first %s: %s; declare their nodata or remove them", len(sources), read, sources[0], what)


def _finite_numbers(numbers: object, count: int) -> bool:
    return isinstance(numbers, list) and len(numbers) == count and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in numbers)


def _valid_stats_cache(value: object, bands: int) -> str | None:
    """What is wrong with a cached statistics entry (None: nothing)."""
    if not isinstance(value, dict) or not {"mean", "std"} <= set(value):
        return "no mean/std entries"
    for key in ("mean", "std"):
        numbers = value[key]
        if not isinstance(numbers, list) or len(numbers) != bands:
            return f"{key} is not a list of {bands} numbers"
        if not _finite_numbers(numbers, bands):
            return f"{key} holds a value that is not a finite number"
    if not all(v > 0 for v in value["std"]):
        return "std holds a value <= 0"
    for key in ("low", "high"):  # the value range: None when a band had no valid pixel
        numbers = value.get(key)
        if numbers is not None and not _finite_numbers(numbers, bands):
            return f"{key} is not a list of {bands} finite numbers"
    if not isinstance(value.get("constant", []), list) or not all(isinstance(v, str) for v in value.get("constant", [])):
        return "'constant' is not a list of tiles"
    return None


def _valid_headers_cache(value: object) -> str | None:
    """What is wrong with a cached header-check entry (None: nothing)."""
    if not isinstance(value, dict) or not isinstance(value.get("bad"), dict):
        return "no 'bad' table"
    size = value.get("tile_size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        return "tile_size is not two positive integers"
    if not all(isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v) for v in value["bad"].values()):
        return "a 'bad' entry is not [path, problem]"
    orders = value.get("orders")
    if not isinstance(orders, dict) or not all(
        isinstance(v, list) and v and all(isinstance(x, int) and x > 0 for x in v) for v in orders.values()
    ):
        return "'orders' is not a table of band lists"
    return None
