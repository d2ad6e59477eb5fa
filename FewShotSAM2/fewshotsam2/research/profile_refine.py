"""Where a refine spends its time: `segment` then `refine` (propagate, one corrected slice, feature cache warm) in
their own processes under cProfile, and the time of each stage per predicted slice.

`python -m fewshotsam2.research.profile_refine OUT_DIR [--slices 10] [--image-size 512]` (from FewShotSAM2/, with
OMP_NUM_THREADS set as wanted; each command runs in its own process) builds the clinical-size CT of `clinical_ct` at N slices, runs both commands with
random weights and prints the CPU seconds (of all the process's threads: set OMP_NUM_THREADS=1 for a clean
profile; they do not depend on other jobs on the machine as wall time does) of the stages: image encoder, memory attention, memory encoder, mask decoder, feature-cache
reads, building SAM2, reading and writing volumes. The profiles stay in OUT_DIR (segment.prof, refine.prof).
"""

from __future__ import annotations

import argparse
import pstats
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

# argv[1]: where the profile goes; the rest: the command line. CPU seconds: the machine may be busy with other work
_PROFILED = ("import cProfile, sys, time, warnings; warnings.simplefilter('ignore'); from fewshotsam2.cli import main; "
             "p = cProfile.Profile(time.process_time); p.enable(); rc = main(sys.argv[2:]); p.disable(); "
             "p.dump_stats(sys.argv[1]); sys.exit(rc)")

# stage name -> (file suffix, function name) as cProfile names them
STAGES = {
    "image encoder": ("sam2_base.py", "forward_image"),
    "memory attention": ("memory_attention.py", "forward"),
    "memory encoder": ("sam2_base.py", "_encode_new_memory"),
    "mask decoder": ("sam2_base.py", "_forward_sam_heads"),
    "feature cache reads": ("feature_cache.py", "fill"),
    "feature cache writes": ("feature_cache.py", "put"),
    "building SAM2": ("engine.py", "build_sam2_model"),
    "reading volumes": ("volume.py", "read_volume"),
    "reading label maps": ("volume.py", "read_labels"),
    "writing the labels": ("volume.py", "write_labels"),
}


def stage_seconds(prof: Path) -> dict[str, float]:
    """Cumulative seconds per stage (the outermost call of each function: recursion is not counted twice)."""
    stats = pstats.Stats(str(prof)).stats
    out = {}
    for stage, (suffix, name) in STAGES.items():
        # memory_attention.py has two `forward`s (the layer and the stack): take the largest (the stack)
        times = [v[3] for (f, _, n), v in stats.items() if f.endswith(suffix) and n == name]
        out[stage] = max(times) if times else 0.0
    return out


def main(argv=None) -> int:
    from fewshotsam2.io.volume import default_structure, read_volume, write_labels
    from fewshotsam2.research.clinical_ct import build

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--slices", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--label", type=int, default=5)
    ap.add_argument("--data", default="../shared/data")
    args = ap.parse_args(argv)
    import SimpleITK as sitk

    warnings.filterwarnings("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image, labels = build(Path(args.data), args.slices)
    sitk.WriteImage(image.to_sitk(), str(out / "image.nii.gz"))
    sitk.WriteImage(labels.to_sitk(), str(out / "labels.nii.gz"))
    cache = out / "cache"
    for p in cache.glob("*"):
        p.unlink()
    base = ["--query", str(out / "image.nii.gz"), "--support", str(out / "image.nii.gz"), str(out / "labels.nii.gz"),
            "--method", "propagate", "--untrained", "--image-size", str(args.image_size), "--device", "cpu",
            "--slice-range", "off", "--feature-cache", str(cache), "--quiet"]
    runs = {"segment": ["segment", *base, "--labels", str(args.label), "--out", str(out / "first.nii.gz")]}
    runs["refine"] = ["refine", *base, "--previous", str(out / "first.nii.gz"), "--corrected",
                      str(out / "edited.nii.gz"), "--out", str(out / "refined.nii.gz")]
    total = {}
    for name, argv_ in runs.items():
        if name == "refine":  # the true structure drawn on the middle slice of the first run's result
            first = read_volume(out / "first.nii.gz")
            edited = first.array.copy()
            k = args.slices // 2
            edited[k] = np.where(labels.array[k] == args.label, args.label, 0)
            write_labels(out / "edited.nii.gz", first.with_array(edited), [default_structure(args.label)])
        # the command line in its own process (as a user runs it), profiled in CPU seconds
        proc = subprocess.run([sys.executable, "-c", _PROFILED, str(out / f"{name}.prof"), *argv_],
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        total[name] = pstats.Stats(str(out / f"{name}.prof")).total_tt
    n = args.slices
    print("| stage | segment s | per slice | refine s | per predicted slice |\n| --- | ---: | ---: | ---: | ---: |")
    seg, ref = stage_seconds(out / "segment.prof"), stage_seconds(out / "refine.prof")
    for stage in STAGES:
        print(f"| {stage} | {seg[stage]:.2f} | {seg[stage] / n:.3f} | {ref[stage]:.2f} | {ref[stage] / (n - 1):.3f} |")
    print(f"| whole command | {total['segment']:.2f} | | {total['refine']:.2f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
