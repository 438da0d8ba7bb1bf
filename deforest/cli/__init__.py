"""Command-line entry points (``deforest-*``): each parses its config, calls the library and reports.

Importing this package (before torch loads) caps how long idle OpenMP threads spin, unless
``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` is already set: 1000 spins, the value libgomp itself
switches to when it sees more threads than cores. libgomp cannot see another process's
threads, so at its default (300,000 spins) two runs sharing the cores burn each other's time
waiting at barriers: 4-12x slower epochs with one concurrent copy, against 1.9x at 1000 spins,
which costs a run alone nothing (measured: benchmarks/README.md, CPU threads).
"""

import os

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
