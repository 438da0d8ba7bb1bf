"""Package exports resolved on first use (PEP 562), for every ``deforest`` subpackage.

``from deforest.data import TileDataModule`` works, yet importing ``deforest.data.io`` (which
the torch-free map writer does) must not import torch and Lightning with the package: a package
``__init__`` that imported its modules eagerly would. Each package lists its public names by
module and lets :func:`lazy_exports` import a module when one of its names is first asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, Sequence[str]]
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``(__all__, __getattr__, __dir__)`` for ``package`` from ``{module: [public names]}``.

    A name must not also be a submodule's name: once the submodule is imported, Python binds the
    package attribute to the module, and the export would then mean one or the other."""
    home = {name: module for module, names in exports.items() for name in names}
    clash = sorted(set(home) & set(exports))
    if clash:
        raise ValueError(f"{package}: exports {clash} are also module names")

    def __getattr__(name: str) -> Any:
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{home[name]}"), name)

    def __dir__() -> list[str]:
        return sorted(home)

    return sorted(home), __getattr__, __dir__


__all__ = ["lazy_exports"]
