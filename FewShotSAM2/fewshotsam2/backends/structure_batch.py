"""Several structures propagated through the query in one pass, batched over structures.

Each structure keeps its own memory bank (its conditioning memories and its own FIFO of recent predictions) and its
own range of query slices, as sam2's `SAM2VideoPredictor` keeps one output dict per object and tracks each object
on its own (`propagate_in_video` loops over `obj_idx`). All structures share one timeline, as the objects of one
sam2 video share its frame indices: conditioning memories at 0 .. s-1, query slice i at s + i - first slice of the
pass. At each slice, the structures whose range holds it and whose memory banks have the same layout (the same
conditioning and recent positions: the memory attention then reads the same number of tokens at the same
temporal positions for each) are predicted as one batch: the slice's features are read once for all of them, and
memory attention and the mask decoder run batched. A slice outside a structure's range costs nothing for it.

The batch over structures is capped by the engine's prediction batch (`engine.batch_size`, which the resource
estimate caps on a CPU by its activation budget).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Hashable, Mapping, Optional, Sequence

import numpy as np

from fewshotsam2.model.engine import Memory
from fewshotsam2.backends.base import Engine


@dataclass
class Track:
    """One structure's state in a pass: its conditioning memories, its range (stack indices), its FIFO."""

    cond: dict[int, Memory]
    first: int
    last: int
    recent: dict[int, Memory] = field(default_factory=dict)
    masks: list = field(default_factory=list)  # bool (h, w) per slice of the range, in order
    logits: list = field(default_factory=list)  # low-resolution logits (S/4, S/4) per slice of the range


def propagate_tracks(
    engine: Engine,
    keys: Mapping[int, Hashable] | Sequence[Hashable],
    tracks: Sequence[Track],
    offset: int,
    on_slice: Optional[Callable[[int, int], None]] = None,
) -> None:
    """Predict every track on every slice of its range, slice after slice (stack order), batched over tracks.

    `keys[i]`: the engine key of query stack slice i (a list or a dict by stack index); `offset`: the timeline position of the pass's first slice
    (after the conditioning memories). Each slice's features are dropped after its last read (nothing reads
    them again in a propagation). Fills each track's `masks` and `logits`.
    """
    start = min(t.first for t in tracks)
    stop = max(t.last for t in tracks)
    num_frames = offset + stop - start + 1
    for i in range(start, stop + 1):
        pos = offset + i - start
        active = [t for t in tracks if t.first <= i <= t.last]
        for t, (mask, memory) in zip(active, predict_grouped(engine, keys[i], [
                Step(t.cond, t.recent, pos, num_frames) for t in active])):
            t.masks.append(mask)
            t.logits.append(memory.pred_masks[0, 0].cpu().numpy())
        engine.release([keys[i]])
        if on_slice is not None:
            on_slice(i - start + 1, stop - start + 1)


@dataclass
class Step:
    """One structure's prediction of a slice: its memory bank (`recent` is its FIFO, updated in place) and where
    the slice sits on its timeline."""

    cond: Mapping[int, Memory]
    recent: dict[int, Memory]
    position: int
    num_frames: int
    reverse: bool = False


def predict_grouped(engine: Engine, key: Hashable, steps: Sequence[Step]) -> list[tuple[np.ndarray, Memory]]:
    """Predict slice `key` for every step, batched over the steps whose memory layouts are the same (the same
    conditioning and recent positions, slice position, timeline length and direction: SAM2 then reads the same
    number of memory tokens and object pointers at the same temporal offsets for each), in chunks of
    `engine.batch_size`. Each step's FIFO gets the new memory and drops what the next prediction can no longer
    read (as `memory_bank.propagate_sequence`). Returns (mask, memory) per step, in order."""
    reach = engine.memory_reach
    groups: dict[tuple, list[int]] = defaultdict(list)
    for n, st in enumerate(steps):
        groups[(tuple(sorted(st.cond)), tuple(sorted(st.recent)), st.position, st.num_frames, st.reverse)].append(n)
    out: list = [None] * len(steps)
    for (cond_at, recent_at, pos, num_frames, reverse), members in groups.items():
        for s in range(0, len(members), engine.batch_size):
            chunk = [steps[n] for n in members[s : s + engine.batch_size]]
            # in the first one's order: SAM2 concatenates conditioning memories in dict order (a structure alone
            # gets exactly its own call, bit for bit)
            cond = {p: _stack([st.cond[p] for st in chunk]) for p in chunk[0].cond}
            recent = {p: _stack([st.recent[p] for st in chunk]) for p in recent_at}
            pred = engine.predict([key] * len(chunk), pos, cond, recent=recent, num_frames=num_frames,
                                  reverse=reverse)
            for b, (n, st) in enumerate(zip(members[s : s + engine.batch_size], chunk)):
                memory = pred.memory if len(chunk) == 1 else pred.memory.select(b)
                out[n] = (pred.masks[b], memory)
                st.recent[pos] = memory
                # bounded FIFO: only frames within reach of the next prediction stay
                for old in [p for p in st.recent if abs(p - pos) >= reach]:
                    del st.recent[old]
    return out


def _stack(memories: list[Memory]) -> Memory:
    return memories[0] if len(memories) == 1 else Memory.cat(memories)
