"""The `--labels` grammar: which support structures to segment, and what to call them in the output.

    --labels ITEM[,ITEM...]

    ITEM      = [OUTNAME "="] SELECTOR
    SELECTOR  = "value:" DIGITS         a label value
              | "name:" TEXT            a segment name (exact case first, see below)
              | TEXT                    a label value if TEXT is digits, else a segment name

Examples: `5`, `1,5`, `liver`, `liver=5` (value 5, written as segment "liver"), `value:5`, `name:5`,
`"Tumour, core"`, `Tumour\\, core`, `core=name:Läsion`.

Quoting: inside double quotes `,` `=` and `:` are plain text (`""` inside quotes is one `"`); outside quotes a
backslash makes the next character plain text (`\\,` `\\=` `\\\\`). `value:`/`name:` are only prefixes when
written plainly, so a name that starts with "name:" is written `name:name:...`.

Matching rules (never a guess):
- digits alone: the structure with that value, or the segment with that name. When both exist and are
  different segments, the choice is refused as ambiguous and the message says to write `value:N` or `name:N`;
- names: the exact name wins; otherwise a case-insensitive match, refused when several segments match;
- a structure chosen twice, or two outputs given one name, is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

from fewshotsam2.errors import InputError

SYNTAX_HELP = ("label values (1,5), segment names (liver), value:5 / name:5 to say which, OUT=SEL to name the "
               "output segment (liver=5); quote names with commas (\"a, b\") or escape them (a\\, b)")


@dataclass(frozen=True)
class LabelChoice:
    """One `--labels` item: how to find the structure (`kind` "auto", "value" or "name", and `key`), and the
    output segment name if the item gave one."""

    text: str
    kind: str
    key: str
    rename: Optional[str] = None


def _split(text: str) -> list[list[tuple[str, bool]]]:
    """Items of (character, is_plain_text) pairs: quotes and escapes make characters plain."""
    items: list[list[tuple[str, bool]]] = [[]]
    i, n = 0, len(text)
    quoted = False
    while i < n:
        c = text[i]
        if quoted:
            if c == '"':
                if i + 1 < n and text[i + 1] == '"':
                    items[-1].append(('"', True))
                    i += 2
                    continue
                quoted = False
            else:
                items[-1].append((c, True))
        elif c == '"':
            quoted = True
        elif c == "\\":
            if i + 1 >= n:
                raise InputError(f"--labels '{text}' ends with a lone backslash; write \\\\ for a backslash")
            items[-1].append((text[i + 1], True))
            i += 1
        elif c == ",":
            items.append([])
        else:
            items[-1].append((c, False))
        i += 1
    if quoted:
        raise InputError(f"--labels '{text}' has an unclosed double quote")
    return items


def _strip(chars: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Drop unquoted white space at both ends (quoted spaces are part of the name)."""
    while chars and not chars[0][1] and chars[0][0].isspace():
        chars = chars[1:]
    while chars and not chars[-1][1] and chars[-1][0].isspace():
        chars = chars[:-1]
    return chars


def _text(chars: list[tuple[str, bool]]) -> str:
    return "".join(c for c, _ in chars)


def parse_label_selection(text: str) -> list[LabelChoice]:
    """Parse a `--labels` value (see the module docstring); raise InputError on malformed text."""
    choices = []
    for raw in _split(text):
        chars = _strip(raw)
        if not chars:
            continue
        written = _text(chars)
        rename = None
        eq = next((i for i, (c, plain) in enumerate(chars) if c == "=" and not plain), None)
        if eq is not None:
            rename = _text(_strip(chars[:eq]))
            chars = _strip(chars[eq + 1:])
            if not rename:
                raise InputError(f"--labels item '{written}': nothing before '='; write OUTNAME=SELECTION, e.g. liver=5")
            if not chars:
                raise InputError(f"--labels item '{written}': nothing after '='; write OUTNAME=SELECTION, e.g. liver=5")
        kind = "auto"
        for prefix in ("value", "name"):
            head = chars[: len(prefix) + 1]
            if _text(head) == prefix + ":" and not any(plain for _, plain in head):
                kind, chars = prefix, _strip(chars[len(prefix) + 1:])
                break
        key = _text(chars)
        if not key:
            raise InputError(f"--labels item '{written}': nothing after '{kind}:'")
        if kind == "value" and not _is_value(key):
            raise InputError(f"--labels item '{written}': value:{key} is not a label value (0-9 digits)")
        choices.append(LabelChoice(written, kind, key, rename))
    if not choices:
        raise InputError("--labels is empty: give label values (e.g. 1,5) or segment names")
    return choices


