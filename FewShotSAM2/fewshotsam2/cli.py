"""The `fewshotsam2` command: segment (and evaluate, bench) from the shell.

Bad input prints one line on stderr, exits with code 2 and writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from . import __version__
from . import constants as C
from .checkpoints import CACHE_ENV
from .errors import Cancelled, InputError
from .label_selection import SYNTAX_HELP as _LABELS_HELP
from .label_selection import parse_label_selection, resolve_structures  # noqa: F401  (public: used by others)
from .options import OptionError, SegmentOptions
from .progress import ProgressBar as _ProgressBar

EXIT_BAD_INPUT = 2

# command -> (module exposing add_arguments(parser) and run(args) -> int, one-line help, example invocations).
# A command's module is imported only when that command runs or its --help is asked: `fewshotsam2 --help` and
# every `COMMAND --help` answer at once, with no torch import.
_DEMO = "$(fewshotsam2 sample-data | tail -n 1)"  # the sample data folder, fetched on first use
COMMANDS: dict[str, tuple[str, str, str]] = {
    "segment": (
        "", "segment structures in a query volume from labeled support volumes",
        f"""example (the sample data, random weights, 128 px on the CPU: about a minute; drop --untrained and
--image-size for real masks):
  d={_DEMO}
  fewshotsam2 segment --query $d/abdomen-ct/ct-b/dicom \\
      --support $d/abdomen-ct/ct-a/image.nii.gz $d/abdomen-ct/ct-a/labels.nii.gz \\
      --labels liver=5,spleen=1 --out ct-b.seg.nrrd --scores ct-b_scores.csv \\
      --untrained --image-size 128 --device cpu"""),
    "extent": (
        "fewshotsam2.extent_command", "print each structure's slice range in the query, estimated from supports",
        f"""example (where ct-a's liver and spleen are in the ct-b series):
  d={_DEMO}
  fewshotsam2 extent --query $d/abdomen-ct/ct-b/dicom \\
      --support $d/abdomen-ct/ct-a/image.nii.gz $d/abdomen-ct/ct-a/labels.nii.gz --labels 5,1 --json"""),
    "serve": (
        "fewshotsam2.serve.command", "serve segmentations to other machines (Ray Serve; extra [serve])",
        """example (this machine only; prints the token clients give with --token-file or in Slicer):
  fewshotsam2 serve --port 8000
then, on a client: fewshotsam2 segment --server http://127.0.0.1:8000 --token-file token.txt ..."""),
    "batch": (
        "fewshotsam2.batch", "segment a cohort (manifest CSV or folder): one model, supports encoded once", ""),
    "sample-data": (
        "fewshotsam2.sample_data", "fetch, verify and cache the demo data (abdomen-ct pair)", ""),
    "evaluate": (
        "fewshotsam2.research.evaluate", "Dice / HD95 tables and plots over labeled cases",
        f"""example (the two sample CT cases, each the other's support; random weights: checks the plumbing only):
  d={_DEMO}
  fewshotsam2 evaluate $d/abdomen-ct/ct-a $d/abdomen-ct/ct-b \\
      --structures liver=5,spleen=1 -o eval-out --untrained --image-size 256 --device cpu"""),
    "bench": (
        "fewshotsam2.research.bench", "time each stage of each method on one query",
        f"""example (sample case ct-a as its own support, liver, 12 slices, 256 px on the CPU):
  d={_DEMO}
  fewshotsam2 bench --query $d/abdomen-ct/ct-a --structures 5 --max-slices 12 \\
      --untrained --image-size 256 --device cpu"""),
}

_MODEL_HELP = (
    "SAM2 size: tiny (default, fastest), small, base_plus, large (most accurate). The official checkpoint is "
    f"downloaded on first use into the cache (--cache-dir or ${CACHE_ENV}; default ~/.cache/fewshotsam2/checkpoints)"
)


