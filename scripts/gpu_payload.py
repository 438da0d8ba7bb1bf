#!/usr/bin/env python3
"""What travels to a bare GPU machine for scripts/gpu-check.sh, and whether it fits.

The GPU machines (docs/orchestrate.md, "On a bare, air-gapped GPU machine") have Python 3.12 with torch,
torchvision, lightning, torchmetrics, numpy, pandas, matplotlib, rich, tensorboard, pyyaml,
click, attrs and certifi, but none of the project's raster, config or augmentation
dependencies, and nothing can be downloaded there. What the check needs beyond that travels
as wheels in ``.whl/`` beside the checkout (:data:`CARRIED_WHEELS`, fetched by
scripts/gpu-wheels.sh); everything in :data:`BARE_MISSING` stays behind, so nothing the check
runs may import it (tests/project/test_gpu_payload.py runs the check with those imports refused).
The checkout and the wheels travel together, at most :data:`LIMIT` bytes.

    python scripts/gpu_payload.py --dry-run        # every file that travels, sizes, the total; exit 1 over 64 MiB
    python scripts/gpu_payload.py --requirements   # name==version of each carried wheel (scripts/gpu-wheels.sh)
    python scripts/gpu_payload.py --modules        # the modules they bring (scripts/gpu-check.sh)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: what a device call carries at most: the checkout's tracked and untracked-not-ignored files plus the carried paths
LIMIT = 64 * 2**20
#: the carried wheels' folder, relative to the checkout (ignored through .git/info/exclude, named in the call's carry)
WHEEL_DIR = ".whl"

#: distribution -> (version, bytes of its cp312 manylinux x86_64 wheel as scripts/gpu-wheels.sh saves it).
#: rasterio 1.4.3, not constraints.txt's 1.4.4: 1.4.4's only cp312 Linux wheel (manylinux_2_28) is 35.7 MB and
#: does not fit beside the 40 MB checkout, 1.4.3's manylinux2014 wheel is 22.3 MB; both are built against
#: numpy 2 (the machine has 2.5). antlr4-python3-runtime 4.9.3 (omegaconf 2.3 requires 4.9.*) is published as
#: an sdist only: gpu-wheels.sh builds its pure-Python wheel here. affine is rasterio's one import-time
#: dependency the machine lacks (attrs, certifi, click, numpy, pyparsing are there); hydra-core needs
#: omegaconf, antlr4, packaging, and omegaconf pyyaml, which the machine has.
CARRIED_WHEELS: dict[str, tuple[str, int]] = {
    "rasterio": ("1.4.3", 22_251_721),
    "affine": ("3.0.1", 10_887),
    "hydra-core": ("1.3.8", 168_949),
    "omegaconf": ("2.3.1", 79_502),
    "antlr4-python3-runtime": ("4.9.3", 144_590),
}
#: the distributions gpu-wheels.sh must build from source (no wheel on PyPI)
BUILT_FROM_SDIST = ("antlr4-python3-runtime",)
#: the top-level modules the carried wheels bring
CARRIED_MODULES = ("rasterio", "affine", "hydra", "omegaconf", "antlr4")

#: top-level modules that the bare machine lacks and the wheels do not bring: installed here (constraints.txt or
#: optional extras), absent there. Everything scripts/gpu-check.sh runs must work without them, so the modules
#: that need them import them where they are used (albumentations: only for a worker-side augmentation pipeline,
#: which trainer=gpu replaces by D4 flips on the device).
BARE_MISSING = (
    "albumentations", "albucore", "stringzilla", "simsimd", "pydantic", "pydantic_core", "annotated_types",
    "typing_inspection",  # albumentations and its dependencies: 8 MB of wheels that would not fit
    "pyogrio", "shapely",  # vector labels and areas (deforest.mapping.labelling, reference_sample, sampling_design): 33 MB of wheels
    "zarr", "s3fs", "aiobotocore", "botocore", "boto3", "moto",  # packs in object storage (deforest.data.stores.remote)
    "torchgeo",  # model.weights=<TorchGeo name>
    "cligj", "click_plugins",  # rasterio's `rio` command line only, not its library
)


def requirements() -> list[str]:
    return [f"{name}=={version}" for name, (version, _) in CARRIED_WHEELS.items()]


def checkout_files(repo: Path = REPO) -> list[Path]:
    """The files a device call sends of the checkout: tracked ones that exist, and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                            check=True, capture_output=True).stdout.decode().split("\0")
    return sorted({repo / name for name in listed if name and (repo / name).is_file() and not (repo / name).is_symlink()})


def wheel_files(repo: Path = REPO) -> list[Path]:
    return sorted((repo / WHEEL_DIR).glob("*.whl"))


def payload(repo: Path = REPO) -> tuple[list[tuple[str, int]], int]:
    """(path, bytes) of each file that travels, the wheels last (a wheel already counted as untracked once)."""
    wheels = set(wheel_files(repo))
    rows = [(str(p.relative_to(repo)), p.stat().st_size) for p in checkout_files(repo) if p not in wheels]
    rows += [(str(p.relative_to(repo)), p.stat().st_size) for p in sorted(wheels)]
    return rows, sum(size for _, size in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="list what would travel and its total; exit 1 over the limit")
    parser.add_argument("--requirements", action="store_true", help="print name==version of each carried wheel")
    parser.add_argument("--modules", action="store_true", help="print the carried modules, comma-separated")
    parser.add_argument("--quiet", action="store_true", help="with --dry-run: only the folders' sums and the total")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout (default: this script's)")
    args = parser.parse_args()
    if args.requirements:
        print("\n".join(requirements()))
        return 0
    if args.modules:
        print(",".join(CARRIED_MODULES))
        return 0
    rows, total = payload(args.repo)
    if not args.quiet:
        for name, size in rows:
            print(f"{size:>12,d}  {name}")
    folders: dict[str, int] = {}
    for name, size in rows:
        top = name.split("/", 1)[0] if "/" in name else "."
        folders[top] = folders.get(top, 0) + size
    for top, size in sorted(folders.items(), key=lambda kv: -kv[1]):
        print(f"{size:>12,d}  {top}/ (sum)")
    missing = [name for name in CARRIED_WHEELS if not any(
        p.name.lower().startswith(name.replace("-", "_").lower() + "-") for p in wheel_files(args.repo))]
    if missing:
        print(f"gpu-payload: {WHEEL_DIR}/ lacks the wheels of {', '.join(missing)} (run scripts/gpu-wheels.sh)")
    verdict = "fits" if total <= LIMIT else "is over"
    print(f"gpu-payload: {total:,d} bytes ({total / 2**20:.1f} MiB) in {len(rows)} files {verdict} "
          f"the {LIMIT:,d}-byte (64 MiB) limit")
    return 0 if total <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