def _describe(available: Sequence, limit: int = 20) -> str:
    shown = ", ".join(f"{s.value} ({s.name})" for s in list(available)[:limit]) or "none"
    more = len(available) - limit
    return shown + (f", ... and {more} more" if more > 0 else "")


def _by_name(key: str, available: Sequence) -> list:
    exact = [s for s in available if s.name == key]
    if exact:
        return exact
    folded = key.casefold()
    return [s for s in available if s.name.casefold() == folded]


def _is_value(key: str) -> bool:
    return key.isascii() and key.isdigit()


def _how_to_choose(choice: LabelChoice, candidates: Sequence) -> str:
    """Advice that can work: what tells the matching segments apart (never advice that matches them all again)."""
    names = {s.name for s in candidates}
    values = {s.value for s in candidates}
    if len(names) == len(candidates) and choice.kind != "value":
        return "write the name with its exact case"
    if len(names) == len(candidates):
        return "select it by name:NAME"
    if len(values) == len(candidates):
        return "select one by its label value (value:N)"
    return ("they share both name and label value (in different layers), so nothing here tells them apart: rename "
            "one in Slicer's Segment Editor and save the segmentation again")


def resolve_structures(choices: Sequence[LabelChoice], available: Sequence, source: str) -> list:
    """The structures of `available` the choices select, in the order given, renamed where asked.

    `available`: the support's structures (objects with `value` and `name`, e.g. `volume.Structure`); a chosen
    structure is returned as `dataclasses.replace(s, name=rename)` when the item named the output.
    """
    chosen: list = []
    picked_by: dict[int, str] = {}
    for choice in choices:
        if choice.kind == "value":
            candidates = [s for s in available if s.value == int(choice.key)]
        elif choice.kind == "name":
            candidates = _by_name(choice.key, available)
        else:
            by_value = [s for s in available if s.value == int(choice.key)] if _is_value(choice.key) else []
            named = _by_name(choice.key, available)
            if by_value and named and any(n is not by_value[0] for n in named):
                other = next(n for n in named if n is not by_value[0])
                raise InputError(
                    f"--labels '{choice.text}' is ambiguous in {source}: label value {choice.key} is "
                    f"'{by_value[0].name}' but segment '{other.name}' has value {other.value}; "
                    f"write value:{choice.key} or name:{choice.key}")
            candidates = by_value or named
        if not candidates:
            what = "label value" if choice.kind == "value" else "segment name" if choice.kind == "name" else "label"
            raise InputError(f"{what} '{choice.key}' is absent from the support labels {source} "
                             f"(present: {_describe(available)})")
        if len(candidates) > 1:
            names = ", ".join(f"'{s.name}' (value {s.value})" for s in candidates)
            raise InputError(f"--labels '{choice.text}' is ambiguous in {source}: it matches {names}; "
                             f"{_how_to_choose(choice, candidates)}")
        s = candidates[0]
        if id(s) in picked_by:
            raise InputError(f"--labels chooses '{s.name}' (value {s.value}) twice ('{picked_by[id(s)]}' and "
                             f"'{choice.text}'); list each structure once")
        picked_by[id(s)] = choice.text
        chosen.append(replace(s, name=choice.rename) if choice.rename else s)
    names = [s.name for s in chosen]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise InputError(f"--labels gives two output segments the name '{dup}'; give each its own name")
    return chosen