def flag(option: str) -> str:
    """The command-line flag of an option's flat name (`top_k` -> `--top-k`)."""
    return "--" + option.replace("_", "-")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every command that runs SAM2 shares (defaults: `options.SegmentOptions`)."""
    d = SegmentOptions.flat_defaults()
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=d["model"], help=_MODEL_HELP)
    g.add_argument("--version", default=d["version"], choices=C.VERSIONS,
                   help=f"SAM2 release: {' or '.join(C.VERSIONS)} (default {d['version']})")
    g.add_argument("--image-size", type=int, default=d["image_size"], metavar="N",
                   help=f"SAM2 input size in pixels (default {d['image_size']}, what SAM2 was trained at and the "
                        f"largest allowed; smaller is faster and less accurate; a multiple of {C.IMAGE_SIZE_STEP}, "
                        f"at least {C.MIN_IMAGE_SIZE})")
    g.add_argument("--device", default=d["device"], choices=C.DEVICES,
                   help="where SAM2 runs (default auto: cuda, then mps, then cpu)")
    g.add_argument("--checkpoint", metavar="PATH",
                   help="a local SAM2 checkpoint (.pt) matching --model/--version, instead of the cached download")
    g.add_argument("--cache-dir", metavar="DIR", help=f"checkpoint cache folder (default ${CACHE_ENV} or "
                                                      "~/.cache/fewshotsam2/checkpoints)")
    g.add_argument("--untrained", action="store_true",
                   help="use RANDOM weights instead of a checkpoint: for testing the plumbing only, "
                        "the masks mean nothing")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], metavar="B",
                   help="slices per batch for the image encoder and for predictions that share memory "
                        f"(default {d['batch_size']}, at least 1; on a CPU the encoder takes one slice at a time "
                        "and predictions are batched only as far as memory allows)")
    g.add_argument("--feature-storage", default=d["feature_storage"], choices=("auto", "float32", "bfloat16"),
                   help="cached image features: auto (default) = bfloat16 on CUDA, float32 on the CPU unless the "
                        "features kept between passes would pass 256 MiB (past that budget slices are encoded "
                        "again); bfloat16 halves the memory at a small cost in exactness")


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """Slicing and backend options (shared by segment and evaluate; defaults: `options`)."""
    d = SegmentOptions.flat_defaults()
    g = parser.add_argument_group("slices")
    g.add_argument("--axis", default=d["axis"], choices=C.AXES,
                   help="slice direction: auto = the acquisition axis (coarsest spacing), or a named plane")
    g.add_argument("--preset", default=d["preset"], choices=C.PRESETS,
                   help="intensity window: auto = CT abdomen window for CT, 0.5-99.5 percentiles otherwise")
    # the command line defaults to "auto" (the library to "off", so scripted runs keep whole-volume results)
    g.add_argument("--slice-range", default="auto", metavar="auto|off|FIRST:LAST|S=RANGE,...",
                   help="which query slices to segment: auto (default) = per structure, the slices where the "
                        "supports say it can be (aligned by anatomy, plus --extent-margin); off = every slice: "
                        "use it for lesions and tumours, which do not sit at the same level in every patient; "
                        "FIRST:LAST = inclusive indices along the query array's slice axis (see `fewshotsam2 "
                        "extent`); per structure: e.g. 5=10:40,spleen=off (keyed by output value or name; structures "
                        "not named take auto, or a bare RANGE in the list). Outside the range the output is "
                        "background")
    g.add_argument("--extent-margin", type=float, default=d["extent_margin"], metavar="MM",
                   help="with --slice-range auto: widen each end of the estimated range by this many mm "
                        f"(default {d['extent_margin']:g})")
    g.add_argument("--shots", type=int, default=d["shots"], metavar="K",
                   help="support slices per support volume and structure: 1 = the middle labeled slice, "
                        f"K = K evenly spaced labeled slices (default {d['shots']})")
    r = parser.add_argument_group("reverse propagation (--method reverse)")
    r.add_argument("--top-k", type=int, default=d["top_k"], metavar="K",
                   help=f"query slices kept as conditional slices, best reverse score first (default {d['top_k']})")
    r.add_argument("--min-score", type=float, default=d["min_score"], metavar="PI",
                   help="only slices whose reverse score (mean Dice on the supports, 0..1) reaches this are "
                        f"kept; if none does, the best slice is used with a warning (default {d['min_score']:g})")
    r.add_argument("--keep-supports", action="store_true",
                   help="keep the support slices in SAM2's memory during query self-propagation (default: "
                        "only the conditional query slices, as in the paper)")
    lp = parser.add_argument_group("LPIPS matching (--method lpips)")
    lp.add_argument("--augmentations", type=int, default=d["augmentations"], metavar="N",
                    help=f"augmented copies of each support slice in the matching set (default {d['augmentations']})")
    lp.add_argument("--lpips-net", default=d["lpips_net"], choices=C.LPIPS_NETS,
                    help=f"LPIPS backbone (default {d['lpips_net']})")
    lp.add_argument("--lpips-weights", metavar="PATH",
                    help="LPIPS backbone weights (torchvision-layout state dict) for offline use; "
                         "also $FEWSHOTSAM2_LPIPS_WEIGHTS")
    lp.add_argument("--seed", type=int, default=d["seed"], help=f"seed of the augmentations (default {d['seed']})")


def options_from_args(args: argparse.Namespace, method: Optional[str] = None) -> SegmentOptions:
    """The SegmentOptions of parsed arguments: each option's flag is its flat name (`--top-k` is `top_k`)."""
    flat = {name: getattr(args, name) for name in SegmentOptions.flat_names() if hasattr(args, name)}
    if method is not None:
        flat["method"] = method
    if getattr(args, "lpips_weights", None):  # the slice-range estimate uses the same AlexNet
        flat.setdefault("extent_weights", args.lpips_weights)
    return SegmentOptions.from_flat(**flat)


