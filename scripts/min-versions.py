#!/usr/bin/env python3
"""Print pip constraints that pin the pure-Python dependencies to the lower bounds
``pyproject.toml`` states (``lightning>=2.6`` -> ``lightning==2.6.0``), for the
minimum-versions CI variant (.ci/run): the fast tests then run against the oldest releases the
package claims to support. Compiled dependencies (torch, torchvision, rasterio, numpy, pandas,
matplotlib, pyogrio, shapely) keep the tested set: their old wheels do not exist for every
Python the range allows, and torch's lower bound is exercised by the GPU check on the GPU
machine's own torch instead (docs/install.md).

    python scripts/min-versions.py > /tmp/min.txt && pip install -e '.[test]' -c /tmp/min.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

#: the dependencies pinned to their lower bound
PURE_PYTHON = ("lightning", "torchmetrics", "hydra-core", "omegaconf", "albumentations", "rich", "markdown")


def lower_bounds(pyproject: Path) -> dict[str, str]:
    """``{name: lower bound}`` of the pure-Python dependencies that state one."""
    requirements = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    bounds = {}
    for requirement in requirements:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
        found = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", requirement)
        if name in PURE_PYTHON and found:
            bounds[name] = found.group(1)
    return bounds


def main() -> int:
    bounds = lower_bounds(Path(__file__).resolve().parents[1] / "pyproject.toml")
    missing = sorted(set(PURE_PYTHON) - set(bounds))
    if missing:
        print(f"min-versions: pyproject.toml states no lower bound for {missing}", file=sys.stderr)
        return 2
    for name, version in sorted(bounds.items()):
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
