"""Benchmark: a first run vs a refine after one corrected slice (time, encoder calls, peak RSS), each its own process.

`python -m fewshotsam2.research.bench_refine OUT_DIR [--slices 300] [--image-size 512] [--methods propagate,reverse]
[--device cpu] [--label 5]` builds the clinical-size CT of `clinical_ct` (ct-b stretched to N slices; it is its own
support), runs `fewshotsam2 segment --slice-range off` with a fresh feature cache, draws the true structure on the
middle slice of the first run's result (the correction), runs `fewshotsam2 refine` on it and prints one Markdown
row per method; `--stop-after-agreeing N` adds a row for refine's opt-in approximation (same first run). Each
command runs in its own process, which reports its peak RSS and CPU seconds. Random weights (`--untrained`):
timings and counts are real, masks are not (nor where the approximation stops).

The issue's benchmark (docs/benchmarks.md), from FewShotSAM2/:
  nice python -m fewshotsam2.research.bench_refine OUT --slices 300 --image-size 512 --methods propagate \
      --stop-after-agreeing 5
`--reuse-first` keeps a first run OUT already holds (its label map, feature cache and measurements) and runs the
refines again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


# the command line in a process that reports its own peak RSS on its last stderr line
# (and its CPU seconds, user + system over all threads: less sensitive than wall time to other load on the machine)
_WRAPPER = ("import resource, sys; from fewshotsam2.cli import main; rc = main(sys.argv[1:]); "
            "u = resource.getrusage(resource.RUSAGE_SELF); "
            "print('RSS_KB', u.ru_maxrss, u.ru_utime + u.ru_stime, file=sys.stderr); sys.exit(rc)")


def _run(argv: list[str], env: dict) -> dict:
    """Run `fewshotsam2 ARGV --progress json` in its own process; its done line plus wall seconds and peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *argv, "--progress", "json"], capture_output=True,
                          text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    done = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")][-1]
    done["wall"] = seconds
    last = proc.stderr.strip().splitlines()[-1].split()
    done["rss_mib"] = int(last[1]) / 1024
    done["cpu"] = float(last[2])
    return done


def _row(method, first, refined, changed, args) -> None:
    print(f"| {method} | {args.slices} | {args.image_size} | "
          f"{first['wall']:.1f} ({first['seconds']:.1f}) | {first['cpu']:.0f} | {first['encoder_calls']} | "
          f"{first['rss_mib']:.0f} | {refined['wall']:.1f} ({refined['seconds']:.1f}) | {refined['cpu']:.0f} | "
          f"{refined['encoder_calls']} | {refined['cache_hits']} | {refined['rss_mib']:.0f} | "
          f"{sum(refined.get('predicted_slices', {}).values())} | {changed} | "
          f"{refined['wall'] / first['wall']:.2f}x ({refined['seconds'] / first['seconds']:.2f}x) | "
          f"{refined['cpu'] / first['cpu']:.2f}x |", flush=True)


def main(argv=None) -> int:
    from fewshotsam2.io.volume import read_volume, write_labels, default_structure
    from fewshotsam2.research.clinical_ct import build

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--methods", default="propagate,reverse")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--label", type=int, default=5, help="structure (ct-b label value; 5 = liver, on every slice)")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--reuse-first", action="store_true",
                    help="keep a first run OUT already holds (same slices, size, method: its label map, cache and "
                         "measurements) and run only the refine again")
    ap.add_argument("--stop-after-agreeing", type=int, default=0, metavar="N",
                    help="also run refine's opt-in approximation `--stop-after-agreeing N` (a second refine row)")
    args = ap.parse_args(argv)
    import SimpleITK as sitk

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image, labels = build(Path(args.data), args.slices)
    if not (args.reuse_first and (out / "image.nii.gz").exists()):
        sitk.WriteImage(image.to_sitk(), str(out / "image.nii.gz"))
        sitk.WriteImage(labels.to_sitk(), str(out / "labels.nii.gz"))
    env = dict(os.environ)
    model = ["--untrained", "--image-size", str(args.image_size), "--device", args.device, "--slice-range", "off"]
    # wall: the whole process (Python start, imports, building SAM2, reading, writing); run: the core's own seconds;
    # CPU: user + system seconds of the process over all its threads
    print("| method | slices | size | first run: wall (run) s | CPU s | encoder calls | peak RSS (MiB) | "
          "refine: wall (run) s | CPU s | encoder calls | cache hits | peak RSS (MiB) | slices predicted | slices changed | "
          "refine / first: wall (run) | CPU |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for method in args.methods.split(","):
        cache = out / f"cache-{method}"
        first_path, scores = out / f"{method}-first.nii.gz", out / f"{method}-first.csv"
        measured = out / f"{method}-first.json"
        base = ["--query", str(out / "image.nii.gz"), "--support", str(out / "image.nii.gz"),
                str(out / "labels.nii.gz"), "--method", method, *model, "--feature-cache", str(cache)]
        first = json.loads(measured.read_text()) if args.reuse_first and measured.exists() else None
        if first is not None and (first.get("bench_slices"), first.get("bench_size")) != (args.slices, args.image_size):
            raise SystemExit(f"{measured}: a first run of another size; run without --reuse-first")
        if first is None:
            if cache.exists():
                for p in cache.iterdir():
                    p.unlink()
            first = _run(["segment", *base, "--labels", str(args.label), "--out", str(first_path)]
                         + (["--scores", str(scores)] if method != "propagate" else []), env)
            first.update(bench_slices=args.slices, bench_size=args.image_size)
            measured.write_text(json.dumps(first))
        result = read_volume(first_path)
        edited = result.array.copy()
        k = args.slices // 2
        edited[k] = np.where(labels.array[k] == args.label, args.label, 0)
        write_labels(out / f"{method}-edited.nii.gz", result.with_array(edited), [default_structure(args.label)])
        refine = ["refine", *base, "--previous", str(first_path), "--corrected", str(out / f"{method}-edited.nii.gz")]
        refine += ["--previous-scores", str(scores)] if method != "propagate" else []
        # the approximation first: it is the short one
        for extra in ([["--stop-after-agreeing", str(args.stop_after_agreeing)]] if args.stop_after_agreeing
                      else []) + [[]]:
            name = f"{method}-refined{'-stop' + extra[1] if extra else ''}.nii.gz"
            refined = _run([*refine, "--out", str(out / name), *extra], env)
            changed = int((read_volume(out / name).array != result.array).any(axis=(1, 2)).sum())
            rows.append((method + (f" {' '.join(extra)}" if extra else ""), first, refined, changed))
            _row(*rows[-1], args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
