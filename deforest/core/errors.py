"""The errors a user can fix: each names the file or setting and the problem in one line.

Every layer raises these, and the commands turn them into one line on stderr and exit status 2
(``deforest.cli.errors``); so they live on the ground floor, importing nothing of deforest.
"""

from __future__ import annotations

import os


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


__all__ = ["ConfigError", "DatasetError", "TileError"]
