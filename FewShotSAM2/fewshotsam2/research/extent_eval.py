"""Slice-range estimation on labeled pairs: recall of the true extent and range length / true extent.

`python -m fewshotsam2.research.extent_eval --data ../shared/data` prints one row per (query, support, structure)
and the means; the shared pairs are listed in `PAIRS`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

IBSR = ["brain-mr/ibsr-01", "brain-mr/ibsr-03", "brain-mr/ibsr-04", "brain-mr/ibsr-05"]
CT = {"ct-a": "abdomen-ct/ct-a", "ct-b": "abdomen-ct/ct-b", "spleen-ct": "spleen-ct", "mr": "abdomen-mr"}
# (query, support, [(query label, support label, name)]): values differ only where numbering differs
PAIRS_IBSR = [(q, s, [(1, 1, "CSF"), (2, 2, "GM"), (3, 3, "WM")]) for q in IBSR for s in IBSR if q != s]
PAIRS_CT = [
    (CT["ct-a"], CT["ct-b"], [(1, 1, "spleen"), (5, 5, "liver")]),
    (CT["ct-b"], CT["ct-a"], [(1, 1, "spleen"), (5, 5, "liver")]),
    (CT["spleen-ct"], CT["ct-a"], [(1, 1, "spleen")]),
    (CT["spleen-ct"], CT["ct-b"], [(1, 1, "spleen")]),
    (CT["ct-a"], CT["spleen-ct"], [(1, 1, "spleen")]),
    (CT["ct-b"], CT["spleen-ct"], [(1, 1, "spleen")]),
]
# several supports at once (their ranges are joined)
MULTI = [(q, tuple(s for s in IBSR if s != q), [(1, 1, "CSF"), (2, 2, "GM"), (3, 3, "WM")]) for q in IBSR] + [
    (CT["spleen-ct"], (CT["ct-a"], CT["ct-b"]), [(1, 1, "spleen")]),
    (CT["mr"], (CT["ct-a"], CT["ct-b"]), [(1, 1, "spleen"), (5, 5, "liver")]),
]
PAIRS_CTMR = [
    (CT["mr"], CT["ct-a"], [(1, 1, "spleen"), (5, 5, "liver")]),
    (CT["ct-a"], CT["mr"], [(1, 1, "spleen"), (5, 5, "liver")]),
    (CT["mr"], CT["ct-b"], [(1, 1, "spleen"), (5, 5, "liver")]),
    (CT["ct-b"], CT["mr"], [(1, 1, "spleen"), (5, 5, "liver")]),
]


def load_case(folder: Path, downsample: int = 1, max_side: Optional[int] = None):
    """(image, labels, plane) of a case folder; optionally in-plane downsampled (every n-th pixel) to keep tests
    fast. `plane` is the acquisition plane of the original: downsampling can make another axis the coarsest."""
    from fewshotsam2.research.evaluate import find_case
    from fewshotsam2.io.volume import Volume, read_labels, read_volume
    from fewshotsam2.slicing.slices import SlicePlan

    case = find_case(Path(folder))
    image = read_volume(case.image)
    labels = read_labels(case.labels, image)[0]
    plan = SlicePlan.for_volume(image)
    if downsample > 1:
        axis = plan.array_axis
        sl = [slice(None, None, downsample)] * 3
        sl[axis] = slice(None)
        spacing = list(image.spacing)
        for a in range(3):
            if a != axis:
                spacing[2 - a] *= downsample  # spacing is (i, j, k) = array axes (2, 1, 0)
        image = Volume(np.ascontiguousarray(image.array[tuple(sl)]), tuple(spacing), image.origin, image.direction)
        labels = Volume(np.ascontiguousarray(labels.array[tuple(sl)]), tuple(spacing), labels.origin,
                        labels.direction)
    return image, labels, plan.plane


def evaluate_pairs(data: Path, pairs, estimator, downsample: int = 1) -> list[dict]:
    from fewshotsam2.slicing.extent import stack_info

    cache: dict = {}

    def get(path):
        if path not in cache:
            image, labels, plane = load_case(data / path, downsample)
            cache[path] = stack_info(image, labels, axis=plane)[0]
        return cache[path]

    rows = []
    for q, s, structs in pairs:
        qi = get(q)
        sis = [get(x) for x in (s if isinstance(s, tuple) else (s,))]
        t0 = time.perf_counter()
        ranges = estimator.estimate(qi, sis, [(sv, name) for _, sv, name in structs])
        seconds = time.perf_counter() - t0
        for (qv, _, name), r in zip(structs, ranges):
            truth = np.flatnonzero((qi.labels == qv).reshape(qi.labels.shape[0], -1).any(axis=1))
            if truth.size == 0:
                continue
            t_first, t_last = int(truth[0]), int(truth[-1])
            inside = ((truth >= r.first) & (truth <= r.last)).sum() if not r.empty else 0
            rows.append(dict(query=q, support="+".join(x.split("/")[-1] for x in s) if isinstance(s, tuple) else s,
                             structure=name, n_query=int(qi.images.shape[0]),
                             true_first=t_first, true_last=t_last, first=r.first, last=r.last,
                             recall=float(inside / truth.size),
                             length_ratio=float(len(r) / (t_last - t_first + 1)), seconds=seconds))
    return rows


def summary(rows: Sequence[dict]) -> dict:
    if not rows:
        return {}
    return dict(n=len(rows), mean_recall=float(np.mean([r["recall"] for r in rows])),
                min_recall=float(np.min([r["recall"] for r in rows])),
                mean_length_ratio=float(np.mean([r["length_ratio"] for r in rows])),
                max_length_ratio=float(np.max([r["length_ratio"] for r in rows])))


def main(argv=None) -> int:
    from fewshotsam2.slicing.extent import ExtentEstimator, MARGIN_MM, OUTSIDE_QUANTILE

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--weights", default="../shared/weights/lpips/alexnet_features.pth")
    ap.add_argument("--sets", default="ibsr,ct,ctmr")
    ap.add_argument("--margin", type=float, default=MARGIN_MM)
    ap.add_argument("--outside", type=float, default=OUTSIDE_QUANTILE)
    ap.add_argument("--size", type=int, default=224, help="LPIPS image size")
    ap.add_argument("--downsample", type=int, default=1)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    est = ExtentEstimator(weights=args.weights, size=args.size, margin_mm=args.margin, outside_quantile=args.outside)
    sets = {"ibsr": PAIRS_IBSR, "ct": PAIRS_CT, "ctmr": PAIRS_CTMR, "multi": MULTI}
    out = {}
    for name in args.sets.split(","):
        rows = evaluate_pairs(Path(args.data), sets[name], est, args.downsample)
        out[name] = dict(rows=rows, summary=summary(rows))
        print(f"## {name}")
        for r in rows:
            print(f"{r['query']:>18} <- {r['support']:<18} {r['structure']:<7} true {r['true_first']:3d}-"
                  f"{r['true_last']:3d} est {r['first']:3d}-{r['last']:3d} of {r['n_query']:3d}  recall "
                  f"{r['recall']:.3f} ratio {r['length_ratio']:.2f}  {r['seconds']:.1f}s")
        print(json.dumps(out[name]["summary"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
