"""LPIPS matching (Zu et al. 2025): the closest augmented support prompts each query slice in a two-frame video.

1. Support set: every support slice plus `augmentations` seeded affine + intensity variants (same affine for
   image and mask).
2. Matching: LPIPS between each query slice and every support-set image; the lowest distance wins. Backbone
   features are computed once per image (the query's a chunk at a time, for each structure: holding them all
   would take 1.3 MB per slice) and all distances come from batched tensor arithmetic.
   Before LPIPS, query and support images are resampled to one field of view (same mm per pixel, centred on
   the body): scans with different fields of view (a 366 mm crop against a 500 mm scan with arms and table)
   otherwise match by framing instead of anatomy (measured on ct-a -> ct-b: 56 mm level error whole-slice vs
   15 mm at one scale). SAM2 still sees the original slices.
3. Segmentation: [matched support, query slice] with the support mask as SAM2's mask prompt on frame 0; frame 1's
   mask is the answer. Query slices that matched the same support image share its memory and run as one batch.
   Several structures (`run_many`): each matches on its own, then the pairs of every structure are predicted
   together, slice after slice in batches (every pair is the same two-frame step, so any pairs batch exactly).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from fewshotsam2.matching.augment import augment_support
from fewshotsam2.matching.lpips_distance import QUERY_CHUNK, body_box, resample_to_fov, shared_lpips
from fewshotsam2.options import LpipsOptions
from fewshotsam2.run.results import LpipsMatch
from fewshotsam2.backends.continuation import SliceEdge
from fewshotsam2.backends.base import (Backend, Engine, QueryContext, StageClock, StageProgress, StructureJob,
                                      StructureResult, SupportSlice, _named)
from fewshotsam2.model.engine import Memory


def _matcher(engine: Engine, options: LpipsOptions):
    # LPIPS runs where SAM2 runs
    return shared_lpips(options.net, options.weights, str(getattr(engine, "device", "cpu")))


@dataclass
class Matched:
    """One structure after LPIPS matching (steps 1-2): its augmented support set and each query slice's match."""

    candidates: list  # (LpipsMatch, support slice, image, mask), the original pair first
    best: list[int]  # per query slice, the index of the candidate it matched
    distances: list[float]
    edge: SliceEdge  # beyond the range: matched and segmented one slice at a time, exactly as inside it


def _candidate_memory(engine: Engine, candidate) -> Memory:
    match, _, image, mask = candidate
    key = ("lpips-support", match)
    engine.add_frames({key: image})  # encoded only now, because some slice matched it
    return engine.memorize([key], [mask])


