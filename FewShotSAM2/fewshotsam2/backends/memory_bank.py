"""SAM2's video memory, driven slice by slice: conditioning frames kept for the whole run plus a bounded FIFO."""

from __future__ import annotations

from typing import Callable, Hashable, Mapping, Optional, Sequence

import numpy as np

from ..engine import Memory
from .base import Engine

# SAM2 attends to the last num_maskmem - 1 = 6 predicted frames' mask memories and to object pointers of up to
# max_obj_ptrs_in_encoder - 1 = 15 earlier frames; older predictions can never be read again, so drop them.
FIFO_LENGTH = 15


def propagate_sequence(
    engine: Engine,
    keys: Sequence[Hashable],
    positions: Sequence[int],
    cond: Mapping[int, Memory],
    num_frames: int,
    reverse: bool = False,
    recent: Optional[dict[int, Memory]] = None,
    on_slice: Optional[Callable[[int, int], None]] = None,
    on_memory: Optional[Callable[[int, Memory], None]] = None,
) -> list[np.ndarray]:
    """Predict `keys` one after another at timeline `positions` (consecutive, in visiting order).

    Each prediction attends to every conditioning memory in `cond` and to the FIFO `recent` of the latest
    predictions, which it then joins. `on_memory(position, memory)` sees every new memory (a later pass can
    start from some of them). Returns the masks in visiting order.
    """
    recent = {} if recent is None else recent
    masks = []
    for n, (key, pos) in enumerate(zip(keys, positions)):
        pred = engine.predict([key], pos, cond, recent=recent, num_frames=num_frames, reverse=reverse)
        masks.append(pred.masks[0])
        recent[pos] = pred.memory
        if on_memory is not None:
            on_memory(pos, pred.memory)
        # bounded FIFO: only frames within reach of the next prediction stay
        for old in [t for t in recent if abs(t - pos) >= FIFO_LENGTH]:
            del recent[old]
        if on_slice is not None:
            on_slice(n + 1, len(keys))
    return masks
