"""The Dockerfile: hadolint-clean, builds from a replaceable base, pinned, non-root.

Building and running the image is scripts/container-smoke.sh (too slow for every CI run).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_takes_the_base_as_build_arg_and_runs_deforest_train_as_non_root():
    assert DOCKERFILE.index("\nARG BASE=python:3.11-slim\n") < DOCKERFILE.index("\nFROM ")
    assert re.findall(r"^FROM (\S+)", DOCKERFILE, re.M) == ["${BASE}", "${BASE}"]
    assert DOCKERFILE.rstrip().endswith('ENTRYPOINT ["deforest-train"]')
    (user,) = re.findall(r"^USER (\S+)", DOCKERFILE, re.M)
    assert user.split(":")[0] not in ("root", "0")
    assert "--constraint /tmp/constraints.txt /tmp/wheels/deforest-" in DOCKERFILE


def test_dockerignore_sends_only_what_the_build_copies():
    lines = [l for l in (REPO / ".dockerignore").read_text().splitlines() if l and not l.startswith("#")]
    assert lines[0] == "*"
    copied = set(re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE, re.M))
    sent = {l[1:].rstrip("/") for l in lines if l.startswith("!")}
    assert {p for c in copied for p in c.split()} <= sent


def test_constraints_pin_every_runtime_dependency_within_pyproject_ranges():
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned: rerun scripts/freeze-constraints.py > constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {text}"
    assert pins["torch"] == "2.14.1"
