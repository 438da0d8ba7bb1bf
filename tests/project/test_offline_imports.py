"""The commands open no network connection at import: air-gapped GPU machines and the
container must not wait on (or warn about) a request to PyPI."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import socket, sys
attempts = []
real_connect = socket.socket.connect
def connect(self, address):
    attempts.append(address)
    raise OSError("network disabled in this test")
socket.socket.connect = connect
import deforest.cli.train  # imports torch, lightning, hydra
import albumentations  # imported where a data.augment pipeline is built, after deforest.cli set its variable
print(len(attempts))
"""


def test_entry_points_open_no_connection_at_import():
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "0", result.stderr[-2000:]
