"""`fewshotsam2 bench`: wall time per stage, encoder calls and peak memory of each method on one query.

Stages: loading (reading query and support), the pipeline's own stages from `SegmentationResult.timings`
(prepare, encode, forward, reverse, self_propagation, propagate, lpips_features, matching, segment_pairs), and
writing (the label map, .nii.gz, to a temporary folder). Every method runs on the same model (built once) in the
same process, and each method's ratio to `propagate` is taken from the same run.

Memory: the process RSS peak (resource.getrusage; it only grows, so per method it is "peak so far" unless
`--isolate` runs each method in a fresh process), the peak of Python/numpy allocations traced by tracemalloc
above what was allocated when the method started (reset before each method), and torch.cuda.max_memory_allocated
on CUDA.

`--matching` instead times LPIPS matching alone (`bench_lpips.run_matching_benchmark`).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from fewshotsam2.constants import METHODS
from fewshotsam2.errors import InputError

UNTRAINED_BANNER = "UNTRAINED: SAM2 ran with random weights (--untrained); these numbers mean nothing"
METHOD_NAMES = ("propagate",) + tuple(m for m in METHODS if m != "propagate")  # the baseline first: ratios are to it
# (column, timings key or our own stage); the pipeline's keys are the contract's
STAGES = (
    ("loading", "loading"),
    ("prepare", "prepare"),
    ("slice range", "extent"),
    ("image encoding", "encode"),
    ("forward", "forward"),
    ("reverse", "reverse"),
    ("self-propagation", "self_propagation"),
    ("propagation", "propagate"),
    ("LPIPS features", "lpips_features"),
    ("matching", "matching"),
    ("segment pairs", "segment_pairs"),
    ("writing", "writing"),
)


def _rss_peak_mib() -> float:
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform != "darwin" else peak / 2**20  # KiB on Linux, bytes on macOS


def crop_slices(volume, labels, axis: int, max_slices: int, value: Optional[int] = None):
    """The `max_slices` slices along array `axis` centred on the labeled extent of `value` (or the middle),
    as new Volumes whose origin moves so every kept voxel stays where it was in physical space."""
    from fewshotsam2.io.volume import Volume

    n = volume.array.shape[axis]
    if max_slices <= 0 or max_slices >= n:
        return volume, labels
    centre = n // 2
    if labels is not None and value is not None:
        present = np.flatnonzero(np.moveaxis(labels.array == value, axis, 0).any(axis=(1, 2)))
        if present.size:
            centre = (int(present[0]) + int(present[-1])) // 2
    start = int(min(max(0, centre - max_slices // 2), n - max_slices))
    ijk = 2 - axis  # arrays are [k, j, i]
    origin = np.asarray(volume.origin) + volume.direction[:, ijk] * volume.spacing[ijk] * start

    def cut(v):
        if v is None:
            return None
        arr = np.take(v.array, np.arange(start, start + max_slices), axis=axis)
        return Volume(np.ascontiguousarray(arr), v.spacing, tuple(origin), v.direction.copy())

    return cut(volume), cut(labels)


def _load_case(path: str, labels_path: Optional[str]):
    """(image, labels or None): a case folder (image.* / dicom/ + labels.*) or an image file (+ labels file)."""
    from fewshotsam2.research.evaluate import find_case
    from fewshotsam2.io.volume import read_labels, read_volume

    p = Path(path)
    if p.is_dir():
        case = find_case(p)
        if case is not None:
            image = read_volume(case.image)
            lab = labels_path or case.labels
            return image, read_labels(lab, image)[0]
    image = read_volume(p)
    return image, (read_labels(labels_path, image)[0] if labels_path else None)


def bench_method(method: str, cfg: dict, engine=None) -> dict:
    """Load, segment and write once with `method`; returns stage seconds, encoder calls and memory peaks."""
    from fewshotsam2.supports.label_selection import LabelChoice
    from fewshotsam2.slicing.slices import SlicePlan
    from fewshotsam2.supports.support_loader import load_supports
    from fewshotsam2.io.volume import LabelMap, default_structure, write_labels

    options = cfg["options_factory"](method)
    trace = cfg.get("tracemalloc", True)
    traced_base = 0
    if trace:
        if not tracemalloc.is_tracing():
            tracemalloc.start()
        tracemalloc.reset_peak()
        # what earlier runs left allocated (caches, imported modules) is not this method's
        traced_base = tracemalloc.get_traced_memory()[0]
    cuda = engine is not None and getattr(getattr(engine, "device", None), "type", "") == "cuda"
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()

    t0 = time.perf_counter()
    query, query_labels = _load_case(cfg["query"], cfg.get("query_labels"))
    s_image, s_labels = _load_case(cfg["support"], cfg.get("support_labels"))
    if s_labels is None:
        raise InputError(f"{cfg['support']}: the support needs labels (a case folder or --support-labels)")
    present = np.unique(s_labels.array[s_labels.array > 0])
    if not cfg["values"] and present.size == 0:
        raise InputError(f"{cfg['support']}: the support labels are empty")
    values = cfg["values"] or [int(present[0])]
    uncropped = None
    if cfg.get("max_slices"):
        axis = SlicePlan.for_volume(query, options.axis).array_axis
        uncropped = int(query.array.shape[axis])
        query, query_labels = crop_slices(query, query_labels, axis, cfg["max_slices"], values[0])
    loading = time.perf_counter() - t0

    t1 = time.perf_counter()
    if cfg.get("segment") is None:
        from fewshotsam2.run.pipeline import segment
    else:
        segment = cfg["segment"]
    # the one support rule (support_loader.py), each structure by its label value
    support_labels = LabelMap(s_labels, [default_structure(int(v)) for v in np.unique(s_labels.array) if v > 0])
    supports, structures = load_supports([(s_image, support_labels, "support")],
                                         [LabelChoice(str(v), "value", str(v)) for v in values])
    result = segment(query, supports, structures, options, progress=None, engine=engine)
    seg_seconds = time.perf_counter() - t1

    t2 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        # --overlap allow with overlapping structures: layers, which only a .seg.nrrd holds
        name = "labels.seg.nrrd" if result.labels.layers is not None else "labels.nii.gz"
        write_labels(Path(tmp) / name, result.labels, result.structures)
    writing = time.perf_counter() - t2

    timings = {k: float(v) for k, v in result.timings.items()}
    timings.update(loading=loading, writing=writing)
    out = dict(
        method=method,
        timings=timings,
        segment_s=seg_seconds,
        total_s=loading + seg_seconds + writing,
        encoder_calls=int(result.encoder_calls),
        rss_peak_mib=_rss_peak_mib(),
        traced_peak_mib=(tracemalloc.get_traced_memory()[1] - traced_base) / 2**20 if trace else float("nan"),
        cuda_peak_mib=float("nan"),
        query_shape=list(query.array.shape),
        slice_axis=int(result.slice_axis),
        n_slices=int(query.array.shape[result.slice_axis]),
        cropped_from=uncropped if uncropped is not None and uncropped > query.array.shape[result.slice_axis] else None,
    )
    if cuda:
        import torch

        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _isolated_job(method: str, cfg: dict, engine_options: dict) -> dict:
    """Child-process entry for --isolate: its own model, so its RSS peak is this method's alone."""
    from fewshotsam2.options import SegmentOptions
    from fewshotsam2.run.pipeline import make_engine

    warnings.filterwarnings("ignore", message=".*RANDOM WEIGHTS.*")
    cfg = dict(cfg, options_factory=lambda m: SegmentOptions.from_flat(**dict(engine_options, method=m)))
    t = time.perf_counter()
    engine = make_engine(SegmentOptions.from_flat(**dict(engine_options, method=method)))
    build = time.perf_counter() - t
    if cfg.get("warmup"):
        bench_method(method, cfg, engine)
    r = bench_method(method, cfg, engine)
    r["model_build_s"] = build
    return r


