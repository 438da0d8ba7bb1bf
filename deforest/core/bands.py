"""Band names: one spelling per band, so every comparison of names agrees (selection, per-tile
band order, pretrained weights' bands, prediction's check of a scene's bands)."""

from __future__ import annotations

import re
from collections.abc import Sequence


def canonical_band(name: str) -> str:
    """One spelling per band name, for every comparison of band names (selection, network
    exclusion, pretrained weights' bands, quicklook bands): Sentinel-2 bands are
    ``B01`` ... ``B12`` and ``B8A`` however written (``B1``, ``b01``, ``b8a``), other names
    are compared without case (``vv`` is ``VV``); a date suffix (``B04@t0``) is kept as it is."""
    band, at, date = str(name).strip().partition("@")
    found = re.fullmatch(r"B0*(\d{1,2})(A?)", band.strip().upper())
    if found:
        number, letter = int(found.group(1)), found.group(2)
        return f"B{number}{letter}{at}{date}" if letter else f"B{number:02d}{at}{date}"
    return f"{band.strip().upper()}{at}{date}"


def match_band_names(wanted: Sequence[str], have: Sequence[str]) -> tuple[list[int] | None, list[str]]:
    """``(positions, missing)``: the 1-based positions in ``have`` of each of ``wanted``,
    compared by :func:`canonical_band`, and the names of ``wanted`` that ``have`` lacks.
    ``positions`` is ``None`` when a name is missing or ``have`` repeats one (its order is
    then no order); what that means (refusal or reading by position) is the caller's."""
    keys, have_keys = [canonical_band(n) for n in wanted], [canonical_band(n) for n in have]
    missing = [name for name, key in zip(wanted, keys) if key not in have_keys]
    if missing or len(set(have_keys)) != len(have_keys):
        return None, missing
    return [have_keys.index(key) + 1 for key in keys], []


__all__ = ["canonical_band", "match_band_names"]
