"""The `fewshotsam2` command: segment (and evaluate, bench) from the shell.

Bad input prints one line on stderr, exits with code 2 and writes nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

from .checkpoints import CACHE_ENV, MODELS, VERSIONS
from .errors import Cancelled, InputError

EXIT_BAD_INPUT = 2

_MODEL_HELP = (
    "SAM2 size: tiny (default, fastest), small, base_plus, large (most accurate). The official checkpoint is "
    f"downloaded on first use into the cache (--cache-dir or ${CACHE_ENV}; default ~/.cache/fewshotsam2/checkpoints)"
)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every command that runs SAM2 shares."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="tiny", help=_MODEL_HELP)
    g.add_argument("--version", default="2.1", choices=VERSIONS, help="SAM2 release: 2 or 2.1 (default 2.1)")
    g.add_argument("--image-size", type=int, default=1024, metavar="N",
                   help="SAM2 input size in pixels (default 1024, what SAM2 was trained at; smaller is faster "
                        "and less accurate; a multiple of 32)")
    g.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"),
                   help="where SAM2 runs (default auto: cuda, then mps, then cpu)")
    g.add_argument("--checkpoint", metavar="PATH",
                   help="a local SAM2 checkpoint (.pt) matching --model/--version, instead of the cached download")
    g.add_argument("--cache-dir", metavar="DIR", help=f"checkpoint cache folder (default ${CACHE_ENV} or "
                                                      "~/.cache/fewshotsam2/checkpoints)")
    g.add_argument("--untrained", action="store_true",
                   help="use RANDOM weights instead of a checkpoint: for testing the plumbing only, "
                        "the masks mean nothing")
    g.add_argument("--batch-size", type=int, default=8, metavar="B",
                   help="slices per batch for the image encoder and for predictions that share memory (default 8)")
    g.add_argument("--feature-storage", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="cached image features: auto (default) = bfloat16 on CUDA, float32 on the CPU unless the "
                        "cache would pass 1 GiB; bfloat16 halves the memory at a small cost in exactness")


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """Slicing and backend options (shared by segment and evaluate)."""
    from .intensity import PRESET_NAMES
    from .slices import AXES

    g = parser.add_argument_group("slices")
    g.add_argument("--axis", default="auto", choices=AXES,
                   help="slice direction: auto = the acquisition axis (coarsest spacing), or a named plane")
    g.add_argument("--preset", default="auto", choices=PRESET_NAMES,
                   help="intensity window: auto = CT abdomen window for CT, 0.5-99.5 percentiles otherwise")
    g.add_argument("--slice-range", default="auto", metavar="auto|off|FIRST:LAST",
                   help="which query slices to segment: auto (default) = per structure, the slices where the "
                        "supports say it can be (aligned by anatomy, plus --extent-margin); off = every slice: "
                        "use it for lesions and tumours, which do not sit at the same level in every patient; "
                        "FIRST:LAST = inclusive indices along the query array's slice axis (see `fewshotsam2 "
                        "extent`). Outside the range the output is background")
    g.add_argument("--extent-margin", type=float, default=15.0, metavar="MM",
                   help="with --slice-range auto: widen each end of the estimated range by this many mm "
                        "(default 15)")
    g.add_argument("--shots", type=int, default=1, metavar="K",
                   help="support slices per support volume and structure: 1 = the middle labeled slice, "
                        "K = K evenly spaced labeled slices (default 1)")
    r = parser.add_argument_group("reverse propagation (--method reverse)")
    r.add_argument("--top-k", type=int, default=5, metavar="K",
                   help="query slices kept as conditional slices, best reverse score first (default 5)")
    r.add_argument("--min-score", type=float, default=0.0, metavar="PI",
                   help="only slices whose reverse score (mean Dice on the supports, 0..1) reaches this are "
                        "kept; if none does, the best slice is used with a warning (default 0)")
    r.add_argument("--keep-supports", action="store_true",
                   help="keep the support slices in SAM2's memory during query self-propagation (default: "
                        "only the conditional query slices, as in the paper)")
    lp = parser.add_argument_group("LPIPS matching (--method lpips)")
    lp.add_argument("--augmentations", type=int, default=3, metavar="N",
                    help="augmented copies of each support slice in the matching set (default 3)")
    lp.add_argument("--lpips-net", default="alex", choices=("alex", "vgg", "squeeze"),
                    help="LPIPS backbone (default alex)")
    lp.add_argument("--lpips-weights", metavar="PATH",
                    help="LPIPS backbone weights (torchvision-layout state dict) for offline use; "
                         "also $FEWSHOTSAM2_LPIPS_WEIGHTS")
    lp.add_argument("--seed", type=int, default=0, help="seed of the augmentations (default 0)")


def options_from_args(args: argparse.Namespace, method: Optional[str] = None):
    from .pipeline import SegmentOptions

    return SegmentOptions(
        method=method or args.method,
        model=args.model,
        version=args.version,
        image_size=args.image_size,
        device=args.device,
        checkpoint=args.checkpoint,
        untrained=args.untrained,
        cache_dir=args.cache_dir,
        axis=args.axis,
        preset=args.preset,
        shots=args.shots,
        top_k=args.top_k,
        min_score=args.min_score,
        keep_supports=args.keep_supports,
        augmentations=args.augmentations,
        lpips_net=args.lpips_net,
        lpips_weights=args.lpips_weights,
        seed=args.seed,
        batch_size=args.batch_size,
        slice_range=getattr(args, "slice_range", "off"),
        extent_margin_mm=getattr(args, "extent_margin", 15.0),
        feature_storage=getattr(args, "feature_storage", "auto"),
    )


def parse_label_selection(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise InputError("--labels is empty: give label values (e.g. 1,5) or segment names")
    return items


def resolve_structures(wanted: list[str], available: list, support_name: str) -> list:
    """Pick structures by label value, or by segment name (for .seg.nrrd supports)."""
    by_value = {s.value: s for s in available}
    by_name = {s.name.lower(): s for s in available}
    chosen = []
    for item in wanted:
        if item.lstrip("-").isdigit():
            s = by_value.get(int(item))
        else:
            s = by_name.get(item.lower())
        if s is None:
            have = ", ".join(f"{s.value} ({s.name})" for s in available) or "none"
            raise InputError(f"label '{item}' is absent from the support labels {support_name} (present: {have})")
        if s not in chosen:
            chosen.append(s)
    return chosen


def _segment_parser(sub) -> None:
    from .pipeline import METHODS

    p = sub.add_parser(
        "segment",
        help="segment structures in a query volume from labeled support volumes",
        description="Segment the structures chosen with --labels in the query volume, prompting SAM2 with "
                    "labeled slices of the support volume(s). Writes one multi-label map on the query's grid.",
    )
    p.add_argument("--query", required=True, metavar="Q",
                   help="the volume to segment: NIfTI/NRRD/MHA file or DICOM series folder")
    p.add_argument("--support", required=True, nargs=2, action="append", metavar=("IMAGE", "LABELS"),
                   help="a labeled support: image (file or DICOM folder) and its labels (label map or .seg.nrrd, "
                        "aligned to the image by physical geometry); repeat for several supports")
    p.add_argument("--labels", required=True, metavar="L1,L2",
                   help="structures to segment: label values (1,5) or, for .seg.nrrd, segment names")
    p.add_argument("--out", required=True, metavar="OUT",
                   help="output label map: .nii.gz, .nii, .nrrd or .seg.nrrd (segment names and colours)")
    p.add_argument("--method", default="reverse", choices=METHODS,
                   help="reverse = reverse propagation (RevSAM2, default); lpips = LPIPS matching (Zu et al.); "
                        "propagate = plain SAM2 propagation (baseline)")
    p.add_argument("--scores", metavar="FILE.csv",
                   help="write per-slice scores (structure, slice index, score, selected, matched support)")
    add_method_arguments(p)
    add_model_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_segment)


def run_segment(args: argparse.Namespace) -> int:
    from .pipeline import SupportCase, segment, validate_options, make_engine, write_scores
    from .volume import check_output_path, read_labels, read_volume, write_labels

    options = options_from_args(args)
    validate_options(options)
    check_output_path(args.out)
    if args.scores:
        check_output_dir(args.scores, ".csv")
    query = read_volume(args.query)
    check_user_slice_range(args.slice_range, query, options.axis)
    supports = []
    structures = None
    wanted = parse_label_selection(args.labels)
    for image_path, labels_path in args.support:
        image = read_volume(image_path)
        labels, available = read_labels(labels_path, image)
        chosen = resolve_structures(wanted, available, labels_path)
        if structures is None:
            structures = chosen  # the first support names and colours the structures
        for s in chosen:
            if not (labels.array == s.value).any():
                raise InputError(f"the support mask of '{s.name}' in {labels_path} is empty")
        supports.append(SupportCase(image, labels, name=Path(labels_path).name))
    engine = make_engine(options)  # after the inputs are known good: building SAM2 takes seconds
    bar = None if args.quiet else _ProgressBar()
    try:
        result = segment(query, supports, structures, options, progress=bar, engine=engine,
                         notify=None if args.quiet else lambda text: print(text, file=sys.stderr))
    finally:
        if bar is not None:
            bar.close()
    write_labels(args.out, result.labels, result.structures)
    if args.scores:
        write_scores(args.scores, result.scores, result.slice_ranges, result.structures)
    for s in result.structures:
        r = result.slice_ranges.get(s.value)
        print(f"{s.name}: slices {r[0]}-{r[1]} along array axis {result.slice_axis}" if r is not None else
              f"{s.name}: empty slice range, not segmented")
    counts = ", ".join(f"{s.name}: {int((result.labels.array == s.value).sum())} voxels" for s in result.structures)
    print(f"wrote {args.out} ({counts}; {result.encoder_calls} slices encoded, {result.timings['total']:.1f} s)")
    return 0


def check_user_slice_range(text: str, query, axis: str) -> None:
    """A FIRST:LAST --slice-range must fit the query: checked before anything is built or written."""
    from .extent import check_slice_range, parse_slice_range
    from .slices import SlicePlan

    given = parse_slice_range(text)
    if given is not None and given != (0, -1):
        plan = SlicePlan.for_volume(query, axis)
        check_slice_range(given[0], given[1], plan.n_slices, plan.array_axis)


def check_output_dir(path: str, suffix: str) -> None:
    p = Path(path)
    if p.suffix.lower() != suffix:
        raise InputError(f"{path}: expected a {suffix} file name")
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"cannot write {path}: folder {folder} does not exist")
    import os

    if not os.access(folder, os.W_OK):
        raise InputError(f"cannot write {path}: folder {folder} is not writable")


class _ProgressBar:
    """One tqdm bar per stage name (tqdm itself is in sam2's requirements)."""

    def __init__(self) -> None:
        self._bar = None
        self._stage = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        head = stage.rsplit(" ", 1)[0] if stage.rsplit(" ", 1)[-1].count("/") == 1 else stage
        if head != self._stage:
            self.close()
            self._stage = head
            self._bar = tqdm(total=total, desc=head, unit="slice", leave=False, file=sys.stderr)
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fewshotsam2",
        description="Few-shot 3D segmentation with SAM2, no training: segment a structure in a new scan from one "
                    "or a few labeled scans.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _segment_parser(sub)
    from . import extent_command

    p = sub.add_parser("extent", help="print each structure's slice range in the query, estimated from supports",
                       description=extent_command.__doc__.strip().splitlines()[0])
    extent_command.add_arguments(p)
    p.set_defaults(func=extent_command.run)
    for name, help_text in (("evaluate", "Dice / HD95 tables and plots over labeled cases"),
                            ("bench", "time each stage of each method on one query")):
        try:
            module = __import__(f"{__package__}.research.{name}", fromlist=["add_arguments", "run"])
        except ImportError:
            continue
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    # warnings are for people: one line each, no source lines
    warnings.formatwarning = lambda message, category, *rest: f"warning: {message}\n"
    try:
        return args.func(args)
    except InputError as exc:
        print(f"fewshotsam2: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Cancelled:
        print("fewshotsam2: cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("fewshotsam2: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
