"""Reverse propagation (RevSAM2, Bai et al. 2024): trust only query predictions that predict the supports back.

1. Forward: every query slice q_i is predicted with the K supports (image features + true masks as mask prompts)
   as its conditioning memory -> p_i (the hole-filled binary mask). The support memories are computed once and
   shared by the whole batch.
2. Reverse: (q_i, p_i) becomes the only conditioning memory -- p_i a mask prompt on q_i, encoded exactly as a
   support mask is (sam2's `add_new_mask`), not the memory SAM2 built while predicting p_i -- and predicts each
   support image -> Y~_ij; pi_i = mean_j Dice(Y~_ij, Y_j). An empty p_i scores 0 and is not propagated back.
3. Selection: the top-k slices by pi (those with pi >= min_score) become conditional slices.
4. Query self-propagation: the selected masks are mask prompts on their slices (the paper: they "are used as
   prompts to propagate across the entire query volume"); the query volume is segmented by propagating from them
   in both directions; the memory bank keeps every conditional slice for the whole run plus SAM2's FIFO of recent
   predictions (and, with keep_supports, the supports too). A conditional slice's output is p_i itself.

`Testing/model/test_oracle_sam2.py` checks every step against sam2's own video predictor.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Hashable, Iterator, Optional, Sequence

import numpy as np

from fewshotsam2.model.engine import Memory, Prediction
from fewshotsam2.options import ReverseOptions
from fewshotsam2.backends.base import (Backend, Engine, QueryContext, StageClock, StageProgress, StructureJob,
                                      StructureResult, SupportSlice, _named, dice)
from fewshotsam2.backends.continuation import PropagationEdge
from fewshotsam2.backends.memory_bank import memorize_in_batches, propagate_sequence
from fewshotsam2.backends.structure_batch import Step, predict_grouped


@dataclass
class Selection:
    scores: np.ndarray  # pi per query slice
    selected: list[int]  # conditional slices, best first
    fallback: bool  # True when no slice reached min_score and the best one was taken instead


def select_conditional(scores: Sequence[float], top_k: int, min_score: float) -> Selection:
    """Top-k slices by score among those scoring at least `min_score`; never the empty set while some pi > 0.

    Documented fallback: when no slice reaches `min_score`, the single best slice (pi > 0) is used and a
    warning says so, rather than returning an empty segmentation silently.
    """
    ReverseOptions(top_k, min_score)  # the settings' one validation
    s = np.asarray(scores, dtype=float)
    order = [int(i) for i in np.argsort(-s, kind="stable") if s[i] > 0]
    chosen = [i for i in order if s[i] >= min_score][:top_k]
    if chosen or not order:
        return Selection(s, chosen, False)
    return Selection(s, order[:1], True)


def _forward(engine: Engine, query_keys, cond: dict[int, Memory], k: int) -> Prediction:
    # supports at frames 0..k-1, the query slice right after them, as in [supports, query]
    return engine.predict(list(query_keys), k, cond, num_frames=k + 1)


def _reverse_scores(engine: Engine, query_keys, forward_masks, supports: Sequence[SupportSlice]) -> np.ndarray:
    scores = np.zeros(len(forward_masks))
    todo = [i for i, m in enumerate(forward_masks) if m.any()]  # empty p_i: pi = 0, no reverse pass
    if todo:
        # (q_i, p_i) in the memory bank: p_i is a mask prompt on q_i, one conditioning memory per batch element
        cond = {0: engine.memorize([query_keys[i] for i in todo], [forward_masks[i] for i in todo])}
        for s in supports:
            pred = engine.predict([s.key] * len(todo), 1, cond, num_frames=2)
            for i, m in zip(todo, pred.masks):
                scores[i] += dice(m, s.mask) / len(supports)
    return scores


def _self_propagate(
    engine: Engine,
    query_keys: Sequence[Hashable],
    forward_masks: Sequence[np.ndarray],
    conditional: Sequence[int],
    support_memory: Memory | None,
    progress: StageProgress,
    logits: Optional[list] = None,
) -> tuple[list[np.ndarray], dict[str, PropagationEdge]]:
    """Query slice i sits at frame i. Forward from the first conditional slice to the end, then backward from it
    to slice 0, so every other slice is predicted once, with all conditional slices (their p_i as mask prompts,
    as sam2's `add_new_mask`) in memory. Also returns where each pass stopped (`continuation.PropagationEdge`):
    continuing past the range is more steps of the same two passes."""
    n = len(query_keys)
    prompts = memorize_in_batches(engine, [query_keys[c] for c in conditional], [forward_masks[c] for c in conditional])
    cond: dict[int, Memory] = {c: prompts.select(j) for j, c in enumerate(conditional)}
    if support_memory is not None:
        # the supports have no place in the query volume: put them just before it on the timeline
        for j in range(support_memory.batch):
            cond[-1 - j] = support_memory.select(j)
    masks: list[np.ndarray | None] = [None] * n
    for j, c in enumerate(conditional):
        masks[c] = forward_masks[c]  # a conditional slice keeps its trusted prediction
        if logits is not None:
            logits[c] = _prompt_logits(prompts, j)
    first = min(conditional)
    up = [i for i in range(first, n) if i not in cond]
    down = [i for i in range(first - 1, -1, -1) if i not in cond]
    total = len(up) + len(down)
    # As in sam2's two-pass propagation, the backward pass starts with the forward pass's predictions just
    # above the first conditional slice in its FIFO (whatever the volume's length).
    near_first: dict[int, Memory] = {}

    def keep_near_first(pos: int, memory: Memory) -> None:
        if pos - first < engine.memory_reach:
            near_first[pos] = memory
        keep_logits(pos, memory)

    def keep_logits(pos: int, memory: Memory) -> None:
        if logits is not None:  # slice pos's low-resolution logits (a conditional slice keeps its forward ones)
            logits[pos] = memory.pred_masks[0, 0].cpu().numpy()

    def report(offset: int):
        return lambda done, _: progress(f"Propagating slice {offset + done}/{total}", offset + done, total)

    up_recent: dict[int, Memory] = {}
    if up:
        up_masks = propagate_sequence(engine, [query_keys[i] for i in up], up, cond, n, False, up_recent, report(0),
                                      keep_near_first)
        for i, m in zip(up, up_masks):
            masks[i] = m
    if down:
        down_masks = propagate_sequence(engine, [query_keys[i] for i in down], down, cond, n, True, near_first,
                                        report(len(up)), keep_logits)
        for i, m in zip(down, down_masks):
            masks[i] = m
    # below the range the supports (keep_supports) would sit where the continuation goes: they move just before it
    query_cond = {t: m for t, m in cond.items() if t >= 0}
    supports_below = [cond[t] for t in sorted((t for t in cond if t < 0), reverse=True)]
    edges = {"above": PropagationEdge(cond, up_recent, n - 1, +1, False, n),
             "below": PropagationEdge(query_cond, near_first, 0, -1, True, n, supports_below)}
    return masks, edges


def _prompt_logits(prompts: Memory, j: int) -> np.ndarray:
    """A conditional slice's logits for the overlap rule: those sam2's predictor outputs on a frame given a mask
    prompt (`add_new_mask`: the mask as +-10, downsampled; `SAM2Engine.memorize` keeps them), not the forward
    prediction's: a trusted slice claims its voxels as strongly as sam2's own prompted frame does."""
    return prompts.pred_masks[j, 0].cpu().numpy()


def _self_propagate_many(engine: Engine, structures: Sequence[tuple], progress: StageProgress,
                         ) -> list[tuple[list[np.ndarray], dict[str, PropagationEdge]]]:
    """`_self_propagate` for several structures in one pass over the query: `structures` holds per structure
    (stack index of its range's first slice, its range's keys, forward masks, conditional slices, support memory
    or None, logits list or None). Each keeps its own timeline (its range slice i at frame i), its conditional
    slices, its FIFOs and its two passes, exactly as `_self_propagate` alone; the forward passes run side by side
    up the stack, then the backward passes down it, and at each slice the structures predicting it are predicted
    together (`structure_batch.predict_grouped`: one batch where their memory layouts agree)."""
    reach = engine.memory_reach
    tracks = []
    for offset, keys, forward_masks, conditional, support_memory, logits in structures:
        n = len(keys)
        prompts = memorize_in_batches(engine, [keys[c] for c in conditional], [forward_masks[c] for c in conditional])
        cond: dict[int, Memory] = {c: prompts.select(j) for j, c in enumerate(conditional)}
        if support_memory is not None:
            for j in range(support_memory.batch):
                cond[-1 - j] = support_memory.select(j)
        masks: list = [None] * n
        for j, c in enumerate(conditional):
            masks[c] = forward_masks[c]
            if logits is not None:
                logits[c] = _prompt_logits(prompts, j)
        first = min(conditional)
        tracks.append(dict(offset=offset, keys=keys, n=n, cond=cond, masks=masks, first=first, logits=logits,
                           up={i for i in range(first, n) if i not in cond}, down=set(range(first))
                           - set(cond), up_recent={}, near_first={}))
    total = sum(len(t["up"]) + len(t["down"]) for t in tracks)
    done = 0
    progress(f"Propagating slice 0/{total}", 0, total)
    up_slices = range(min(t["offset"] + t["first"] for t in tracks), max(t["offset"] + t["n"] for t in tracks))
    down_slices = range(max(t["offset"] + t["first"] for t in tracks) - 1, min(t["offset"] for t in tracks) - 1, -1)
    for reverse, slices in ((False, up_slices), (True, down_slices)):
        for g in slices:
            active = [t for t in tracks if g - t["offset"] in (t["down"] if reverse else t["up"])]
            if not active:
                continue
            steps = [Step(t["cond"], t["near_first"] if reverse else t["up_recent"], g - t["offset"], t["n"], reverse)
                     for t in active]
            for t, (mask, memory) in zip(active, predict_grouped(engine, active[0]["keys"][g - active[0]["offset"]],
                                                                 steps)):
                i = g - t["offset"]
                t["masks"][i] = mask
                if not reverse and i - t["first"] < reach:
                    # the backward pass starts with the forward pass's predictions just above the first
                    # conditional slice in its FIFO, as in `_self_propagate`
                    t["near_first"][i] = memory
                if t["logits"] is not None:
                    t["logits"][i] = memory.pred_masks[0, 0].cpu().numpy()
            done += len(active)
            progress(f"Propagating slice {done}/{total}", done, total)
    out = []
    for t in tracks:
        cond, n = t["cond"], t["n"]
        query_cond = {p: m for p, m in cond.items() if p >= 0}
        supports_below = [cond[p] for p in sorted((p for p in cond if p < 0), reverse=True)]
        edges = {"above": PropagationEdge(cond, t["up_recent"], n - 1, +1, False, n),
                 "below": PropagationEdge(query_cond, t["near_first"], 0, -1, True, n, supports_below)}
        out.append((t["masks"], edges))
    return out


@dataclass
class Scored:
    """One structure after forward prediction, reverse scoring and selection (steps 1-3), before self-propagation."""

    forward_masks: list[np.ndarray]
    forward_logits: list[np.ndarray]  # with keep_logits
    scores: np.ndarray
    selection: Selection
    support_memory: Memory


class ReverseBackend(Backend):
    name = "reverse"
    options_type = ReverseOptions
    reads_query_once = False  # forward, the p_i prompts and self-propagation read each query slice again

    def run(self, engine: Engine, query: QueryContext, supports: Sequence[SupportSlice], options: ReverseOptions,
            progress: StageProgress, clock: StageClock) -> StructureResult:
        scored = self._score(engine, query, supports, options, progress, clock)
        if not scored.selection.selected:
            return self._not_found(query, supports, scored)
        engine.keep_if_room(query.keys)  # self-propagation reads each slice once more
        # a conditional slice keeps its forward mask (its logits: `_prompt_logits`); the others get theirs below
        logits = list(scored.forward_logits) if query.keep_logits else None
        with clock.stage("self_propagation"):
            masks, edges = _self_propagate(engine, query.keys, scored.forward_masks, scored.selection.selected,
                                           scored.support_memory if options.keep_supports else None, progress,
                                           logits)
        return self._result(query, supports, scored, masks, edges, logits)

    def run_many(self, engine: Engine, jobs: Sequence[StructureJob], options: ReverseOptions,
                 progress: StageProgress, clock: StageClock) -> Iterator[tuple[StructureJob, StructureResult]]:
        """Several structures: forward prediction, reverse scoring and selection per structure, exactly as `run`;
        then the self-propagation of every structure in one pass over the query (`_self_propagate_many`: each
        slice's features read once for all, predictions batched over structures whose memory layouts agree),
        each structure on its own timeline with its own conditional slices: what `run` gives it alone. One
        structure: `run`."""
        if len(jobs) < 2:
            yield from super().run_many(engine, jobs, options, progress, clock)
            return
        scored = []
        for job in jobs:
            engine.keep_if_room(job.read_again)
            scored.append(self._score(engine, job.query, job.supports, options, _named(progress, job.name), clock))
        found = [(job, sc) for job, sc in zip(jobs, scored) if sc.selection.selected]
        for job in jobs:
            engine.keep_if_room(job.query.keys)  # self-propagation reads each slice once more
        logits = {id(job): list(sc.forward_logits) if job.query.keep_logits else None for job, sc in found}
        with clock.stage("self_propagation"):
            passes = _self_propagate_many(
                engine, [(job.first, job.query.keys, sc.forward_masks, sc.selection.selected,
                          sc.support_memory if options.keep_supports else None, logits[id(job)])
                         for job, sc in found],
                _named(progress, ", ".join(job.name for job, _ in found))) if found else []
        done = {id(job): (masks, edges) for (job, _), (masks, edges) in zip(found, passes)}
        for job, sc in zip(jobs, scored):
            engine.release(job.last_use)
            if id(job) not in done:
                yield job, self._not_found(job.query, job.supports, sc)
                continue
            masks, edges = done[id(job)]
            yield job, self._result(job.query, job.supports, sc, masks, edges, logits[id(job)])

    def _score(self, engine: Engine, query: QueryContext, supports: Sequence[SupportSlice], options: ReverseOptions,
               progress: StageProgress, clock: StageClock) -> Scored:
        """Steps 1-3: forward prediction, reverse scores (pi) and the conditional slices."""
        query_keys = query.keys
        k = len(supports)
        n = len(query_keys)
        top_k, min_score = options.top_k, options.min_score

        with clock.stage("forward"):
            support_memory = engine.memorize([s.key for s in supports], [s.mask for s in supports])
        cond = {j: support_memory.select(j) for j in range(k)}
        forward_masks: list[np.ndarray] = []
        forward_logits: list[np.ndarray] = []
        scores = np.zeros(n)
        bs = engine.batch_size
        progress(f"Forward and reverse prediction 0/{n}", 0, n)  # the bar shows before the first batch (seconds)
        # forward and reverse a batch at a time: a slice's features are read twice in a row, then kept for
        # self-propagation only while the engine's feature budget allows (past it they are encoded again there)
        for start in range(0, n, bs):
            keys = query_keys[start : start + bs]
            with clock.stage("forward"):
                pred = _forward(engine, keys, cond, k)
                masks = pred.masks
                if query.keep_logits:
                    forward_logits += list(pred.memory.pred_masks[:, 0].cpu().numpy())
            with clock.stage("reverse"):
                scores[start : start + len(keys)] = _reverse_scores(engine, keys, masks, supports)
            forward_masks += masks
            if engine.over_feature_budget():
                engine.release(keys)
            done = start + len(keys)
            progress(f"Forward and reverse prediction {done}/{n}", done, n)
        selection = select_conditional(scores, top_k, min_score)
        if selection.fallback:
            warnings.warn(
                f"no query slice reached min_score {min_score:.2f} (best pi = {scores.max():.3f}); "
                f"using the best slice {selection.selected[0]} as the only conditional slice",
                stacklevel=3,
            )
        return Scored(forward_masks, forward_logits, scores, selection, support_memory)

    @staticmethod
    def _not_found(query: QueryContext, supports: Sequence[SupportSlice], scored: Scored) -> StructureResult:
        warnings.warn("every forward prediction is empty: the structure was not found in the query", stacklevel=3)
        n = len(query.keys)
        empty = np.zeros((n,) + scored.forward_masks[0].shape, bool)
        return StructureResult(empty, list(supports), np.zeros(n), forward_masks=np.stack(scored.forward_masks),
                               logits=np.stack(scored.forward_logits) if query.keep_logits else None)

    @staticmethod
    def _result(query: QueryContext, supports: Sequence[SupportSlice], scored: Scored, masks, edges,
                logits) -> StructureResult:
        return StructureResult(np.stack(masks), list(supports), np.asarray(scored.scores, float),
                               selected=scored.selection.selected, forward_masks=np.stack(scored.forward_masks),
                               edges=edges, logits=np.stack(logits) if logits is not None else None)
