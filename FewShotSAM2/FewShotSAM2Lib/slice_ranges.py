"""The Slice range table as text, so that it is saved with the scene in the module's parameter node.

The table (one row per structure: first and last slice along one numpy axis of the query) is stored as one JSON
string parameter, `{"axis": A, "ranges": {name: [first, last], ...}, "notFound": [name, ...]}`, next to a node
reference to the query it belongs to (see FewShotSAM2Logic.storeSliceRanges). JSON keeps the rows' order and any
segment name; a node reference (not a node ID inside the text) follows the query when a scene is imported and its
IDs are renamed. No MRML, no Qt here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

# parameter names in the parameter node (the same names as the FewShotSAM2ParameterNode fields, so that the
# parameterNodeWrapper reads and writes the same values: a str field is SetParameter(name, text), a node field
# SetParameter(name, "") + SetNodeReferenceID(name, id); Slicer's parameterNodeWrapper/serializers.py)
TEXT_PARAMETER = "sliceRanges"
VOLUME_PARAMETER = "sliceRangesVolume"


@dataclass
class SliceRangeTable:
    """The table's content: inclusive (first, last) per structure along numpy axis `axis` of the query's [k, j, i]
    voxel array, and the structures the estimate did not find (their rows show the whole volume until edited)."""

    axis: int
    ranges: dict  # {structure name: (first, last)}, table order
    notFound: list = field(default_factory=list)


def tableToText(table: SliceRangeTable) -> str:
    return json.dumps({"axis": int(table.axis),
                       "ranges": {str(name): [int(first), int(last)] for name, (first, last) in table.ranges.items()},
                       "notFound": [str(name) for name in table.notFound if name in table.ranges]})


def tableFromText(text: str, ijkDimensions: Sequence[int]) -> Optional[SliceRangeTable]:
    """The stored table if it fits a volume of these IJK dimensions; None for no table, or one that does not fit
    (written by hand, or for a volume whose voxels have changed since): the table is then empty, never wrong."""
    if not text:
        return None
    try:
        data = json.loads(text)
        axis = data["axis"]
        if not isinstance(axis, int) or isinstance(axis, bool) or axis not in (0, 1, 2):
            raise ValueError(f"axis {axis!r}")
        count = int(ijkDimensions[2 - axis])  # numpy axis a of the [k, j, i] array is IJK axis 2 - a
        ranges = {}
        for name, bounds in data["ranges"].items():
            first, last = bounds
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (first, last)):
                raise ValueError(f"{name}: {bounds!r}")
            if not 0 <= first <= last < count:
                raise ValueError(f"{name}: {first}..{last} is not inside 0..{count - 1}")
            ranges[str(name)] = (first, last)
        notFound = [str(name) for name in data.get("notFound", []) if name in ranges]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        logging.warning("FewShotSAM2: the saved slice range table is not used (%s)", exc)
        return None
    return SliceRangeTable(axis, ranges, notFound)
