"""Lesions and `--slice-range auto`: how much of a lesion the estimated range keeps, before and after continuing
past the range ends.

The shared data hold no lesion pairs, so lesions are put into the real IBSR brains (T1 MR, acquired coronal,
1.5 mm slices): an ellipsoid (in-plane radius 10 mm, half-length `--half-length` mm along the slice axis, bright:
the brain's 99th intensity percentile) centred on the white matter of a chosen slice. In every ordered pair of
brains the support's lesion sits `offset` mm higher along the slice axis than the query's (same depth into the
brain otherwise), as a tumour or a multiple-sclerosis plaque lies at its own level in each patient.

Measured per pair and offset:

* **range recall**: the fraction of the query's true lesion slices inside the range the real estimator (LPIPS,
  the real AlexNet weights) gives: what `auto` kept before continuation;
* **after continuation, perfect predictor**: `range_ends.extend_past_range_ends` run with a deterministic
  stand-in for SAM2 that predicts the true lesion mask on every slice (so it stops exactly where the lesion
  ends): the best continuation can do;
* **after continuation, tip-losing predictor**: the same, but the stand-in misses a slice whose lesion area is
  under `--tip` of the lesion's largest slice (SAM2 loses faint ends first): continuation stops there.

SAM2 with random weights cannot say where a real lesion ends; the stand-ins measure the selection logic (what is
continued, where it stops), the estimator measures the range. `python -m fewshotsam2.research.lesion_ranges
--data ../shared/data --weights ../shared/weights/lpips/alexnet_features.pth`.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np

from fewshotsam2.research.extent_eval import IBSR, load_case

LESION = 1
IN_PLANE_RADIUS_MM = 10.0


def add_lesion(images: np.ndarray, wm: np.ndarray, centre_slice: int, spacing: tuple[float, float],
               slice_spacing: float, half_length_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """(images, lesion mask) of a stack with an ellipsoid lesion centred on the white matter of `centre_slice`."""
    n, h, w = images.shape
    rows, cols = np.nonzero(wm[centre_slice])
    if rows.size == 0:
        raise ValueError(f"no white matter on slice {centre_slice}")
    cr, cc = rows.mean(), cols.mean()
    k = np.arange(n)[:, None, None]
    r = np.arange(h)[None, :, None]
    c = np.arange(w)[None, None, :]
    d2 = (((k - centre_slice) * slice_spacing / half_length_mm) ** 2 + ((r - cr) * spacing[0] / IN_PLANE_RADIUS_MM) ** 2
          + ((c - cc) * spacing[1] / IN_PLANE_RADIUS_MM) ** 2)
    mask = d2 <= 1.0
    out = np.array(images, dtype=np.float32, copy=True)
    out[mask] = np.quantile(images[images > 0.05], 0.99)
    return out, mask


def continued_recall(truth: np.ndarray, first: int, last: int, tip: float = 0.0) -> tuple[float, int, int]:
    """Continue past the range ends with a stand-in predictor that returns the truth (a slice whose lesion area is
    under `tip` x the largest is missed). Returns (recall, first, last) of the segmented range."""
    from fewshotsam2.backends.base import StructureResult
    from fewshotsam2.backends.continuation import SliceEdge
    from fewshotsam2.run.range_ends import extend_past_range_ends

    area = truth.reshape(truth.shape[0], -1).sum(axis=1)
    seen = truth & (area >= tip * area.max())[:, None, None]

    def predict(engine, keys, images):
        return [seen[k] for k in keys]

    result = StructureResult(seen[first : last + 1], [], edges={"below": SliceEdge(predict),
                                                                 "above": SliceEdge(predict)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f, l, _, _ = extend_past_range_ends(None, result, list(range(truth.shape[0])), truth, first, last, True,
                                            "lesion", lambda i: i, lambda *a: None)
    return _recall(truth, f, l), f, l


def _recall(truth: np.ndarray, first: int, last: int) -> float:
    slices = np.flatnonzero(truth.reshape(truth.shape[0], -1).any(axis=1))
    return float(((slices >= first) & (slices <= last)).mean()) if first <= last else 0.0


def evaluate(data: Path, estimator, offsets_mm, half_length_mm: float, tip: float, downsample: int = 2,
             levels=(0.35, 0.5, 0.65)) -> list[dict]:
    from fewshotsam2.slicing.extent import StackInfo, stack_info

    brains = {}
    for path in IBSR:
        image, labels, plane = load_case(data / path, downsample)
        info, plan = stack_info(image, labels, axis=plane)
        brains[path] = (np.asarray(info.images), info.labels == 3, info.spacing, info.slice_spacing)
    rows = []
    for q in IBSR:
        for s in IBSR:
            if q == s:
                continue
            qimg, qwm, qsp, qdz = brains[q]
            simg, swm, ssp, sdz = brains[s]
            wm_q = np.flatnonzero(qwm.reshape(qwm.shape[0], -1).any(axis=1))
            wm_s = np.flatnonzero(swm.reshape(swm.shape[0], -1).any(axis=1))
            for level in levels:
                # the same relative depth into each brain's white matter, then the support's moved up by offset
                qc = int(round(wm_q[0] + level * (wm_q[-1] - wm_q[0])))
                qi, qmask = add_lesion(qimg, qwm, qc, qsp, qdz, half_length_mm)
                base = wm_s[0] + level * (wm_s[-1] - wm_s[0])
                for offset in offsets_mm:
                    sc = int(round(base + offset / sdz))
                    if not wm_s[0] <= sc <= wm_s[-1]:
                        continue
                    si, smask = add_lesion(simg, swm, sc, ssp, sdz, half_length_mm)
                    query = StackInfo(qi, qsp, qdz)
                    support = StackInfo(si, ssp, sdz, present={LESION: smask.reshape(smask.shape[0], -1).any(1)})
                    (r,) = estimator.estimate(query, [support], [(LESION, "lesion")])
                    before = 0.0 if r.empty else _recall(qmask, r.first, r.last)
                    if r.empty:
                        perfect, tipped, seg = (0.0, 0.0, (0, -1))
                    else:
                        perfect, f, l = continued_recall(qmask, r.first, r.last)
                        tipped, _, _ = continued_recall(qmask, r.first, r.last, tip)
                        seg = (f, l)
                    truth = np.flatnonzero(qmask.reshape(qmask.shape[0], -1).any(axis=1))
                    rows.append(dict(query=q.split("/")[-1], support=s.split("/")[-1], level=level, offset_mm=offset,
                                     true_first=int(truth[0]), true_last=int(truth[-1]), first=r.first, last=r.last,
                                     recall_range=before, recall_continued=perfect, recall_continued_tip=tipped,
                                     segmented_first=int(seg[0]), segmented_last=int(seg[1]),
                                     n_query=int(qi.shape[0])))
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for offset in sorted({r["offset_mm"] for r in rows}):
        sel = [r for r in rows if r["offset_mm"] == offset]
        out.append(dict(offset_mm=offset, rows=len(sel),
                        cut=sum(r["recall_range"] < 1 for r in sel),
                        mean_range=float(np.mean([r["recall_range"] for r in sel])),
                        min_range=float(np.min([r["recall_range"] for r in sel])),
                        mean_perfect=float(np.mean([r["recall_continued"] for r in sel])),
                        lost_perfect=sum(r["recall_continued"] < 1 for r in sel),
                        mean_tip=float(np.mean([r["recall_continued_tip"] for r in sel])),
                        min_tip=float(np.min([r["recall_continued_tip"] for r in sel])),
                        missed=sum(r["recall_range"] == 0 for r in sel)))
    return out


def main(argv=None) -> int:
    from fewshotsam2.slicing.extent import ExtentEstimator

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--weights", default="../shared/weights/lpips/alexnet_features.pth")
    ap.add_argument("--offsets", default="0,10,20,30,45", help="mm the support's lesion sits higher")
    ap.add_argument("--half-length", type=float, default=12.0, help="lesion half-length along the slice axis, mm")
    ap.add_argument("--tip", type=float, default=0.2, help="tip-losing stand-in: area fraction it misses below")
    ap.add_argument("--downsample", type=int, default=2)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    est = ExtentEstimator(weights=args.weights)
    rows = evaluate(Path(args.data), est, [float(x) for x in args.offsets.split(",")], args.half_length, args.tip,
                    args.downsample)
    for r in rows:
        print(f"{r['query']} <- {r['support']} level {r['level']:.2f} offset {r['offset_mm']:4.0f} mm: true "
              f"{r['true_first']}-{r['true_last']} range {r['first']}-{r['last']} recall {r['recall_range']:.2f} "
              f"-> continued {r['segmented_first']}-{r['segmented_last']} {r['recall_continued']:.2f} "
              f"(tip-losing {r['recall_continued_tip']:.2f})")
    summary = summarise(rows)
    print("| support higher by | pairs | range cuts the lesion | range recall mean (min) | lesion wholly outside "
          "the range | after continuation, perfect predictor: mean (pairs < 1) | tip-losing predictor: mean (min) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for s in summary:
        print(f"| {s['offset_mm']:.0f} mm | {s['rows']} | {s['cut']} | {s['mean_range']:.3f} ({s['min_range']:.2f}) | "
              f"{s['missed']} | {s['mean_perfect']:.3f} ({s['lost_perfect']}) | {s['mean_tip']:.3f} "
              f"({s['min_tip']:.2f}) |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, summary=summary), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