def add_segment_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Segment the structures chosen with --labels in the query volume, prompting SAM2 with "
                     "labeled slices of the support volume(s). Writes one multi-label map on the query's grid.")
    p.add_argument("--query", required=True, metavar="Q",
                   help="the volume to segment: NIfTI/NRRD/MHA file or DICOM series folder (FOLDER#N or "
                        "FOLDER#SERIES_UID picks one series of a folder holding several)")
    p.add_argument("--support", required=True, nargs=2, action="append", metavar=("IMAGE", "LABELS"),
                   help="a labeled support: image (file or DICOM folder) and its labels (label map or .seg.nrrd, "
                        "aligned to the image by physical geometry); repeat for several supports")
    p.add_argument("--labels", required=True, metavar="L1,L2",
                   help="structures to segment: " + _LABELS_HELP.replace("%", "%%")
                        + "; a digit-only name that is also another segment's value is refused as ambiguous")
    p.add_argument("--out", required=True, metavar="OUT",
                   help="output label map: .nii.gz, .nii, .nrrd or .seg.nrrd (segment names and colours)")
    p.add_argument("--method", default=SegmentOptions.flat_defaults()["method"], choices=C.METHODS,
                   help="reverse = reverse propagation (RevSAM2, default); lpips = LPIPS matching (Zu et al.); "
                        "propagate = plain SAM2 propagation (baseline)")
    p.add_argument("--scores", metavar="FILE.csv",
                   help="write per-slice scores (structure, slice index, score, selected, matched support)")
    add_method_arguments(p)
    add_model_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--progress", default="bar", choices=("bar", "json"),
                   help="bar = a progress bar on stderr (default); json = machine-readable lines on stdout, one "
                        "JSON object each: progress (stage, done, total), warning (message), done (device, seconds)")
    s = p.add_argument_group("remote (a `fewshotsam2 serve` server)")
    s.add_argument("--server", metavar="URL", help="run the job on this server (https://host:port) instead of here: "
                   "the same outputs and exit codes; inputs are uploaded, the outputs downloaded")
    s.add_argument("--token-file", metavar="F", help="with --server: the file holding this client's token "
                   "(else $FEWSHOTSAM2_SERVER_TOKEN)")


