"""The one way from labeled support volumes and a structure selection to typed supports.

Every front end uses it: `segment`, `batch`, `extent`, `evaluate`, `bench` and the Slicer module (whose segments
reach the core as a layered .seg.nrrd, never merged). One rule:

- a support may hold only some of the selected structures: it prompts SAM2 for those;
- every selected structure needs at least one support that holds it (else one error naming it);
- overlapping segments stay separate masks: each structure's mask comes from its own layer, so a voxel two
  nested segments share prompts both;
- the first support (in the order given) that holds a structure gives its output name and colour; label values
  repeated across layers move to the next free value (`volume.output_structures`);
- a selected segment that is empty in a support is an error (its mask would prompt SAM2 with nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from fewshotsam2.errors import InputError
from fewshotsam2.supports.label_selection import LabelChoice, parse_label_selection, resolve_structures
from fewshotsam2.io.volume import LabelMap, Structure, Volume, output_structures, read_labels, read_volume


@dataclass
class SupportCase:
    """One labeled support volume, typed for the pipeline.

    `labels` is its label map on `image`'s grid (a `LabelMap`, or a plain integer label `Volume`). `masks`:
    output structure value -> bool mask on `image`'s grid (what `load_supports` fills); without it a structure's
    mask is `labels.array == value` (scripts that number the output like their label map).
    """

    image: Volume
    labels: Union[Volume, LabelMap]
    name: str = "support"
    masks: Optional[dict[int, np.ndarray]] = None

    def __post_init__(self) -> None:
        if isinstance(self.labels, LabelMap):
            self.labels = self.labels.volume

    def mask(self, value: int) -> np.ndarray:
        """The voxels of output structure `value` in this support (all False where it does not hold it)."""
        if self.masks is not None:
            return self.masks[value] if value in self.masks else np.zeros(self.labels.shape, dtype=bool)
        return self.labels.array == value


def _found(choice: LabelChoice, labels: LabelMap, source: str) -> Optional[Structure]:
    """The structure one `--labels` item selects in this support; None when it holds none (an ambiguous item
    is still an error)."""
    try:
        return resolve_structures([choice], labels.structures, source)[0]
    except InputError:
        if _absent(choice, labels.structures):
            return None
        raise


def _absent(choice: LabelChoice, available: Sequence[Structure]) -> bool:
    """Whether no structure of `available` could answer `choice` (by value or name)."""
    values = {s.value for s in available}
    names = {s.name.casefold() for s in available}
    by_value = choice.kind in ("value", "auto") and choice.key.isascii() and choice.key.isdigit() \
        and int(choice.key) in values
    by_name = choice.kind in ("name", "auto") and choice.key.casefold() in names
    return not (by_value or by_name)


def load_supports(
    labeled: Sequence[tuple[Volume, LabelMap, str]],
    selection: Union[str, Sequence[LabelChoice]],
) -> tuple[list[SupportCase], list[Structure]]:
    """Typed supports and the output structures (in the selection's order) from (image, label map, name) triples.

    `selection`: a `--labels` text or parsed choices (label_selection.py). See the module docstring for the rule.
    """
    if not labeled:
        raise InputError("at least one support (image + labels) is needed")
    wanted = parse_label_selection(selection) if isinstance(selection, str) else list(selection)
    first: dict[int, Structure] = {}  # index into wanted -> the structure of the first support that holds it
    held: list[list[tuple[int, Structure]]] = []
    for image, labels, name in labeled:
        if len(labeled) == 1:  # one support: every item must be in it (resolve_structures says precisely why not)
            chosen = list(enumerate(resolve_structures(wanted, labels.structures, name)))
        else:
            found = [(i, _found(w, labels, name)) for i, w in enumerate(wanted)]
            chosen = [(i, s) for i, s in found if s is not None]
            # the same structure chosen twice, or two outputs with one name, are errors in every support
            resolve_structures([wanted[i] for i, _ in chosen], labels.structures, name)
        for i, s in chosen:
            first.setdefault(i, s)
        held.append(chosen)
    missing = [wanted[i].text for i in range(len(wanted)) if i not in first]
    if missing:
        raise InputError(f"label '{missing[0]}' is absent from every support")
    structures = output_structures([first[i] for i in range(len(wanted))], labeled[0][2])
    supports = []
    for (image, labels, name), chosen in zip(labeled, held):
        masks = {}
        for i, s in chosen:
            mask = labels.mask(s)
            if not mask.any():
                raise InputError(f"the support mask of '{s.name}' in {name} is empty")
            masks[structures[i].value] = mask
        supports.append(SupportCase(image, labels.volume, name=name, masks=masks))
    return supports, structures


class SupportReader:
    """Reads support files once each (a cohort repeats them) and loads them with `load_supports`."""

    def __init__(self, read_image: Callable[[str], Volume] = read_volume) -> None:
        self._read_image = read_image
        self._images: dict[str, Volume] = {}
        self._labels: dict[tuple[str, str], LabelMap] = {}

    def labeled(self, image_path: str, labels_path: str) -> tuple[Volume, LabelMap, str]:
        image_path, labels_path = str(image_path), str(labels_path)
        if image_path not in self._images:
            self._images[image_path] = self._read_image(image_path)
        key = (image_path, labels_path)
        if key not in self._labels:
            self._labels[key] = read_labels(labels_path, self._images[image_path])
        return self._images[image_path], self._labels[key], Path(labels_path).name

    def load(self, pairs: Sequence[tuple[str, str]],
             selection: Union[str, Sequence[LabelChoice]]) -> tuple[list[SupportCase], list[Structure]]:
        """Typed supports from (image path, labels path) pairs; see `load_supports`."""
        return load_supports([self.labeled(i, l) for i, l in pairs], selection)


def read_supports(pairs: Sequence[tuple[str, str]],
                  selection: Union[str, Sequence[LabelChoice]]) -> tuple[list[SupportCase], list[Structure]]:
    """Typed supports from files: (image path, labels path) pairs; see `load_supports`."""
    return SupportReader().load(pairs, selection)
