"""SAM2's video memory, driven slice by slice: conditioning frames kept for the whole run plus a bounded FIFO."""

from __future__ import annotations

from typing import Callable, Hashable, Mapping, Optional, Sequence

import numpy as np

from fewshotsam2.model.engine import Memory
from fewshotsam2.backends.base import Engine


def memorize_in_batches(engine: Engine, keys: Sequence[Hashable], masks: Sequence[np.ndarray]) -> Memory:
    """Mask-prompt memories of `keys` (as sam2's `add_new_mask`), in chunks of the engine's batch size."""
    bs = engine.batch_size
    parts = [engine.memorize(list(keys[s : s + bs]), list(masks[s : s + bs])) for s in range(0, len(keys), bs)]
    return parts[0] if len(parts) == 1 else Memory.cat(parts)


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
    predictions, which it then joins. The FIFO keeps what the next prediction can still read
    (`engine.memory_reach` frames back, derived from the model: 15 for every SAM2.1 config, set by its object
    pointers) and drops older predictions. `on_memory(position, memory)` sees every new memory (a later pass can
    start from some of them). Returns the masks in visiting order.
    """
    recent = {} if recent is None else recent
    reach = engine.memory_reach
    masks = []
    for n, (key, pos) in enumerate(zip(keys, positions)):
        pred = engine.predict([key], pos, cond, recent=recent, num_frames=num_frames, reverse=reverse)
        masks.append(pred.masks[0])
        recent[pos] = pred.memory
        if on_memory is not None:
            on_memory(pos, pred.memory)
        # bounded FIFO: only frames within reach of the next prediction stay
        for old in [t for t in recent if abs(t - pos) >= reach]:
            del recent[old]
        if on_slice is not None:
            on_slice(n + 1, len(keys))
    return masks