def run_segment(args: argparse.Namespace) -> int:
    global _json_out
    if getattr(args, "server", None):  # the same job on a `fewshotsam2 serve` server
        from .serve.client import run_remote

        return run_remote(args)
    json_lines = getattr(args, "progress", "bar") == "json"
    if json_lines:
        # stdout carries the JSON lines only: whatever else prints there (a library's download notice) goes to
        # stderr. A program that runs segment in-process (the server's replica) takes the events in `args.events`.
        events = getattr(args, "events", None)
        previous, warnings.showwarning = warnings.showwarning, _json_warning
        stdout = sys.stdout
        if events is None:
            _json_out, sys.stdout = sys.stdout, sys.stderr
        else:
            _json_out = _EventWriter(events)
        try:
            return _run_segment(args, json_lines)
        finally:
            warnings.showwarning = previous
            sys.stdout, _json_out = stdout, None
    return _run_segment(args, json_lines)


class _EventWriter:
    """Hands each JSON line to a callable as a dict (see run_segment's `args.events`)."""

    def __init__(self, events: Callable[[dict], None]) -> None:
        self.events = events

    def write(self, line: str) -> None:
        import json

        self.events(json.loads(line))

    def flush(self) -> None:
        pass


def _run_segment(args: argparse.Namespace, json_lines: bool) -> int:
    from .paths import refuse_overwriting_inputs
    from .pipeline import SupportCase, check_query, make_engine, segment, write_scores
    from .volume import check_output_path, output_structures, read_labels, read_volume, structure_mask, write_labels

    options = options_from_args(args)
    # both outputs are checked before any work: never replace an input, never fail after the run
    refuse_overwriting_inputs([("--out", args.out), ("--scores", args.scores)],
                              [args.query, *(p for pair in args.support for p in pair), args.checkpoint,
                               args.lpips_weights])
    check_output_path(args.out)
    if args.scores:
        if options.method == "propagate":
            raise InputError("--scores: --method propagate has no per-slice scores (reverse and lpips have); "
                             "leave --scores out or choose another method")
        check_output_dir(args.scores, ".csv")
    if json_lines:  # the first encoded batch can take a minute at 1024 px on a CPU: say what happens until then
        _json_progress("Reading the volumes", 0, 0)
    query = read_volume(args.query)
    check_query(query)
    check_user_slice_range(options.slice_range, query, options.axis)
    wanted = parse_label_selection(args.labels)
    several = len(args.support) > 1
    read = []  # (image, labels, labels_path, [(index into wanted, chosen structure)])
    first: dict[int, object] = {}  # index into wanted -> the structure of the first support that has it
    for image_path, labels_path in args.support:
        image = read_volume(image_path)
        labels, available = read_labels(labels_path, image)
        # several supports: each needs only the structures it has (the pipeline skips it for the others)
        mine = [i for i, w in enumerate(wanted) if _present(w, available, labels_path)] if several else range(len(wanted))
        chosen = list(zip(mine, resolve_structures([wanted[i] for i in mine], available, labels_path)))
        for i, s in chosen:
            first.setdefault(i, s)
        read.append((image, labels, labels_path, chosen))
    missing = [wanted[i].text for i in range(len(wanted)) if i not in first]
    if missing:
        raise InputError(f"label '{missing[0]}' is absent from every support")
    # the first support that has a structure names and colours it; the --labels order decides overlaps
    structures = output_structures([first[i] for i in range(len(wanted))], Path(args.support[0][1]).name)
    supports = []
    for image, labels, labels_path, chosen in read:
        # each support's own segment (its layer and label value) is the mask of the output structure
        masks = {}
        for i, s in chosen:
            masks[structures[i].value] = structure_mask(labels, s)
            if not masks[structures[i].value].any():
                raise InputError(f"the support mask of '{s.name}' in {labels_path} is empty")
        supports.append(SupportCase(image, labels, name=Path(labels_path).name, masks=masks))
    if not options.untrained and options.checkpoint is None:
        from .checkpoints import cached_checkpoint, check_cache_folder

        if cached_checkpoint(options.model, options.version, options.cache_dir) is None:
            check_cache_folder(options.cache_dir)  # the download must have somewhere to go
    if options.method == "lpips":
        from .backends.lpips_matching import _matcher

        # load (and so check) the LPIPS weights now, not after every slice is encoded
        _matcher(None, options.method_options)
    bar = _json_progress if json_lines else None if args.quiet else _ProgressBar()
    if json_lines:
        _json_progress(f"Loading SAM2 {options.model}", 0, 0)
    try:
        with out_of_memory_as_input_error(options):
            # after the inputs are known good: building SAM2 takes seconds
            engine = (getattr(args, "engine_factory", None) or make_engine)(options)
            notify = None if json_lines or args.quiet else (lambda text: print(text, file=sys.stderr))
            result = segment(query, supports, structures, options, progress=bar, engine=engine, notify=notify)
    finally:
        if isinstance(bar, _ProgressBar):
            bar.close()
    write_labels(args.out, result.labels, result.structures)
    if args.scores:
        write_scores(args.scores, result.scores, result.slice_ranges, result.structures)
    voxels = {s.name: int((result.labels.array == s.value).sum()) for s in result.structures}
    if json_lines:
        _json_line(event="done", out=str(args.out), device=str(getattr(engine, "device", "")),
                   seconds=result.timings["total"], slice_axis=int(result.slice_axis),
                   encoder_calls=int(result.encoder_calls), voxels=voxels,
                   slice_ranges={s.name: result.slice_ranges.get(s.value) for s in result.structures})
        return 0
    for s in result.structures:
        r = result.slice_ranges.get(s.value)
        print(f"{s.name}: segmented slices {r[0]}-{r[1]} along array axis {result.slice_axis}" if r is not None
              else f"{s.name}: empty slice range, not segmented")
    counts = ", ".join(f"{name}: {n} voxels" for name, n in voxels.items())
    print(f"wrote {args.out} ({counts}; {result.encoder_calls} slices encoded, {result.timings['total']:.1f} s)")
    return 0


