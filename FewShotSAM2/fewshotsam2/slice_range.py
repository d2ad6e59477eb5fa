"""The slice range a user gives (`--slice-range`): its grammar, its check against the query, and the map between
stack indices and the volume's own array indices. The estimate of a range from the supports is `extent.py`."""

from __future__ import annotations

import re
from typing import Optional

from .errors import InputError


def parse_slice_range(text: str) -> Optional[tuple[int, int]]:
    """'auto' -> None (estimate), 'off' -> (0, -1) sentinel meaning every slice, 'FIRST:LAST' -> ints.

    Only the grammar is checked here; `check_slice_range` checks the numbers against the query.
    """
    text = str(text).strip()
    if text == "auto":
        return None
    if text == "off":
        return (0, -1)
    m = re.fullmatch(r"(-?\d+):(-?\d+)", text)
    if not m:
        raise InputError(f"--slice-range must be auto, off, FIRST:LAST (inclusive slice indices) or "
                         f"STRUCTURE=RANGE,... per structure, got '{text}'")
    return int(m.group(1)), int(m.group(2))


def parse_slice_ranges(text: str) -> dict[Optional[str], Optional[tuple[int, int]]]:
    """Per-structure ranges: 'SPEC' or 'KEY=SPEC,KEY=SPEC,...' (KEY: an output structure's value or name, SPEC as
    in `parse_slice_range`). The key None holds the range of every structure not named (default 'auto')."""
    text = str(text).strip()
    if "=" not in text:
        if "," in text:
            raise InputError(f"--slice-range '{text}': several ranges without structure names; give one range for "
                             "every structure, or one per structure as STRUCTURE=RANGE (e.g. 5=10:40,spleen=off)")
        return {None: parse_slice_range(text)}
    out: dict[Optional[str], Optional[tuple[int, int]]] = {}
    for item in text.split(","):
        key, sep, spec = (p.strip() for p in item.partition("="))
        if not sep:  # one bare SPEC among keyed ones: the range of the structures not named
            key, spec = None, item.strip()
        if key == "" or key in out:
            raise InputError(f"--slice-range '{text}': "
                             + ("an empty structure name" if key == "" else f"'{key or 'default'}' given twice"))
        out[key] = parse_slice_range(spec)
    out.setdefault(None, None)
    return out


def resolve_slice_ranges(text: str, structures) -> dict[int, Optional[tuple[int, int]]]:
    """Per output structure value, its range from `parse_slice_ranges` (keys matched by value, then by name)."""
    given = parse_slice_ranges(text)
    out = {s.value: given[None] for s in structures}
    for key, spec in given.items():
        if key is None:
            continue
        hits = [s for s in structures if str(s.value) == key] or [s for s in structures if s.name == key]
        if not hits:
            known = ", ".join(f"{s.value}={s.name}" for s in structures)
            raise InputError(f"--slice-range names structure '{key}', which is not segmented (structures: {known})")
        for s in hits:
            out[s.value] = spec
    return out


def check_slice_range(first: int, last: int, n_slices: int, axis: int) -> None:
    """A user range must lie inside the query and hold at least one slice."""
    if first > last:
        raise InputError(f"--slice-range {first}:{last} is reversed or empty (FIRST must not exceed LAST)")
    if first < 0 or last >= n_slices:
        raise InputError(f"--slice-range {first}:{last} lies outside the query, which has slices 0..{n_slices - 1} "
                         f"along array axis {axis}")


def to_array_range(plan, first: int, last: int) -> tuple[int, int]:
    """Inclusive stack range -> inclusive range along the volume's own array axis (the stack may run reversed)."""
    a, b = plan.slice_index_to_array_index(first), plan.slice_index_to_array_index(last)
    return min(a, b), max(a, b)


def to_stack_range(plan, first: int, last: int) -> tuple[int, int]:
    """Inclusive range along the volume's array axis -> inclusive stack range."""
    return to_array_range(plan, first, last)  # the map is a flip or the identity either way