def _median_run(runs: list[dict]) -> dict:
    """The run with the median total time (whole runs, so stages stay consistent with each other)."""
    runs = sorted(runs, key=lambda r: r["total_s"])
    return dict(runs[(len(runs) - 1) // 2], repeats=len(runs), total_all=[r["total_s"] for r in runs])


def _f(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and (np.isnan(x) or np.isinf(x))) else f"{x:.{digits}f}"


def bench_markdown(results: Sequence[dict], settings: dict, untrained: bool) -> str:
    lines = []
    if untrained:
        lines += [f"**{UNTRAINED_BANNER}** (timings and memory are still real)", ""]
    lines += ["# FewShotSAM2 bench", ""]
    lines += [f"- {k}: {v}" for k, v in settings.items()]
    lines.append("")
    present = [(label, key) for label, key in STAGES if any(key in r["timings"] for r in results)]
    lines += ["## Wall time per stage (s)", "",
              "| method | " + " | ".join(label for label, _ in present) + " | total |",
              "| --- |" + " ---: |" * (len(present) + 1)]
    for r in results:
        cells = [_f(r["timings"][k]) if k in r["timings"] else "" for _, k in present]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + f" | {_f(r['total_s'])} |")
    lines.append("")
    base = next((r for r in results if r["method"] == "propagate"), None)

    def ratio(a: float, b: Optional[float]) -> str:
        if b is None or not b or np.isnan(b) or np.isnan(a):
            return "n/a"
        return f"{a / b:.2f}x"

    lines += ["## Encoder calls, memory, ratio to propagate", "",
              "| method | encoder calls | RSS peak (MiB) | traced numpy/Python peak above start (MiB) "
              "| CUDA peak (MiB) "
              "| time / propagate | encoder calls / propagate | traced peak / propagate |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['encoder_calls']} | {_f(r['rss_peak_mib'], 0)} | {_f(r['traced_peak_mib'], 1)} "
            f"| {_f(r['cuda_peak_mib'], 0)} | {ratio(r['total_s'], base and base['total_s'])} "
            f"| {ratio(float(r['encoder_calls']), base and float(base['encoder_calls']))} "
            f"| {ratio(r['traced_peak_mib'], base and base['traced_peak_mib'])} |")
    lines.append("")
    lines.append("Total = loading + segment (wall) + writing. Stage columns are the pipeline's timings; image "
                 "encoding inside a stage is counted under image encoding only.")
    if any(r.get("repeats", 1) > 1 for r in results):
        lines.append("With --repeat, each row is the run with the median total; all totals: "
                     + "; ".join(f"{r['method']} " + ", ".join(_f(t) for t in r["total_all"]) for r in results))
    return "\n".join(lines) + "\n"


def matching_markdown(result: dict, settings: dict) -> str:
    lines = ["# FewShotSAM2 bench --matching (LPIPS matching alone)", ""]
    lines += [f"- {k}: {v}" for k, v in settings.items()]
    lines += ["", "| measure | value |", "| --- | ---: |"]
    for k, v in result.items():
        if isinstance(v, float):
            text = f"{v:.4g}"
        elif isinstance(v, (dict, list)):
            text = json.dumps(v)
        else:
            text = str(v)
        lines.append(f"| {k} | {text} |")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _write_or_print(text: str, output: Optional[str]) -> None:
    if output:
        from fewshotsam2.io.atomic import write_text_atomic

        write_text_atomic(Path(output), text)
        print(f"written to {output}")
    else:
        print(text)


def run_matching(args: argparse.Namespace) -> int:
    from fewshotsam2.io.paths import refuse_overwriting_inputs

    refuse_overwriting_inputs([("-o", args.output)], [args.lpips_weights])
    try:
        from fewshotsam2.research.bench_lpips import run_matching_benchmark
    except ImportError as e:
        raise InputError(f"--matching needs fewshotsam2.research.bench_lpips ({e})") from None
    kw = dict(n_support=args.n_support, n_query=args.n_query, size=args.matching_size, net=args.lpips_net,
              weights=args.lpips_weights)
    if "device" in inspect.signature(run_matching_benchmark).parameters and args.device != "auto":
        kw["device"] = args.device
    result = run_matching_benchmark(**kw)
    settings = {"support images": args.n_support, "query images": args.n_query, "size": args.matching_size,
                "net": args.lpips_net, "CPU": _cpu_name(), "torch threads": _torch_threads(),
                "load average (1 min) after": _load_average()}
    _write_or_print(matching_markdown(result, settings), args.output)
    return 0


def _load_average() -> str:
    # other work on the machine slows every stage; the numbers are only comparable at a similar load
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _structure_values(text: Optional[str]) -> list[int]:
    """`--structures 1,5` -> [1, 5], in `--labels`' grammar (label_selection.py) restricted to label values:
    bench crops and scores by value. Anything else is one clear error."""
    from fewshotsam2.supports.label_selection import parse_label_selection

    if not (text or "").strip():
        return []
    try:
        choices = parse_label_selection(text)
    except InputError as exc:
        raise InputError(f"--structures '{text}': {exc}") from None
    if not all(c.kind in ("auto", "value") and c.rename is None and c.key.isascii() and c.key.isdigit()
               and int(c.key) > 0 for c in choices):
        raise InputError(f"--structures '{text}': give positive label values, e.g. 1,5")
    values = [int(c.key) for c in choices]
    if len(set(values)) != len(values):
        raise InputError(f"--structures '{text}': a label value is listed twice")
    return values


def _cropped_note(run: dict) -> str:
    """Say a crop only where one happened (--max-slices at or above the query's slice count crops nothing)."""
    return f", cropped from {run['cropped_from']} by --max-slices" if run.get("cropped_from") else ""


def run(args: argparse.Namespace, segment=None, engine_factory=None) -> int:
    """The bench command. `segment` and `engine_factory(options)` default to `pipeline.segment` and
    `pipeline.make_engine` (tests hand in their own; --isolate always uses the defaults)."""
    if args.matching:
        return run_matching(args)
    if not args.query:
        raise InputError("bench needs --query (a case folder or an image file), or --matching")
    from fewshotsam2.options import options_from_args
    from fewshotsam2.research.evaluate import parse_methods
    from fewshotsam2.options import SegmentOptions
    from fewshotsam2.run.pipeline import make_engine

    methods = parse_methods(args.methods)
    from fewshotsam2.io.paths import refuse_overwriting_inputs

    refuse_overwriting_inputs([("-o", args.output)],
                              [args.query, args.query_labels, args.support, args.support_labels,
                               args.checkpoint, args.lpips_weights])
    if args.repeat < 1:
        raise InputError(f"--repeat must be at least 1, got {args.repeat}")
    if args.max_slices < 0:
        raise InputError(f"--max-slices must be 0 (every slice) or more, got {args.max_slices}")
    load_before = _load_average()
    values = _structure_values(args.structures)
    engine_options = {f: getattr(args, f) for f in SegmentOptions.flat_names() if hasattr(args, f) and f != "method"}

    def options_factory(m: str):
        return options_from_args(args, m)

    for m in methods:  # bad options fail here, before the model is built
        options_factory(m)
    cfg = dict(query=args.query, query_labels=args.query_labels, support=args.support or args.query,
               support_labels=args.support_labels, values=values, max_slices=args.max_slices,
               tracemalloc=not args.no_tracemalloc, warmup=args.warmup, options_factory=options_factory,
               segment=segment)
    untrained = bool(args.untrained)  # the banner comes with the numbers, after the run: never before an error
    warnings.filterwarnings("ignore", message=".*RANDOM WEIGHTS.*")

    results = []
    build_s = float("nan")
    if args.isolate:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        child_cfg = {k: v for k, v in cfg.items() if k not in ("options_factory", "segment")}
        for m in methods:
            runs = []
            for _ in range(args.repeat):
                with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                    runs.append(pool.submit(_isolated_job, m, child_cfg, engine_options).result())
            results.append(_median_run(runs))
        build_s = statistics.median(r["model_build_s"] for r in results)
        device = args.device
    else:
        t = time.perf_counter()
        engine = (engine_factory or make_engine)(options_factory(methods[0]))
        build_s = time.perf_counter() - t
        device = str(engine.device)
        if args.warmup:
            # one-off costs (PyTorch start-up, importing lpips) land in whichever method runs first otherwise
            for m in methods:
                bench_method(m, cfg, engine)
        for m in methods:
            results.append(_median_run([bench_method(m, cfg, engine) for _ in range(args.repeat)]))

    r0 = results[0]
    settings = {
        "query": f"{args.query} (array {tuple(r0['query_shape'])}, {r0['n_slices']} slices along array axis "
                 f"{r0['slice_axis']}{_cropped_note(r0)})",
        "support": args.support or args.query,
        "structures": ", ".join(str(v) for v in values) or "first label value of the support",
        "model": f"SAM2 {args.version} {args.model}" + (" (RANDOM WEIGHTS)" if untrained else ""),
        "image size": options_factory(methods[0]).image_size,
        "device": f"{device} ({_cpu_name()}, {os.cpu_count()} cores, torch threads {_torch_threads()})",
        "model build (s)": _f(build_s),
        "process per method": "yes (--isolate)" if args.isolate else "no (RSS peak is the process peak so far)",
        "tracemalloc": "off" if args.no_tracemalloc else "on (adds overhead to Python-heavy stages)",
        "repeats": args.repeat,
        "load average (1 min) before / after": f"{load_before} / {_load_average()}",
        "python / torch": f"{platform.python_version()} / {__import__('torch').__version__}",
    }
    if untrained:
        print(UNTRAINED_BANNER, file=sys.stderr)
    _write_or_print(bench_markdown(results, settings, untrained), args.output)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fewshotsam2.settings import add_arguments as add_setting_arguments

    parser.description = ("Time each stage of each method on one query (and support): wall time, encoder calls, "
                          "peak memory, ratio to propagate. Markdown output. See docs/evaluation.md.")
    parser.add_argument("--query", help="case folder (image + labels) or image file")
    parser.add_argument("--query-labels", help="query labels (optional; centres --max-slices on the structure)")
    parser.add_argument("--support", help="support case folder, or image file with --support-labels "
                                          "(default: the query case)")
    parser.add_argument("--support-labels", help="support labels when --support is an image file")
    parser.add_argument("--structures", help="label values, e.g. 1,5 (default: the support's first label value)")
    parser.add_argument("--methods", default=",".join(METHOD_NAMES), help="comma-separated methods")
    parser.add_argument("--max-slices", type=int, default=0,
                        help="crop the query to this many slices around the structure (0 = all)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per method; the median run is reported")
    parser.add_argument("--warmup", action="store_true",
                        help="run every method once, untimed, before timing (first-use costs excluded)")
    parser.add_argument("--isolate", action="store_true",
                        help="run each method in a fresh process (per-method RSS peak; model built per process)")
    parser.add_argument("--no-tracemalloc", action="store_true", help="do not trace numpy/Python allocations")
    parser.add_argument("-o", "--output", help="write the Markdown here (default: print it)")
    m = parser.add_argument_group("--matching: LPIPS matching alone")
    m.add_argument("--matching", action="store_true", help="benchmark batched LPIPS matching instead")
    m.add_argument("--n-support", type=int, default=50, help="--matching: augmented support images (default 50)")
    m.add_argument("--n-query", type=int, default=100, help="--matching: query slices (default 100)")
    m.add_argument("--matching-size", type=int, default=224, help="LPIPS input size")
    add_setting_arguments(parser, groups=("model", "slices", "reverse", "lpips"))