class LpipsBackend(Backend):
    name = "lpips"
    options_type = LpipsOptions
    reads_query_once = True
    needs_body_box = True

    def run(
        self,
        engine: Engine,
        query: QueryContext,
        supports: Sequence[SupportSlice],
        options: LpipsOptions,
        progress: StageProgress,
        clock: StageClock,
    ) -> StructureResult:
        matched = self._match(engine, query, supports, options, progress, clock)
        candidates, best = matched.candidates, matched.best
        with clock.stage("segment_pairs"):
            by_candidate: dict[int, list[int]] = defaultdict(list)
            for i, j in enumerate(best):
                by_candidate[int(j)].append(i)
            masks: list[np.ndarray | None] = [None] * len(query.keys)
            logits: list[np.ndarray | None] = [None] * len(query.keys)
            done = 0
            progress(f"Segmenting slice 0/{len(query.keys)}", 0, len(query.keys))
            for j, slices in sorted(by_candidate.items()):
                memory = _candidate_memory(engine, candidates[j])
                pred = engine.predict_batched([query.keys[i] for i in slices], 1, {0: memory}, num_frames=2)
                low_res = pred.memory.pred_masks[:, 0].cpu().numpy() if query.keep_logits else None
                for b, (i, m) in enumerate(zip(slices, pred.masks)):
                    masks[i] = m
                    if low_res is not None:
                        logits[i] = low_res[b]
                done += len(slices)
                progress(f"Segmenting slice {done}/{len(query.keys)}", done, len(query.keys))
        return self._result(query, supports, matched, masks, logits)

    def run_many(self, engine: Engine, jobs: Sequence[StructureJob], options: LpipsOptions, progress: StageProgress,
                 clock: StageClock) -> Iterator[tuple[StructureJob, StructureResult]]:
        """Several structures: each matches its own augmented supports slice by slice, exactly as `run`; then every
        structure's [matched support, query slice] pairs are predicted in one pass up the query, the pairs of a
        slice (one per structure holding it) in the same batch: each slice's features are read once for all.
        One structure: `run`."""
        if len(jobs) < 2:
            yield from super().run_many(engine, jobs, options, progress, clock)
            return
        matched = []
        for job in jobs:
            matched.append(self._match(engine, job.query, job.supports, options, _named(progress, job.name), clock))
        # every pair, slice after slice up the stack (a slice's pairs together), in listing order within a slice
        pairs = sorted(((job.first + i, n, i) for n, (job, m) in enumerate(zip(jobs, matched))
                        for i in range(len(m.best))), key=lambda p: (p[0], p[1]))
        remaining: dict = defaultdict(int)  # query key -> pairs still to predict (its features go after the last)
        for g, n, i in pairs:
            remaining[jobs[n].query.keys[i]] += 1
        engine.keep_if_room(list(remaining))
        masks = [[None] * len(m.best) for m in matched]
        logits = [[None] * len(m.best) for m in matched]
        memories: dict[tuple[int, int], Memory] = {}  # (structure, candidate) -> its support memory
        names = ", ".join(job.name for job in jobs)
        total = len(pairs)
        progress(f"{names}: Segmenting slice 0/{total}", 0, total)
        with clock.stage("segment_pairs"):
            for s in range(0, total, engine.batch_size):
                chunk = pairs[s : s + engine.batch_size]
                elements = []
                for g, n, i in chunk:
                    j = int(matched[n].best[i])
                    if (n, j) not in memories:
                        memories[(n, j)] = _candidate_memory(engine, matched[n].candidates[j])
                    elements.append(memories[(n, j)])
                keys = [jobs[n].query.keys[i] for _, n, i in chunk]
                memory = elements[0] if len(elements) == 1 else Memory.cat(elements)
                pred = engine.predict(keys, 1, {0: memory}, num_frames=2)
                low_res = pred.memory.pred_masks[:, 0].cpu().numpy()
                for b, (g, n, i) in enumerate(chunk):
                    masks[n][i] = pred.masks[b]
                    if jobs[n].query.keep_logits:
                        logits[n][i] = low_res[b]
                    remaining[keys[b]] -= 1
                engine.release([k for k in set(keys) if remaining[k] == 0])
                progress(f"{names}: Segmenting slice {s + len(chunk)}/{total}", s + len(chunk), total)
        for n, (job, m) in enumerate(zip(jobs, matched)):
            engine.release(job.last_use)
            yield job, self._result(job.query, job.supports, m, masks[n], logits[n])

    @staticmethod
    def _result(query: QueryContext, supports: Sequence[SupportSlice], matched: Matched, masks, logits,
                ) -> StructureResult:
        return StructureResult(np.stack(masks), list(supports), np.asarray(matched.distances, float),
                               higher_is_better=False, matches=[matched.candidates[int(j)][0] for j in matched.best],
                               edges={"below": matched.edge, "above": matched.edge},
                               logits=np.stack(logits) if query.keep_logits else None)

    def _match(self, engine: Engine, query: QueryContext, supports: Sequence[SupportSlice], options: LpipsOptions,
               progress: StageProgress, clock: StageClock) -> Matched:
        """Steps 1-2: the augmented support set and, per query slice, the candidate with the lowest LPIPS."""
        with clock.stage("lpips_features"):
            matcher = _matcher(engine, options)
            qbox = query.cache.get("body_box")
            if qbox is None:
                qbox = query.cache["body_box"] = body_box(query.images, query.spacing)
            fov = 1.1 * max([qbox[2]] + [s.body_box[2] for s in supports if s.body_box is not None])
            # the augmented support set: original pair first, then the variants
            candidates = []  # (match, support slice, image, mask)
            for s in supports:
                pairs = augment_support(s.image, s.mask, options.augmentations,
                                        seed=options.seed + 7919 * s.support + s.stack_index)
                for a, (image, mask) in enumerate(pairs):
                    match = LpipsMatch(s.support, s.stack_index, s.array_index, a)
                    candidates.append((match, s, image.astype(np.float32), mask.astype(bool)))
            support_feats = matcher.features(np.concatenate([
                resample_to_fov(c[2][None], c[1].spacing, fov, matcher.size,
                                center=c[1].body_box[:2] if c[1].body_box is not None else None)
                for c in candidates]))
        # the query a chunk at a time: its LPIPS features are 1.3 MB per slice, 400 MB for a 300-slice CT
        best, distances = [], []
        progress("LPIPS matching", 0, len(query.keys))
        for start in range(0, len(query.keys), QUERY_CHUNK):
            with clock.stage("lpips_features"):
                query_feats = matcher.features(resample_to_fov(query.images[start : start + QUERY_CHUNK],
                                                               query.spacing, fov, matcher.size, center=qbox[:2]))
            with clock.stage("matching"):
                chunk_best, chunk_distances = matcher.match(query_feats, support_feats)
            best += list(chunk_best)
            distances += list(chunk_distances)

        def segment_slices(engine: Engine, keys, images) -> list:
            # slices beyond the range: matched and segmented one by one, exactly as inside it
            feats = matcher.features(resample_to_fov(np.asarray(images), query.spacing, fov, matcher.size,
                                                     center=qbox[:2]))
            out = []
            for key, j in zip(keys, matcher.match(feats, support_feats)[0]):
                match, _, image, mask = candidates[int(j)]
                support_key = ("lpips-support", match)
                engine.add_frames({support_key: image})
                memory = engine.memorize([support_key], [mask])
                out.append(engine.predict([key], 1, {0: memory}, num_frames=2).masks[0])
            return out

        return Matched(candidates, best, distances, SliceEdge(segment_slices))
