"""Errors a user can fix (bad files, bad config, a diverged run) end a command with one clear
line and exit status 2 instead of a traceback; a run stopped by SIGTERM ends with one line and
exit status 143 once it has saved what it needs to resume. See docs/errors.md for each."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from hydra.errors import InstantiationException

from deforest.core.errors import ConfigError, DatasetError, TileError
from deforest.core.outputs import OutputError
from deforest.core.safety import EXIT_INTERRUPTED, CheckpointError, RunDirLocked, RunInterrupted

log = logging.getLogger(__name__)

# kept free of torch imports: deforest-tile starts without torch
USER_ERRORS = (TileError, DatasetError, ConfigError, CheckpointError, RunDirLocked, FloatingPointError, OutputError)
EXIT_USER_ERROR = 2


@contextmanager
def exit_on_user_error(*extra: type[Exception]) -> Iterator[None]:
    """Log a :data:`USER_ERRORS` (or ``extra``) exception as ``<type>: <message>``, exit with status 2;
    a :class:`RunInterrupted` run exits with status 143 (:data:`~deforest.core.safety.EXIT_INTERRUPTED`)."""
    # a log file on a full or read-only disk must not print a traceback per record ("--- Logging
    # error ---"): the console still gets every line, the failing write itself is reported once
    logging.raiseExceptions = False
    try:
        yield
    except RunInterrupted as err:
        log.error("%s: %s", type(err).__name__, err)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except (*USER_ERRORS, *extra, InstantiationException) as caught:
        # hydra.utils.instantiate wraps what a constructor raised (a DatasetError of the data
        # layout for a data.root that is a file): the user's error is its cause
        err = caught.__cause__ if isinstance(caught, InstantiationException) else caught
        if not isinstance(err, (*USER_ERRORS, *extra)):
            raise
        name = "CheckpointError" if isinstance(err, CheckpointError) else type(err).__name__
        # an error every DDP rank raised together (a bad tile found on one of them): one line, rank 0's
        if getattr(err, "ddp_rank", 0) == 0:
            log.error("%s: %s", name, err)
        raise SystemExit(EXIT_USER_ERROR) from None
