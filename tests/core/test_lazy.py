"""Package exports that resolve on first use."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deforest.core.lazy import lazy_exports


def test_a_name_resolves_from_its_module_on_first_use():
    names, getattr_, dir_ = lazy_exports("deforest.core", {"vocabulary": ["SPLITS", "MULTICLASS"]})
    assert names == ["MULTICLASS", "SPLITS"] == dir_()
    assert getattr_("SPLITS") == ("train", "val", "test")
    with pytest.raises(AttributeError, match="'deforest.core' has no attribute 'TASKS'"):
        getattr_("TASKS")


def test_an_export_named_like_a_module_is_refused():
    """``prepare`` the function beside ``prepare`` the module would mean either, by import order."""
    with pytest.raises(ValueError, match=r"exports \['prepare'\] are also module names"):
        lazy_exports("deforest.data", {"prepare": ["prepare", "PreparedData"]})


def test_importing_a_light_module_of_a_package_loads_no_torch():
    code = ("import sys; import deforest.data.io, deforest.mapping.sliding, deforest.runs.config_checks; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr[-2000:]
