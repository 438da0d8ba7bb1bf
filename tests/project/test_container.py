"""The Dockerfile: hadolint-clean, builds from a replaceable base, pinned, non-root.

Building and running the image is scripts/container-smoke.sh (too slow for every CI run).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
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


def _final_stage() -> str:
    return DOCKERFILE[DOCKERFILE.rindex("\nFROM ") :]


def _install_command() -> str:
    """The final stage's RUN that installs deforest, its continuation lines joined."""
    (run,) = re.findall(r"^RUN (python3 -m venv /opt/deforest.*?)(?<!\\)$", _final_stage(), re.M | re.S)
    return run.replace("\\\n", " ")


def _pip_arguments(torch_index: str | None) -> list[str]:
    """What that RUN hands to pip, the shell expanding it as the build does with the build
    argument TORCH_INDEX set or not (the other commands stubbed out)."""
    stubs = "python3() { :; }; pip() { printf '%s\\n' \"$@\"; }; rm() { :; }; useradd() { :; }; mkdir() { :; }; chown() { :; }"
    env = {"PATH": "/usr/bin:/bin", **({"TORCH_INDEX": torch_index} if torch_index is not None else {})}
    done = subprocess.run(["sh", "-c", f"{stubs}; {_install_command()}"], capture_output=True, text=True, env=env, check=True)
    return done.stdout.splitlines()


def test_torch_index_build_arg_chooses_the_cpu_torch_and_defaults_to_pypi():
    """``--build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu`` reaches the final stage's
    pip as an extra index (its ``torch==2.14.1+cpu`` satisfies the ``torch==2.14.1`` pin); without it
    pip sees PyPI alone, whose torch carries the CUDA libraries GPU users need."""
    assert re.search(r'^ARG TORCH_INDEX=""$', _final_stage(), re.M)
    cpu = "https://download.pytorch.org/whl/cpu"
    assert _pip_arguments(cpu) == ["install", "--no-cache-dir", "--extra-index-url", cpu,
                                   "--constraint", "/tmp/constraints.txt", "/tmp/wheels/deforest-*.whl"]
    assert _pip_arguments(None) == _pip_arguments("") == ["install", "--no-cache-dir", "--constraint",
                                                          "/tmp/constraints.txt", "/tmp/wheels/deforest-*.whl"]
    header = DOCKERFILE[: DOCKERFILE.index("\nFROM ")]
    assert f"TORCH_INDEX={cpu}" in header and "GPU users keep" in header


def test_pip_sources_are_build_args_of_both_stages_not_image_settings():
    """Each stage's pip reads PIP_EXTRA_INDEX_URL/PIP_FIND_LINKS from build arguments (RUN sees
    them as environment variables); no ENV keeps them in the image, where their folders are absent."""
    stages = DOCKERFILE.split("\nFROM ")[1:]
    assert len(stages) == 2
    for stage in stages:
        assert {"PIP_CERT", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"} <= set(re.findall(r"^ARG (\w+)$", stage, re.M))
    assert "PIP_EXTRA_INDEX_URL=" not in DOCKERFILE and "PIP_FIND_LINKS=" not in DOCKERFILE


def test_smoke_script_hands_the_hosts_local_pip_sources_to_the_build(tmp_path):
    """scripts/container-smoke.sh's ``local_pip_sources``, on a pip configured (as this machine's is,
    in /etc/xdg/pip) with a local index mirror, a remote index and a folder of wheels: build
    arguments naming the local ones and read-only mounts of their folders, the mirror's with the
    files its pages link to."""
    script = (REPO / "scripts" / "container-smoke.sh").read_text()
    (function,) = re.findall(r"^local_pip_sources\(\) \{\n.*?^\}\n", script, re.M | re.S)
    for folder in ("mirror/simple/torch", "mirror/files", "wheels"):
        (tmp_path / folder).mkdir(parents=True)
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PIP_CONFIG_FILE": os.devnull,
           "PIP_EXTRA_INDEX_URL": f"file://{tmp_path}/mirror/simple https://example.org/simple",
           "PIP_FIND_LINKS": f"{tmp_path}/wheels {tmp_path}/absent https://example.org/links"}
    done = subprocess.run(["bash", "-c", f"{function}local_pip_sources"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"--build-arg=PIP_EXTRA_INDEX_URL=file://{tmp_path}/mirror/simple",
        f"--build-arg=PIP_FIND_LINKS={tmp_path}/wheels",
        f"--volume={tmp_path}/mirror:{tmp_path}/mirror:ro",
        f"--volume={tmp_path}/wheels:{tmp_path}/wheels:ro",
    ]
    assert '"${pip_local[@]}"' in script[script.index("buildah bud") :]
