"""Several structures in one pass vs one at a time: time, encoder calls, peak RSS (docs/benchmarks.md).

    python -m fewshotsam2.research.bench_structures --query ../shared/data/abdomen-ct/ct-b/dicom \
        --support ../shared/data/abdomen-ct/ct-a --structures 1,5,6,7,8 --counts 1,2,5 --image-size 128 \
        --lpips-weights ../shared/weights/lpips/alexnet_features.pth

Modes, each (count, mode) in a process of its own (its peak RSS is its own), after one untimed warm-up run of the
first structure alone:
- `one-pass`: one `segment` call, the structures batched in one pass (propagate's `run_many`);
- `sequential`: one `segment` call, the structures one after another (the base `Backend.run_many`, the code path
  before the one-pass work; features a later structure reads are kept within the feature budget);
- `separate`: one `segment` call per structure (times and encoder calls summed).
Random weights (the work per stage does not depend on them). The median of `--repeat` timed runs is reported, with
its CPU time (user + system), steadier than wall time on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

MODES = ("one-pass", "sequential", "separate")


def _inputs(args):
    from fewshotsam2.io.volume import read_labels, read_volume

    query = read_volume(args.query)
    folder = Path(args.support)
    image = read_volume(folder / "image.nii.gz")
    labels, structures = read_labels(folder / "labels.nii.gz", image)
    by_value = {s.value: s for s in structures}
    chosen = [by_value[int(v)] for v in args.structures.split(",")]
    return query, image, labels, chosen


def _cpu_seconds() -> float:
    """CPU time of this process (user + system): steadier than wall time on a machine others load too."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _worker(args) -> dict:
    from fewshotsam2.backends import get_backend
    from fewshotsam2.backends.base import Backend
    from fewshotsam2.options import SegmentOptions
    from fewshotsam2.run.pipeline import SupportCase, segment

    backend = type(get_backend(args.method))
    query, image, labels, chosen = _inputs(args)
    support = SupportCase(image, labels, "support")
    options = SegmentOptions.from_flat(method=args.method, image_size=args.image_size, device="cpu", untrained=True,
                                       slice_range=args.slice_range, extent_weights=args.lpips_weights,
                                       overlap=args.overlap)
    structures = chosen[: args.count]
    if args.mode == "sequential":
        backend.run_many = Backend.run_many  # the one-at-a-time loop
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fewshotsam2.model.engine import SAM2Engine

        engine = SAM2Engine.with_random_weights("tiny", image_size=args.image_size, device="cpu")
        segment(query, [support], structures[:1], options, progress=None, engine=engine)  # warm-up
        runs = []
        for _ in range(args.repeat):
            t0, c0 = time.perf_counter(), _cpu_seconds()
            calls = 0
            stage = 0.0
            for part in ([[s] for s in structures] if args.mode == "separate" else [structures]):
                result = segment(query, [support], part, options, progress=None, engine=engine)
                calls += result.encoder_calls
                stage += result.timings.get(args.method, result.timings.get("propagate", 0.0))
            runs.append((time.perf_counter() - t0, calls, stage, _cpu_seconds() - c0))
    total, calls, stage, cpu = sorted(runs)[len(runs) // 2]
    return dict(count=args.count, mode=args.mode, seconds=total, all_seconds=[r[0] for r in runs],
                encoder_calls=calls, stage_seconds=stage, cpu_seconds=cpu,
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _interleaved(args) -> None:
    """Every (count, mode) in one process, in rounds: config after config, `--repeat` rounds, so each sees the
    same machine load on average (on a shared machine the load drifts over minutes). Median wall per config."""
    from fewshotsam2.backends import get_backend
    from fewshotsam2.backends.base import Backend
    from fewshotsam2.model.engine import SAM2Engine
    from fewshotsam2.options import SegmentOptions
    from fewshotsam2.run.pipeline import SupportCase, segment

    query, image, labels, chosen = _inputs(args)
    support = SupportCase(image, labels, "support")
    options = SegmentOptions.from_flat(method=args.method, image_size=args.image_size, device="cpu", untrained=True,
                                       slice_range=args.slice_range, extent_weights=args.lpips_weights,
                                       overlap=args.overlap)
    backend = type(get_backend(args.method))
    batched = backend.run_many
    configs = [(c, m) for c in (int(x) for x in args.counts.split(",")) for m in args.modes.split(",")
               if c > 1 or m == "one-pass"]
    times: dict = {c: [] for c in configs}
    calls: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = SAM2Engine.with_random_weights("tiny", image_size=args.image_size, device="cpu")
        segment(query, [support], chosen[:1], options, progress=None, engine=engine)  # warm-up
        for _ in range(args.repeat):
            for count, mode in configs:
                backend.run_many = Backend.run_many if mode == "sequential" else batched
                structures = chosen[:count]
                t0, n = time.perf_counter(), 0
                for part in ([[s] for s in structures] if mode == "separate" else [structures]):
                    n += segment(query, [support], part, options, progress=None, engine=engine).encoder_calls
                times[(count, mode)].append(time.perf_counter() - t0)
                calls[(count, mode)] = n
    backend.run_many = batched
    one = statistics.median(times[configs[0]])
    print(f"load average: {os.getloadavg()[0]:.1f}\n")
    print("| structures | mode | median wall (s) | runs (s) | x one structure | encoder calls |")
    print("| ---: | --- | ---: | --- | ---: | ---: |")
    for c in configs:
        med = statistics.median(times[c])
        print(f"| {c[0]} | {c[1]} | {med:.2f} | {', '.join(f'{t:.2f}' for t in times[c])} | {med / one:.2f} "
              f"| {calls[c]} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--query", required=True)
    p.add_argument("--support", required=True, help="case folder with image.nii.gz and labels.nii.gz")
    p.add_argument("--structures", default="1,5,6,7,8")
    p.add_argument("--counts", default="1,2,5")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--method", default="propagate")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--slice-range", default="auto")
    p.add_argument("--overlap", default="logits")
    p.add_argument("--lpips-weights", default=None)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--interleave", action="store_true",
                   help="all configurations in one process, in rounds (times comparable on a loaded machine)")
    args = p.parse_args(argv)
    if args.interleave:
        _interleaved(args)
        return
    if args.worker:
        print("RESULT " + json.dumps(_worker(args)))
        return
    rows = []
    for count in (int(c) for c in args.counts.split(",")):
        for mode in args.modes.split(","):
            if count == 1 and mode != "one-pass":
                continue  # one structure: the three modes are the same run
            cmd = [sys.executable, "-m", "fewshotsam2.research.bench_structures", "--worker", "--count", str(count),
                   "--mode", mode] + [a for a in (argv if argv is not None else sys.argv[1:])]
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"worker failed ({count}, {mode}):\n{out.stderr[-3000:]}")
            rows.append(json.loads(line[0][7:]))
            print(json.dumps(rows[-1]), flush=True)
    one = next(r["seconds"] for r in rows if r["count"] == 1)
    print(f"\nload average: {os.getloadavg()[0]:.1f}\n")
    one_cpu = next(r["cpu_seconds"] for r in rows if r["count"] == 1)
    print("| structures | mode | wall (s) | x one structure | CPU time (s) | x one structure | encoder calls "
          "| peak RSS (MiB) |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['count']} | {r['mode']} | {r['seconds']:.1f} | {r['seconds'] / one:.2f} | {r['cpu_seconds']:.1f} "
              f"| {r['cpu_seconds'] / one_cpu:.2f} | {r['encoder_calls']} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
