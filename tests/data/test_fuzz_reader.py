"""Hypothesis feeds mutated bytes of a real EuroSAT tile to the tile reader.

Every mutant must either read (float32 ``[C, H, W]``) or raise :class:`TileError` naming the
file. The fuzzing runs in a child process with a memory cap and a timeout, so a hang, a
segfault in GDAL or a runaway allocation fails the test instead of taking pytest down.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

MAX_EXAMPLES = 300
MEMORY_CAP = 3 * 1024**3


def fuzz(tile: Path, workdir: Path, max_examples: int) -> None:
    """Run the hypothesis search (in the child process)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from deforest.core.errors import TileError
    from deforest.data.io import read_header, read_raster

    original = tile.read_bytes()
    n = len(original)
    # Most structure (IFD, tags, GeoKeys, strip tables) sits in the first kilobyte.
    position = st.one_of(st.integers(0, 1023), st.integers(0, n - 1))
    overwrite = st.tuples(position, st.binary(min_size=1, max_size=4))
    target = workdir / "mutant.tif"

    @settings(
        max_examples=max_examples, deadline=None, derandomize=True, database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(edits=st.lists(overwrite, min_size=1, max_size=6), cut=st.one_of(st.none(), st.integers(0, n)))
    def read_or_tile_error(edits: list[tuple[int, bytes]], cut: int | None) -> None:
        data = bytearray(original)
        for at, chunk in edits:
            data[at : at + len(chunk)] = chunk
        target.write_bytes(bytes(data[:cut]))
        for reader in (read_header, read_raster):
            try:
                out = reader(target)
            except TileError as err:
                assert str(err).startswith(f"{target}: ") and err.problem.strip(), str(err)
                continue
            if reader is read_raster:
                assert out.dtype == np.float32 and out.ndim == 3

    read_or_tile_error()


def test_mutated_tiles_read_or_raise_tile_error(eurosat_root: Path, tmp_path: Path) -> None:
    tile = sorted((eurosat_root / "train" / "Forest").glob("*.tif"))[0]
    done = subprocess.run(
        [sys.executable, __file__, str(tile), str(tmp_path), str(MAX_EXAMPLES)],
        capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert f"{MAX_EXAMPLES} mutants" in done.stdout


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    fuzz(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
    print(f"{sys.argv[3]} mutants read or raised TileError")
