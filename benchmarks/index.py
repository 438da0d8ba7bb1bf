"""Index and pack time of BigEarthNet-style trees of growing size, in a fresh process.

Run by ``benchmarks/run.py``; prints ``{"sizes": [...], "index_s": [...], "pack_s": [...],
"second_start_s": [...]}``. Each tree holds ``size`` patch folders of 12 band files and a
labels JSON, as BigEarthNet-S2 v1 does (241,000+ entries at 20,000 patches); the band files
are symbolic links to the 44 real patches shipped in ``data/bigearthnet-s2``, so the tree
costs no disk while indexing still lists, stats and opens every file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "bigearthnet-s2"


def make_tree(root: Path, size: int) -> None:
    """``size`` patch folders named like BigEarthNet's, each linking one real patch's files."""
    patches = sorted(p for p in SAMPLE.iterdir() if p.is_dir())
    root.mkdir(parents=True)
    for i in range(size):
        template = patches[i % len(patches)]
        name = f"S2A_MSIL2A_20170613T101031_{i // 1000}_{i % 1000}"
        folder = root / name
        folder.mkdir()
        for file in template.iterdir():
            suffix = file.name[len(template.name):]
            if suffix == "_labels_metadata.json":
                (folder / f"{name}{suffix}").write_bytes(file.read_bytes())
            else:
                os.symlink(file.resolve(), folder / f"{name}{suffix}")


def measure(work: Path, size: int, workers: int) -> dict:
    from deforest.data.bigearthnet import BigEarthNetLayout
    from deforest.data.datamodule import TileDataModule
    from deforest.data.stores.format import fingerprint
    from deforest.data.stores.packing import pack_dataset

    root = work / f"ben-{size}"
    if not root.is_dir():
        make_tree(root, size)
    layout = BigEarthNetLayout(root, size=120)
    start = time.perf_counter()
    index = layout.build_index()
    fingerprint(layout, index)
    index_s = time.perf_counter() - start
    out = work / f"ben-{size}-pack"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    pack_dataset(layout, out, num_workers=workers, shard_tiles=512)
    pack_s = time.perf_counter() - start - index_s  # pack_dataset indexes again first
    start = time.perf_counter()  # a second start of training: everything from the pack
    TileDataModule.from_keys(None, packed=str(out), validate="quick").setup("fit")
    second_start_s = time.perf_counter() - start
    shutil.rmtree(out)
    return {"index_s": index_s, "pack_s": pack_s, "second_start_s": second_start_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--sizes", default="5000,10000,20000")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = [measure(args.work, size, args.workers) for size in sizes]
    result = {"sizes": sizes, "workers": args.workers, **{k: [r[k] for r in rows] for k in rows[0]}}
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
