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
import threading
import warnings
from typing import Callable, Iterator, Optional, Sequence

from fewshotsam2 import __version__
from fewshotsam2 import settings
from fewshotsam2.environment import check_environment
from fewshotsam2.errors import Cancelled, InputError, out_of_memory_as_input_error
from fewshotsam2.io.paths import dash_path_hint
from fewshotsam2.supports.label_selection import SYNTAX_HELP as _LABELS_HELP
from fewshotsam2.options import OptionError
from fewshotsam2.run.progress import run_output
from fewshotsam2.protocol import EXIT_BAD_INPUT, EXIT_CANCELLED, ERROR_PREFIX
from fewshotsam2.options import options_from_args  # noqa: F401  (public)
from fewshotsam2.settings import flag  # noqa: F401  (public: flag names)

# command -> (module exposing add_arguments(parser) and run(args) -> int, one-line help, example invocations).
# A command's module is imported only when that command runs or its --help is asked: `fewshotsam2 --help` and
# every `COMMAND --help` answer at once, with no torch import. For the same reason `segment` imports the Segmenter
# (torch), the server client and refine's feature-cache helpers inside the functions that use them.
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
    "refine": (
        "fewshotsam2.commands.refine_command", "refine a segmentation from the slices the user corrected (re-propagate)", ""),
    "extent": (
        "fewshotsam2.commands.extent_command", "print each structure's slice range in the query, estimated from supports",
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
        "fewshotsam2.commands.batch", "segment a cohort (manifest CSV or folder): one model, supports encoded once", ""),
    "sample-data": (
        "fewshotsam2.io.sample_data", "fetch, verify and cache the demo data (abdomen-ct pair)", ""),
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

def add_segment_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Segment the structures chosen with --labels in the query volume, prompting SAM2 with "
                     "labeled slices of the support volume(s). Writes one multi-label map on the query's grid.")
    # `--server URL --attach JOB --out F` fetches a job submitted earlier: its inputs are on the server already
    argv = sys.argv[1:] if _Parser.argv is None else _Parser.argv
    inputs_needed = not any(a == "--attach" or a.startswith("--attach=") for a in argv)
    p.add_argument("--query", required=inputs_needed, metavar="Q",
                   help="the volume to segment: NIfTI/NRRD/MHA file or DICOM series folder (FOLDER#N or "
                        "FOLDER#SERIES_UID picks one series of a folder holding several)")
    p.add_argument("--support", required=inputs_needed, nargs=2, action="append", metavar=("IMAGE", "LABELS"),
                   help="a labeled support: image (file or DICOM folder) and its labels (label map or .seg.nrrd, "
                        "aligned to the image by physical geometry); repeat for several supports")
    p.add_argument("--labels", required=inputs_needed, metavar="L1,L2",
                   help="structures to segment: " + _LABELS_HELP.replace("%", "%%")
                        + "; a digit-only name that is also another segment's value is refused as ambiguous")
    p.add_argument("--out", required=True, metavar="OUT",
                   help="output label map: .nii.gz, .nii, .nrrd or .seg.nrrd (segment names and colours), or .dcm: a "
                        "DICOM SEG referencing the query's DICOM series (for PACS; needs highdicom)")
    settings.add_arguments(p, only=("method",))
    p.add_argument("--scores", metavar="FILE.csv",
                   help="write per-slice scores (structure, slice index, score, selected, matched support)")
    settings.add_arguments(p, groups=("slices", "reverse", "lpips", "model"))
    from fewshotsam2.commands.refine_command import add_cache_arguments  # the features a later `refine` reads

    add_cache_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--progress", default="bar", choices=("bar", "json"),
                   help="bar = a progress bar on stderr (default); json = machine-readable lines on stdout, one "
                        "JSON object each: progress (stage, done, total), warning (message), done (device, seconds)")
    s = p.add_argument_group("remote (a `fewshotsam2 serve` server)")
    s.add_argument("--server", metavar="URL", help="run the job on this server (https://host:port) instead of here: "
                   "the same outputs and exit codes; inputs are uploaded, the outputs downloaded")
    s.add_argument("--token-file", metavar="F", help="with --server: the file holding this client's token "
                   "(else $FEWSHOTSAM2_SERVER_TOKEN)")
    s.add_argument("--attach", metavar="JOB", help="with --server: follow and fetch the job JOB that this token "
                   "submitted before (its id is printed at submission, and is the `submitted` event of --progress "
                   "json), e.g. after the client that submitted it was killed; give --out (and --scores if the job "
                   "has them), not --query/--support/--labels")


