"""Errors a user can fix (bad files, bad config, a diverged run) end a command with one clear
line and exit status 2 instead of a traceback; see docs/errors.md for what to do about each."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from deforest.config_checks import ConfigError
from deforest.datasets import DatasetError
from deforest.io import TileError

log = logging.getLogger(__name__)

# kept free of torch imports: deforest-tile starts without torch
USER_ERRORS = (TileError, DatasetError, ConfigError, FloatingPointError)
EXIT_USER_ERROR = 2


@contextmanager
def exit_on_user_error(*extra: type[Exception]) -> Iterator[None]:
    """Log a :data:`USER_ERRORS` (or ``extra``) exception as ``<type>: <message>``, exit with status 2."""
    try:
        yield
    except (*USER_ERRORS, *extra) as err:
        log.error("%s: %s", type(err).__name__, err)
        raise SystemExit(EXIT_USER_ERROR) from None
