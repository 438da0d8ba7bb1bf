"""The errors a user can fix: each names the file or setting and the problem in one line.

Every layer raises these, and the commands turn them into one line on stderr and exit status 2
(``deforest.cli.errors``); so they live on the ground floor, importing nothing of deforest.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable


class DatasetError(ValueError):
    """A dataset that cannot be indexed (layout, manifest or label problem)."""


class TileError(ValueError):
    """A tile (or scene) that cannot be used, with the file and the reason."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(ValueError):
    """Config values that cannot work, all listed in one message."""



def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like ``name`` (difflib), if any is close: the "did you mean" of errors."""
    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_setting(group: str, key: str, known: Iterable[str]) -> ConfigError:
    """The error for ``group.key`` that no setting of the config group has: Hydra accepts any new
    key given with ``+``, and without this a constructor would end the run in a TypeError."""
    near = closest(key, sorted(known))
    hint = f"did you mean {group}.{near}?" if near else f"the {group} settings are in conf/{group}/"
    return ConfigError(f"invalid config: {group}.{key} is not a {group} setting ({hint})")


__all__ = ["ConfigError", "DatasetError", "TileError", "closest", "unknown_setting"]
