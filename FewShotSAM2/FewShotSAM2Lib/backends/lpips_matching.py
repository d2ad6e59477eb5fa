"""LPIPS matching (Zu et al. 2025): the closest augmented support prompts each query slice in a two-frame video.

1. Support set: every support slice plus `augmentations` seeded affine + intensity variants (same affine for
   image and mask).
2. Matching: LPIPS between each query slice and every support-set image; the lowest distance wins. Backbone
   features are computed once per image and all distances come from batched tensor arithmetic.
3. Segmentation: [matched support, query slice] with the support mask as SAM2's mask prompt on frame 0; frame 1's
   mask is the answer. Query slices that matched the same support image share its memory and run as one batch.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from ..augment import augment_support
from .base import Engine, QueryContext, StageClock, StageProgress, StructureResult, SupportSlice


def _matcher(query: QueryContext, options: object):
    from ..lpips_distance import LPIPSDistance

    net = getattr(options, "lpips_net", "alex")
    weights = getattr(options, "lpips_weights", None)
    device = getattr(options, "lpips_device", "cpu")
    key = ("lpips", net, weights)
    if key not in query.cache:
        query.cache[key] = LPIPSDistance(net=net, backbone_weights=weights, device=device)
    return query.cache[key]


def run(
    engine: Engine,
    query: QueryContext,
    supports: Sequence[SupportSlice],
    options: object,
    progress: StageProgress,
    clock: StageClock,
) -> StructureResult:
    n_aug = int(getattr(options, "augmentations", 3))
    seed = int(getattr(options, "seed", 0))

    with clock.stage("lpips_features"):
        matcher = _matcher(query, options)
        qkey = ("lpips-query-features", getattr(options, "lpips_net", "alex"))
        if qkey not in query.cache:  # query features serve every structure of the run
            progress("LPIPS features of the query", 0, 1)
            query.cache[qkey] = matcher.features(query.images)
        query_feats = query.cache[qkey]
        # the augmented support set: original pair first, then the variants
        candidates = []  # (name, support slice, image, mask)
        for s in supports:
            pairs = augment_support(s.image, s.mask, n_aug, seed=seed + 7919 * s.support + s.slice_index)
            for a, (image, mask) in enumerate(pairs):
                name = f"support{s.support}:slice{s.slice_index}:" + ("original" if a == 0 else f"aug{a}")
                candidates.append((name, s, image.astype(np.float32), mask.astype(bool)))
        support_feats = matcher.features(np.stack([c[2] for c in candidates]))
    with clock.stage("matching"):
        best, distances = matcher.match(query_feats, support_feats)

    with clock.stage("segment_pairs"):
        by_candidate: dict[int, list[int]] = defaultdict(list)
        for i, j in enumerate(best):
            by_candidate[int(j)].append(i)
        masks: list[np.ndarray | None] = [None] * len(query.keys)
        done = 0
        for j, slices in sorted(by_candidate.items()):
            name, s, image, mask = candidates[j]
            key = ("lpips-support", name)
            engine.add_frames({key: image})  # encoded only now, because some slice matched it
            memory = engine.memorize([key], [mask])
            pred = engine.predict_batched([query.keys[i] for i in slices], 1, {0: memory}, num_frames=2)
            for i, m in zip(slices, pred.masks):
                masks[i] = m
            done += len(slices)
            progress(f"Segmenting slice {done}/{len(query.keys)}", done, len(query.keys))

    table = [
        (i, float(distances[i]), False, candidates[int(best[i])][0], candidates[int(best[i])][1].array_index)
        for i in range(len(query.keys))
    ]
    return StructureResult(np.stack(masks), table)