def _present(choice, available: list, source: str) -> bool:
    """Whether a --labels item finds a structure in this support (an ambiguous item is still an error)."""
    try:
        resolve_structures([choice], available, source)
    except InputError as exc:
        if "is absent from" in str(exc):
            return False
        raise
    return True


_json_out = None  # the real stdout while `segment --progress json` runs (sys.stdout then points at stderr)


def _json_line(**fields) -> None:
    """One JSON object per line on stdout, flushed at once: the Slicer module reads these while the run goes on."""
    import json

    out = _json_out or sys.stdout
    out.write(json.dumps(fields) + "\n")
    out.flush()


PARENT_PID_ENV = "FEWSHOTSAM2_PARENT_PID"


def _json_progress(stage: str, done: int, total: int) -> None:
    _json_line(event="progress", stage=stage, done=int(done), total=int(total))
    _stop_if_orphaned()


def _stop_if_orphaned() -> None:
    """Stop when the program that started this run is gone (Slicer killed or crashed): nobody reads the result.

    The Slicer module runs each segmentation in its own process group (so that Cancel can kill it with its
    children), which also means the run would outlive a killed Slicer; it names its own pid in
    $FEWSHOTSAM2_PARENT_PID. POSIX only (on Windows os.kill(pid, 0) would send Ctrl-C).
    """
    import os

    parent = os.environ.get(PARENT_PID_ENV, "")
    if os.name != "posix" or not parent.isdigit():
        return
    try:
        os.kill(int(parent), 0)
    except ProcessLookupError:
        raise Cancelled(f"the program that started this run (pid {parent}) is gone") from None
    except PermissionError:
        pass  # exists, owned by someone else


def _json_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The core's warnings (structure not found, modality mismatch, ...) as lines of the JSON stream."""
    _json_line(event="warning", message=str(message))


def check_user_slice_range(text: str, query, axis: str) -> None:
    """A FIRST:LAST --slice-range must fit the query: checked before anything is built or written."""
    from .slice_range import check_slice_range, parse_slice_ranges
    from .slices import SlicePlan

    # structure names are checked by the pipeline, before its first encoder call
    for given in parse_slice_ranges(text).values():
        if given is not None and given != (0, -1):
            plan = SlicePlan.for_volume(query, axis)
            check_slice_range(given[0], given[1], plan.n_slices, plan.array_axis)


def check_output_dir(path: str, suffix: str) -> None:
    import os

    from .volume import check_name_length

    p = Path(path)
    check_name_length(p)
    if p.is_dir():
        raise InputError(f"{path}: is a folder; give a {suffix} file name")
    if p.suffix.lower() != suffix:
        raise InputError(f"{path}: expected a {suffix} file name")
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise InputError(f"cannot write {path}: folder {folder} is not writable")


