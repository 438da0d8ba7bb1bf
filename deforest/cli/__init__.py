"""Command-line entry points (``deforest-*``): each parses its config, calls the library and reports.

Importing this package (before torch loads) caps how long idle OpenMP threads spin, unless
one of :data:`OPENMP_WAIT_VARIABLES` is already set: 1000 spins, the value libgomp itself
switches to when it sees more threads than cores. libgomp cannot see another process's
threads, so at its default (300,000 spins) two runs sharing the cores burn each other's time
waiting at barriers. Measured before/after: benchmarks/README.md (CPU threads), docs/cpu.md.
"""

import os

#: the variables that choose how OpenMP threads wait; a user who set one keeps it
OPENMP_WAIT_VARIABLES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")

if not any(name in os.environ for name in OPENMP_WAIT_VARIABLES):
    os.environ["GOMP_SPINCOUNT"] = "1000"

# albumentations asks PyPI for its newest version at import: on air-gapped GPU machines and in
# the container that is a network timeout and an SSL warning on every run. A user who set the
# variable keeps their choice.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
