"""The slice range a user gives (`--slice-range`): its grammar, its check against the query, and the map between
stack indices and the volume's own array indices. The estimate of a range from the supports is `extent.py`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from fewshotsam2.errors import InputError


@dataclass(frozen=True)
class SliceRangeSpec:
    """One structure's slice range as the user gives it: `auto` (estimated from the supports, `extent.py`),
    `whole` (every slice; written "off") or `range` (FIRST..LAST, inclusive indices along the query array's slice
    axis)."""

    kind: str  # "auto" | "whole" | "range"
    first: int = 0
    last: int = 0

    def __str__(self) -> str:
        return {"auto": "auto", "whole": "off"}.get(self.kind, f"{self.first}:{self.last}")


AUTO = SliceRangeSpec("auto")
WHOLE = SliceRangeSpec("whole")
SYNTAX = "auto, off, FIRST:LAST (inclusive slice indices) or STRUCTURE=RANGE,... per structure"


def parse_slice_range(text: str) -> SliceRangeSpec:
    """'auto', 'off' or 'FIRST:LAST'. Only the grammar is checked here; `check_slice_range` checks the numbers
    against the query."""
    text = str(text).strip()
    if text == "auto":
        return AUTO
    if text == "off":
        return WHOLE
    m = re.fullmatch(r"(-?\d+):(-?\d+)", text)
    if not m:
        raise InputError(f"'{text}' is no slice range: write {SYNTAX}")
    return SliceRangeSpec("range", int(m.group(1)), int(m.group(2)))


def parse_slice_ranges(text: str) -> dict[Optional[str], SliceRangeSpec]:
    """Per-structure ranges: 'SPEC' or 'KEY=SPEC,KEY=SPEC,...' (KEY: an output structure's value or name, SPEC as
    in `parse_slice_range`). The key None holds the range of every structure not named (default auto)."""
    text = str(text).strip()
    if "=" not in text:
        if "," in text:
            raise InputError(f"'{text}': several ranges without structure names; give one range for "
                             "every structure, or one per structure as STRUCTURE=RANGE (e.g. 5=10:40,spleen=off)")
        return {None: parse_slice_range(text)}
    out: dict[Optional[str], SliceRangeSpec] = {}
    for item in text.split(","):
        key, sep, spec = (p.strip() for p in item.partition("="))
        if not sep:  # one bare SPEC among keyed ones: the range of the structures not named
            key, spec = None, item.strip()
        if key == "" or key in out:
            raise InputError(f"'{text}': " + ("an empty structure name" if key == ""
                                              else f"'{key or 'the default range'}' is given twice"))
        out[key] = parse_slice_range(spec)
    out.setdefault(None, AUTO)
    return out


def resolve_slice_ranges(text: str, structures) -> dict[int, SliceRangeSpec]:
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


def check_user_ranges(text: str, n_slices: int, axis: int) -> None:
    """Every FIRST:LAST of a --slice-range fits a query of `n_slices` along `axis` (before any work)."""
    for spec in parse_slice_ranges(text).values():
        if spec.kind == "range":
            check_slice_range(spec.first, spec.last, n_slices, axis)


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
