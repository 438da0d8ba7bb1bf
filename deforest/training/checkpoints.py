"""Checkpoint files that are never half-written, and loaded without running code from them.

Lightning's own save goes through an fsspec transaction whose temporary file lives in the
system temp dir: moving it onto another filesystem is a copy, not an atomic rename, and
nothing is fsynced. Here the temporary file sits beside the target, is fsynced, and
``os.replace`` swaps it in, so a kill at any moment leaves the previous checkpoint intact.

Loading is ``torch.load(weights_only=True)`` (no pickled code), and :func:`model_kwargs`
decides which saved hyper-parameters may rebuild a model: only plain data, never a setting
that configures code execution (``compile`` and its compiler options, callables, import
paths, ``_target_``s). Those come from the current config only.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import pickle
import pickletools
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from deforest.core.safety import (
    NO_SPACE_ERRNOS,
    CheckpointError,
    UnsafeCheckpointError,
    remove_stale_temps,
    temp_prefix,
)

log = logging.getLogger(__name__)

#: saved hyper-parameters never used to rebuild a model: they configure code execution
#: (``torch.compile`` runs compilers named in its options) or are code themselves
EXECUTION_HPARAMS = frozenset({"compile", "optimizer", "scheduler", "criterion"})
#: keys of configs that name code to import or call (Hydra, Lightning CLI, jsonargparse)
CODE_KEYS = frozenset({"_target_", "_partial_", "_args_", "_instantiator", "_class_path", "class_path", "init_args"})
#: what a failing ``torch.load`` raises for a truncated, corrupt or foreign file
CHECKPOINT_READ_ERRORS = (OSError, RuntimeError, EOFError, ValueError, KeyError, zipfile.BadZipFile, pickle.UnpicklingError)


class _RecordingWriter:
    """A file for ``torch.save`` that keeps the ``OSError`` of a failed write.

    ``torch.save`` turns a failed write into a ``RuntimeError`` about stream positions; the
    recorded error says whether the disk was full.
    """

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.handle.flush()


def _no_space(err: BaseException | None) -> bool:
    return isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS


class AtomicCheckpointIO(TorchCheckpointIO):
    """Atomic local saves; loads with ``weights_only=True`` unless told otherwise.

    Remote paths (``s3://`` ...) fall back to Lightning's transaction-based save. A save the
    file system refuses (disk full, quota, file size limit) raises :class:`CheckpointError`
    naming the directory; the previous checkpoint stays as it was.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # leftovers of saves that were killed; another live writer's temporary file is left alone
        remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
        writer = None
        try:
            with os.fdopen(fd, "wb") as f:
                writer = _RecordingWriter(f)
                torch.save(checkpoint, writer)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            Path(tmp).unlink(missing_ok=True)
            cause = err if _no_space(err) else (writer.error if writer is not None else None)
            if _no_space(cause):
                kept = "the previous one is intact" if path.is_file() else "there is no previous one"
                raise CheckpointError(
                    path.parent,
                    f"no room to save {path.name} ({os.strerror(cause.errno)}); {kept}. Free space there, "
                    f"or write the run elsewhere (hydra.run.dir=...)",
                ) from None
            raise
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)

    def load_checkpoint(
        self,
        path: str | os.PathLike,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, True if weights_only is None else weights_only)
        return read_checkpoint(path, map_location, True if weights_only is None else weights_only, lightning=False)


def read_checkpoint(
    path: str | os.PathLike, map_location: Any = "cpu", weights_only: bool = True, lightning: bool = True
) -> dict[str, Any]:
    """``torch.load`` a checkpoint; a missing, truncated or foreign file raises
    :class:`CheckpointError` naming it (pickled code still fails as ``Weights only load failed``).

    ``lightning``: it must be a Lightning checkpoint (a dict with a ``state_dict``).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(path, "checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as err:
        refused = _refused_global(path, err)
        if refused:  # a class or function to import and call: pickled code, refused
            raise UnsafeCheckpointError(
                path, f"refused: it holds pickled objects, not only tensors and plain data (Weights only load failed: "
                f"Unsupported global: GLOBAL {refused})",
            ) from None
        raise CheckpointError(  # bytes that are no pickle at all
            path, f"is not a readable checkpoint: truncated or corrupt ({path.stat().st_size} bytes; not a torch file)"
        ) from None
    except CHECKPOINT_READ_ERRORS as err:
        size = path.stat().st_size
        raise CheckpointError(
            path, f"is not a readable checkpoint: truncated or corrupt ({size} bytes; {_first_line(err)})"
        ) from None
    if lightning and (not isinstance(checkpoint, dict) or "state_dict" not in checkpoint):
        raise CheckpointError(path, "is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def _refused_global(path: Path, err: Exception) -> str | None:
    """The first class or function a checkpoint's pickle names that ``weights_only`` loading
    refused (``os.system``): from torch's message, which words it two ways, or, when it names
    none (a plain pickle it cannot parse), from the pickle's opcodes (read, never run).
    ``None``: it names none; the bytes are damaged."""
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text) or re.search(r"unsupported GLOBAL (\S+) whose", text)
    if found:
        return _readable_global(found.group(1))
    names = [name for name in _pickle_globals(path) if not name.startswith(WEIGHTS_GLOBALS)]
    return _readable_global(names[0]) if names else None


#: what a saved state names (tensor rebuilders, storages, OrderedDict): not code to refuse
WEIGHTS_GLOBALS = ("torch.", "collections.OrderedDict", "builtins.", "_codecs.encode", "numpy.")


def _readable_global(name: str) -> str:
    """``posix.system`` as ``os.system``: ``os`` functions pickle under the platform's module."""
    module, _, attr = name.rpartition(".")
    return f"os.{attr}" if module in ("posix", "nt") else name


