"""What a command writes never harms what it reads.

* :func:`check_outputs`: no output is an input (the same path, another spelling of it, a
  symlink or a hard link to it: compared by device and inode); an output that is a folder
  where a file is written is refused.
* :func:`check_replaceable`: an existing output is replaced only when it is an earlier
  output of the same command (recognised by what that command writes into it, e.g. the
  ``written_by`` tag of a map) or with ``overwrite=true``, so a file the user made is never
  lost to a mistyped ``out=``.
* :func:`atomic_output`: the output is written to a temporary file beside it and renamed
  over it at the end, so a failed or killed run leaves the earlier output whole.

Kept free of torch imports (``deforest-tile`` starts without torch).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from deforest.safety import temp_prefix

#: config key -> a path, a list of paths (the tiles of a folder) or None
Inputs = Mapping[str, object]


class OutputError(ValueError):
    """An output that would overwrite an input, or a file or folder that cannot be written."""


def _identity(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(device, inode)`` of an existing file (through symlinks), ``None`` when absent.

    ``a/new/../x.tif`` does not resolve while ``a/new`` is missing, but the command creates
    ``a/new`` and then writes ``a/x.tif``: such a path is also read the way it will be written.
    """
    for spelling in (path, os.path.abspath(path)):
        try:
            stat = os.stat(spelling)
        except OSError:
            continue
        return stat.st_dev, stat.st_ino
    return None


def _paths(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [str(value)]
    return [str(v) for v in value]


def check_outputs(
    outputs: Mapping[str, str | os.PathLike | None], inputs: Inputs, files: bool = True, example: str = "map.tif"
) -> None:
    """Refuse (:class:`OutputError`) an output that is one of the inputs.

    ``outputs`` and ``inputs`` map the config key of each path (``out``, ``change.out``,
    ``scene``) to the path; an input may be a list (the tiles of a folder). With ``files``,
    every output is a file: an output that is an existing folder is refused too (``example``
    names a file to suggest instead).
    """
    identities: dict[tuple[int, int], str] = {}
    for key, value in inputs.items():
        paths = _paths(value)
        for path in paths:
            identity = _identity(path)
            if identity is not None:
                identities.setdefault(identity, f"{key}={path}" if len(paths) == 1 else f"{path} (of {key}=)")
    for key, out in outputs.items():
        if out is None:
            continue
        same = identities.get(_identity(out))
        if same is not None:
            kind = "folder" if os.path.isdir(out) else "file"
            raise OutputError(f"{key}={out}: is the same {kind} as the input {same}: give another {key}=")
        if files and os.path.isdir(out):
            raise OutputError(f"{out}: is a folder: give {key}= a file name, e.g. {Path(out) / example}")


def check_replaceable(
    out: str | os.PathLike, command: str, is_own: Callable[[Path], bool], overwrite: bool = False
) -> None:
    """Refuse to replace ``out`` unless it is absent, an earlier output of ``command``
    (``is_own(out)``) or ``overwrite`` is set."""
    out = Path(os.path.abspath(out))
    if overwrite or not out.exists() or out.is_dir():
        return
    try:
        own = is_own(out)
    except Exception:  # unreadable as the command's output: not one of its outputs
        own = False
    if not own:
        raise OutputError(
            f"{out}: exists and is not an earlier output of {command}: give another out=, or overwrite=true to replace it"
        )


@contextmanager
def atomic_output(out: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``out`` to write to; renamed over ``out`` when the block ends
    without an error, removed otherwise. Unwritable folders end in one :class:`OutputError`."""
    out = Path(out)
    for folder in out.parents:  # the nearest existing ancestor must be a folder to write under
        if folder.exists():
            if not folder.is_dir():
                raise OutputError(f"{out}: cannot be written: {folder} is a file, not a folder")
            break
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=temp_prefix(out), suffix=f".tmp{suffix}")
    except OSError as err:
        raise OutputError(f"{out}: cannot be written ({err.strerror or err})") from None
    os.close(fd)
    tmp = Path(tmp)
    # mkstemp makes the file private (0600): give it the mode the file replaced had, or the
    # one a plain open() would give (0666 less the umask)
    try:
        mode = out.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    os.chmod(tmp, mode)
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