def _is_out_of_memory(exc: BaseException) -> bool:
    """CUDA raises torch.OutOfMemoryError, numpy MemoryError; torch's CPU allocator and MPS a plain RuntimeError."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")  # nothing ran out of torch memory if torch was never imported
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in ("can't allocate memory", "out of memory"))


@contextlib.contextmanager
def out_of_memory_as_input_error(settings, written: str = "nothing was written") -> Iterator[None]:
    """Running out of memory (GPU or CPU) ends with one message naming what to change. `settings`: anything with
    image_size, batch_size and device (SegmentOptions, parsed arguments); `written`: what the user is left with."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise
        torch = sys.modules.get("torch")
        where = "GPU memory" if torch is not None and isinstance(exc, torch.OutOfMemoryError) else "memory"
        exc = None  # drop the frames holding the big tensors before freeing the cache
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
        cpu = "" if settings.device == "cpu" else ", or --device cpu"
        raise InputError(
            f"out of {where} (--image-size {settings.image_size}, --batch-size {settings.batch_size}, "
            f"--device {settings.device}); try a smaller --image-size or --batch-size, a --slice-range of the "
            f"query{cpu}{'; ' + written if written else ''}") from None


def build_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The command's parser. With `argv`, only the command named in it gets its options (the others only their
    one-line help): the parser is built without importing what the other commands need."""
    parser = argparse.ArgumentParser(
        prog="fewshotsam2",
        description="Few-shot 3D segmentation with SAM2, no training: segment a structure in a new scan from one "
                    "or a few labeled scans.",
        epilog="example: fewshotsam2 sample-data, then the example in `fewshotsam2 segment --help`; "
               "each command's --help gives one",
    )
    parser.add_argument("--version", action="version", version=f"fewshotsam2 {__version__}",
                        help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = None if argv is None else next((a for a in argv if a in COMMANDS), None)
    for name, (module_name, help_text, example) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if argv is not None and name != chosen:
            continue
        if module_name:
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:  # e.g. a research tool's optional dependency is missing
                p.set_defaults(func=_unavailable(name, exc))
                continue
            add_arguments, run = module.add_arguments, module.run
        else:
            add_arguments, run = add_segment_arguments, run_segment
        add_arguments(p)
        if example and not p.epilog:
            p.epilog = example
        p.set_defaults(func=run)
    return parser


def _unavailable(name: str, exc: ImportError):
    def run(args: argparse.Namespace) -> int:
        raise InputError(f"`{name}` is unavailable here: {exc}")

    return run


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: every temporary file is removed on the way out (see `main`)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def main(argv: Optional[Sequence[str]] = None, engine_factory: Optional[Callable] = None) -> int:
    """Run the command line. `engine_factory(options)` builds the SAM2 engine a command needs (default
    `pipeline.make_engine`); tests and embedding programs hand in their own, e.g. to reuse a loaded model."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # segment names and messages may be any Unicode; a C/ASCII locale must not turn a message into a traceback
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser(argv).parse_args(argv)
    args.engine_factory = engine_factory
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    # warnings are for people: one line each, no source lines
    warnings.formatwarning = lambda message, category, *rest: f"warning: {message}\n"
    # SIGTERM (kill, a job scheduler) unwinds like Ctrl-C, so writers remove their temporary files
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if _main_thread() else None
    try:
        if args.command != "segment" and all(hasattr(args, k) for k in ("image_size", "batch_size", "device")):
            # the other commands that run SAM2 (evaluate, bench, ...) keep what they wrote so far
            with out_of_memory_as_input_error(args, written=""):
                return args.func(args)
        return args.func(args)
    except OptionError as exc:  # the options name no flag; here they are flags
        print(f"fewshotsam2: error: {flag(exc.option)} {exc.problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except InputError as exc:
        print(f"fewshotsam2: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Cancelled:
        print("fewshotsam2: cancelled", file=sys.stderr)
        return 130
    except Terminated:
        print("fewshotsam2: terminated (SIGTERM); unfinished files were removed", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("fewshotsam2: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