def run_segment(args: argparse.Namespace) -> int:
    """`segment`: the Segmenter on the given files; the result summary on stdout (or as the JSON `done` line).
    With --server the same job runs on a `fewshotsam2 serve` server (serve/client.py)."""
    if getattr(args, "attach", None) and not getattr(args, "server", None):
        raise InputError("--attach needs --server (the server that runs the job)")
    if getattr(args, "server", None):
        from fewshotsam2.serve.client import attach_remote, run_remote

        return attach_remote(args) if args.attach else run_remote(args)
    from fewshotsam2.run.segmenter import Segmenter

    from fewshotsam2.commands.refine_command import CachedEngineFactory, feature_cache_of

    options = options_from_args(args)
    # the engine fills the feature cache during this run only; a bad --feature-cache folder fails here
    with_cache = CachedEngineFactory(getattr(args, "engine_factory", None), feature_cache_of(args))
    with _run_output(args) as (events, progress):
        notify = None if events is not None or args.quiet else (lambda text: print(text, file=sys.stderr))
        segmenter = Segmenter(options, engine_factory=with_cache, notify=notify)
        try:
            result = segmenter.segment_files(args.query, [tuple(p) for p in args.support], args.labels, out=args.out,
                                             scores=args.scores, progress=progress)
        finally:
            with_cache.restore()
        voxels = result.voxels()
        if events is not None:
            events.done(out=str(args.out), device=str(getattr(segmenter.engine, "device", "")),
                        seconds=result.timings["total"], slice_axis=int(result.slice_axis),
                        encoder_calls=int(result.encoder_calls),
                        cache_hits=int(getattr(segmenter.engine, "cache_hits", 0)), voxels=voxels,
                        slice_ranges={s.name: result.slice_ranges.get(s.value) for s in result.structures},
                        range_reports=[r.to_json() for r in result.range_reports.values()])
            return 0
    for s in result.structures:
        r = result.slice_ranges.get(s.value)
        report = result.range_reports.get(s.value)
        ends = "".join(f"; {e.describe()}" for e in report.ends) if report is not None else ""
        print(f"{s.name}: segmented slices {r[0]}-{r[1]} along array axis {result.slice_axis}{ends}" if r is not None
              else f"{s.name}: empty slice range, not segmented")
    counts = ", ".join(f"{name}: {n} voxels" for name, n in voxels.items())
    print(f"wrote {args.out} ({counts}; {result.encoder_calls} slices encoded, {result.timings['total']:.1f} s)")
    return 0


def _run_output(args: argparse.Namespace):
    return run_output(getattr(args, "progress", "bar"), args.quiet)


class _Parser(argparse.ArgumentParser):
    """argparse's parser; its usage errors also say how to give a path that starts with '-'."""

    argv: Optional[Sequence[str]] = None

    def error(self, message: str):  # type: ignore[override]
        super().error(message + dash_path_hint(sys.argv[1:] if _Parser.argv is None else _Parser.argv))


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
    _Parser.argv = argv
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
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
    """Run the command line; returns the exit code (protocol.py). `engine_factory(options)` builds the SAM2 engine
    a command needs (default `pipeline.make_engine`); tests and embedding programs hand in their own, e.g. to
    reuse a loaded model. What it changes for the run (stream error handling, warning format, logging, the
    SIGTERM handler) is restored before it returns."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with _command_environment():
        args = build_parser(argv).parse_args(argv)  # --help, --version and usage errors exit here (argparse)
        args.engine_factory = engine_factory
        _log_handler.setLevel(logging.INFO if args.verbose else logging.WARNING)
        try:
            return _dispatch(args)
        except OptionError as exc:  # the options name no flag; here they are flags
            print(f"{ERROR_PREFIX} {flag(exc.option)} {exc.problem}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except InputError as exc:
            print(f"{ERROR_PREFIX} {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except Cancelled as exc:
            print(f"fewshotsam2: cancelled{': ' + str(exc) if str(exc) else ''}", file=sys.stderr)
            return EXIT_CANCELLED
        except Terminated:
            print("fewshotsam2: terminated (SIGTERM); unfinished files were removed", file=sys.stderr)
            return 128 + signal.SIGTERM
        except KeyboardInterrupt:
            print("fewshotsam2: interrupted", file=sys.stderr)
            return EXIT_CANCELLED


def _dispatch(args: argparse.Namespace) -> int:
    check_environment()  # every environment variable the tool reads, before any work
    if args.command != "segment" and all(hasattr(args, k) for k in ("image_size", "batch_size", "device")):
        # the other commands that run SAM2 (evaluate, bench, ...) keep what they wrote so far
        with out_of_memory_as_input_error(args, written=""):
            return args.func(args)
    return args.func(args)


_log_handler = logging.StreamHandler()
_log_handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))


@contextlib.contextmanager
def _command_environment() -> Iterator[None]:
    """What one command needs around it, undone afterwards: messages in any Unicode on any locale, warnings as one
    line each, the package's log lines on stderr, SIGTERM unwinding like Ctrl-C (so writers remove their
    temporary files)."""
    streams = [(s, s.errors) for s in (sys.stdout, sys.stderr) if hasattr(s, "reconfigure")]
    for stream, _ in streams:  # a C/ASCII locale must not turn a message into a traceback
        stream.reconfigure(errors="backslashreplace")
    package_log = logging.getLogger("fewshotsam2")
    package_log.addHandler(_log_handler)
    level = package_log.level
    package_log.setLevel(logging.DEBUG)  # the handler's level decides (-v)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        yield
    finally:
        warnings.formatwarning = formatwarning
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        package_log.removeHandler(_log_handler)
        package_log.setLevel(level)
        for stream, errors in streams:
            stream.reconfigure(errors=errors)


def _one_line_warning(message, category, *rest) -> str:
    """Warnings are for people: one line each, no source lines."""
    return f"warning: {message}\n"


if __name__ == "__main__":
    sys.exit(main())
