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

import errno
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from deforest.core.safety import NO_SPACE_ERRNOS, temp_prefix

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
def atomic_output(
    out: str | os.PathLike, suffix: str = "", verify: Callable[[Path], None] | None = None
) -> Iterator[Path]:
    """A temporary path beside ``out`` to write to; renamed over ``out`` when the block ends
    without an error, removed otherwise. Unwritable folders, a full disk and a read-only mount
    end in one :class:`OutputError`. ``verify(tmp)`` runs before the rename, for writers that
    do not raise when a write fails (see :func:`read_back_raster`)."""
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
        try:
            yield tmp
            # on disk before the rename: a crash or a full disk found at write-back never leaves
            # a short file under the final name
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if verify is not None:
                verify(tmp)
            os.replace(tmp, out)
        except Exception as err:
            refused = write_refused(err, out.parent)
            if refused is None:
                raise
            raise OutputError(f"{out}: cannot be written ({refused})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_back_raster(path: Path) -> None:
    """Read every pixel of a raster just written: GDAL only logs a write that the disk refused
    (``TIFFWriteDirectoryTagData: IO error``) and closes the file as if whole, so a map on a full
    disk is caught here, as the reader that cannot open or decode it."""
    import rasterio

    with rasterio.open(path) as src:
        for _, window in src.block_windows(1):
            src.read(window=window)


def write_text_output(out: str | os.PathLike, text: str) -> None:
    """``text`` into ``out`` through :func:`atomic_output`: whole or not at all."""
    with atomic_output(out, Path(out).suffix) as tmp:
        tmp.write_text(text, encoding="utf-8")


#: errnos of a write the file system refused: no room, or a read-only mount
_REFUSED_WRITE_ERRNOS = NO_SPACE_ERRNOS | {errno.EROFS}


def write_refused(err: BaseException, folder: str | os.PathLike) -> str | None:
    """Why the file system refused ``err``'s write into ``folder`` ("No space left on device",
    "Read-only file system"), or ``None`` when ``err`` is another failure.

    An ``OSError`` says so by its errno. Libraries that write through their own I/O (GDAL,
    PIL's encoders) may raise without one; a failed write into a folder whose file system is
    read-only or has (almost) no room left is then taken as refused for that reason.
    """
    if isinstance(err, OSError) and err.errno in _REFUSED_WRITE_ERRNOS:
        return os.strerror(err.errno)
    if not isinstance(err, OSError) and not type(err).__module__.startswith("rasterio"):
        return None  # not an I/O failure (a bad tile met while writing a map is that tile's error)
    try:
        fs = os.statvfs(folder)
    except OSError:
        return None
    if fs.f_flag & os.ST_RDONLY:
        return os.strerror(errno.EROFS)
    if fs.f_bavail * fs.f_frsize < 1 << 20:  # less than 1 MiB: what a write that needed room found
        return os.strerror(errno.ENOSPC)
    return None