def _pickle_globals(path: Path) -> list[str]:
    """``module.name`` of every GLOBAL and STACK_GLOBAL in the checkpoint's pickle, in order."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                data = archive.read(member) if member else b""
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile, KeyError):
        return []
    names: list[str] = []
    strings: list[str] = []  # the strings pushed so far: STACK_GLOBAL takes the last two
    memo: dict[int, str | None] = {}
    previous: str | None = None  # the string the previous opcode left on the stack
    try:
        for opcode, arg, _ in pickletools.genops(data):
            kind = opcode.name
            if kind == "MEMOIZE":
                memo[len(memo)] = previous
                continue
            if kind in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = previous
                continue
            pushed = None
            if kind == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif kind == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str) and ("UNICODE" in kind or kind.endswith("STRING")):
                pushed = arg
            elif kind in ("GET", "BINGET", "LONG_BINGET"):
                pushed = memo.get(arg)
            if pushed is not None:
                strings.append(pushed)
            previous = pushed
    except Exception:  # damaged or cut bytes: the names found up to there
        pass
    return names


def checkpoint_epoch(path: str | os.PathLike) -> int | None:
    """The 0-based epoch a Lightning checkpoint was saved in (its file name's number);
    ``None`` when the file does not record one."""
    epoch = read_checkpoint(path).get("epoch")
    return int(epoch) if epoch is not None else None


def checkpoint_problem(path: str | os.PathLike) -> CheckpointError | None:
    """Why training cannot resume from ``path`` (None when it can)."""
    try:
        checkpoint = read_checkpoint(path)
    except CheckpointError as err:
        return err
    if "loops" not in checkpoint or "global_step" not in checkpoint:
        return CheckpointError(path, "holds weights only, no training state to resume from")
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


# ---- rebuilding a model from saved hyper-parameters ----------------------------------------
def _plain(value: Any, where: str) -> None:
    """Raise ``CheckpointError``-ready ``ValueError`` unless ``value`` is plain data."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _plain(item, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has a non-string key {key!r}")
            if key in CODE_KEYS:
                raise ValueError(f"{where} names code to run ({key}={item!r})")
            _plain(item, f"{where}.{key}")
        return
    raise ValueError(f"{where} is a {type(value).__name__}, not plain data")


def model_kwargs(
    cls: type, hparams: Mapping[str, Any], path: str | os.PathLike, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The keyword arguments of ``cls`` from a checkpoint's ``hyper_parameters``.

    Kept: the constructor's parameters whose saved values are plain data. Dropped: every
    :data:`EXECUTION_HPARAMS` key (these take the constructor's default unless ``overrides``,
    which come from the caller and so from the current config, set them) and keys the
    constructor does not take. A value that names code (``_target_``, ``class_path``, ...) or
    is not plain data makes the checkpoint unusable.
    """
    parameters = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kwargs: dict[str, Any] = {}
    ignored = []
    for key, value in hparams.items():
        if key in EXECUTION_HPARAMS:
            if value not in (None, False, {}):
                log.info("%s: ignoring the saved %s=%r; code-execution settings come from the current config", path, key, value)
            continue
        if key not in parameters:
            ignored.append(key)
            continue
        try:
            _plain(value, key)
        except ValueError as err:
            raise CheckpointError(path, f"refused: its hyper-parameter {err}") from None
        kwargs[key] = value
    if ignored:
        log.warning("%s: ignoring hyper-parameters the model does not take: %s", path, sorted(ignored))
    kwargs.update(overrides or {})
    return kwargs


def check_numbers(path: str | os.PathLike, name: str, values: Iterable[Any] | None, low: float = -math.inf,
                  high: float = math.inf) -> None:
    """Saved numbers (statistics, thresholds) must be finite and in range."""
    if values is None:
        return
    for value in values:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or not low <= value <= high:
            bounds = f" in [{low:g}, {high:g}]" if math.isfinite(low) or math.isfinite(high) else ""
            raise CheckpointError(path, f"refused: its {name} holds {value!r} (finite numbers{bounds} expected)")
