"""Command-line overrides checked before Hydra runs: a misspelt key or option ends in one
line that names the closest valid one (``did you mean model.width?``) and exit status 2,
instead of Hydra's multi-line message.

Hydra composes the config before the decorated function runs, so its errors cannot be
caught inside it: :func:`checked_overrides` composes the same overrides first with Hydra's
compose API (sweeps take their first value) and lets Hydra run only when they compose.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig
from omegaconf.errors import OmegaConfBaseException

from deforest.cli.errors import EXIT_USER_ERROR
from deforest.core.errors import closest

CONFIG_MODULE = "deforest.conf"
# flags after which Hydra does something else than run the app (help, another config): no check
HANDS_OFF = {"-h", "--help", "--hydra-help", "--version", "-i", "--info", "-sc", "--shell-completion",
             "-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir", "--experimental-rerun"}
# flags that take a value
WITH_VALUE = {"-c", "--cfg", "-p", "--package"}


def command_overrides(argv: Sequence[str]) -> list[str] | None:
    """The overrides in ``argv`` (flags dropped), or ``None`` when Hydra is asked for help or
    another config source. Sweeps (``seed=0,1``) keep their first value."""
    overrides, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.split("=", 1)[0] in HANDS_OFF:
            return None
        elif arg in WITH_VALUE:
            skip = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    first = []
    for text, parsed in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        if not parsed.is_sweep_override():
            first.append(text)
            continue
        try:
            value = next(iter(parsed.sweep_string_iterator()))
        except Exception:  # an interval for a sweeper: nothing to check
            continue
        first.append(f"{text.split('=', 1)[0]}={value}")
    return first


def _keys(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, DictConfig):
        for key in node.keys():
            name = f"{prefix}{key}"
            yield name
            yield from _keys(node._get_node(key), f"{name}.")
    elif isinstance(node, ListConfig):
        return


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(config_name, overrides=overrides, return_hydra_config=True)


def explain(config_name: str, overrides: list[str], err: Exception) -> str:
    """One line for a composition error, naming the closest valid key or option."""
    text = str(err)
    missing = re.search(r"Could not find '([^']+)'", text)
    if missing:
        group, _, option = missing.group(1).rpartition("/")
        options = re.findall(r"^\t(\S+)$", text, re.MULTILINE)
        near = closest(option, options)
        hint = f"did you mean {group}={near}?" if near else f"choose from {', '.join(options)}"
        return f"{group}={option} is not an option of {group}: {hint}"
    bad = re.search(r"Could not (?:override|append to config|delete from config)[^']*'([^']+)'", text)
    if bad:
        key = bad.group(1)
        rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
        try:
            keys = list(_keys(_compose(config_name, rest)))
        except (HydraException, OmegaConfBaseException):
            keys = []
        if key not in keys:
            near = closest(key, keys)
            hint = f"did you mean {near}?" if near else "see the options with --cfg job"
            return f"{key} is not a config key: {hint} (a new key needs +{key}=...)"
        if any(o.startswith(f"+{key}=") for o in overrides):
            return f"{key} is already a config key: set it without the + ({key}=...)"
    return " ".join(text.split())


def override_problem(config_name: str, argv: Sequence[str]) -> str | None:
    """``None`` when the command line's overrides compose, else the one-line reason."""
    overrides = command_overrides(argv)
    if overrides is None:
        return None
    try:
        _compose(config_name, overrides)
    except (HydraException, OmegaConfBaseException) as err:
        return explain(config_name, overrides, err)
    return None


def checked_overrides(config_name: str) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Decorate a ``@hydra.main`` entry point: bad overrides end in one line and exit status 2."""

    def decorate(hydra_main: Callable[[], Any]) -> Callable[[], Any]:
        @functools.wraps(hydra_main)
        def run(*cfg_passthrough: Any) -> Any:
            if cfg_passthrough:  # called with a config (tests): nothing to parse
                return hydra_main(*cfg_passthrough)
            problem = override_problem(config_name, sys.argv[1:])
            if problem:
                print(f"{sys.argv[0].rsplit('/', 1)[-1]}: {problem}", file=sys.stderr)
                raise SystemExit(EXIT_USER_ERROR)
            return hydra_main()

        return run

    return decorate
