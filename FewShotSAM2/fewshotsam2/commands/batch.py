"""Segment a cohort: `fewshotsam2 batch` (a manifest CSV, or every scan in a folder from one set of supports).

One process builds the model once and encodes each support slice once for the whole cohort (the engine keeps
support features across queries, found again by pixel content). With `--ray` the cases go to Ray actors instead,
each holding one model and its own encoded supports (`batch_ray.py`, imported only then).

Manifest: a CSV with a header and the columns query, support_image, support_labels, labels, output. Several
supports in one row: `;`-separated paths in both support columns, pairwise. Relative paths are relative to the
manifest's folder (`output`: to --out-dir when given). Everything checkable is checked before any work: columns,
files, labels (supports are read), outputs; one bad row stops the batch with exit code 2 and a line naming it.

Resumable: each output this tool completes gets a hidden record beside it (`.NAME.fewshotsam2.json`: a hash of
the row's inputs (path, size, modification time) and options, and the output's size and SHA-256). A case is
skipped only when its output still matches the record made for this row with these inputs and options; any other
file at the output path (cut, foreign, older settings) is redone, with a note. --force redoes everything.
A case that fails (unreadable query, out of memory) is recorded with its error and the batch goes on. Exit code
0: every case ok or skipped; 1: some failed; 2: bad input (nothing done) or the summary cannot be written.

The summary (`batch_summary.csv`) goes to --out-dir, else the folder the outputs share (when that is one of the
outputs' folders or the manifest's); it is checked with the outputs before any work: never an input (the
manifest), never a folder the user did not name. Before the first case, temporaries that a killed run left in the
output folders (this package's `.tmp-XXXXXXXX` names, older than the run) are removed.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import sys
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from fewshotsam2 import settings
from fewshotsam2.errors import Cancelled, InputError, out_of_memory_as_input_error
from fewshotsam2.io.atomic import CannotWrite, disk_problem, stale_temporaries, write_text_atomic
from fewshotsam2.io.paths import check_name_length, input_path, refuse_overwriting_inputs
from fewshotsam2.options import check_overlap_output, options_from_args
from fewshotsam2.protocol import EXIT_OK, EXIT_SOME_FAILED
from fewshotsam2.slicing.slice_range import check_slice_range, parse_slice_ranges
from fewshotsam2.supports.label_selection import parse_label_selection

# Volumes, the Segmenter, torch, tqdm and Ray are imported inside the functions that run a cohort: the command line
# imports this module to build `batch --help`, which must answer at once without torch or SimpleITK
if TYPE_CHECKING:
    from fewshotsam2.supports.support_loader import SupportReader

MANIFEST_COLUMNS = ("query", "support_image", "support_labels", "labels", "output")
SUMMARY_NAME = "batch_summary.csv"
RECORD_SUFFIX = ".fewshotsam2.json"  # the completion record beside each output: .NAME.fewshotsam2.json
# options that change how a run goes, not what it writes: a resumed batch may change them
RUN_ONLY_OPTIONS = ("device", "batch_size", "cache_dir", "feature_storage")
STALE_AFTER_S = 60.0  # a temporary file untouched this long before the run started is a killed run's leftover
SUMMARY_COLUMNS = ("row", "case", "query", "output", "status", "seconds", "encoder_calls", "peak_memory_mb", "error",
                   "slice_ranges", "range_ends")
# what --queries picks up in a folder besides DICOM series sub-folders
QUERY_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
OUTPUT_FORMATS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".dcm")  # longest first: ".seg.nrrd" before ".nrrd"
# --out-format names besides the extensions: dicom-seg = .dcm (a DICOM SEG per DICOM query)
FORMAT_ALIASES = {"dicom-seg": ".dcm"}


@dataclass
class BatchCase:
    """One query to segment; paths absolute."""

    row: int  # manifest line (the header is line 1), or position in the folder
    query: str
    supports: list[tuple[str, str]]  # (image, labels) pairs
    labels: str  # the --labels selection, as written
    output: str
    where: str = ""  # how error messages name the case: "cohort.csv row 3", "--queries DIR: scan.nii.gz"

    @property
    def name(self) -> str:
        """The case's name in progress and summary: its output file name without the extension."""
        name = Path(self.output).name
        for ext in OUTPUT_FORMATS:
            if name.lower().endswith(ext):
                return name[: -len(ext)]
        return name


@dataclass
class CaseResult:
    row: int
    case: str
    query: str
    output: str
    status: str  # ok, skipped, failed
    seconds: float = 0.0
    encoder_calls: int = 0
    peak_memory_mb: float = 0.0
    error: str = ""
    # per structure its segmented range ("liver 12-47 (auto 12-40; continued to 47)", '; ' between structures),
    # and the range ends a prediction touched, as the warnings said them
    slice_ranges: str = ""
    range_ends: str = ""


# ---------------------------------------------------------------------------------------------- the cases


def read_manifest(path: str, out_dir: Optional[str], default_labels: Optional[str]) -> list[BatchCase]:
    """The manifest's cases, paths resolved; InputError naming the row for a bad column, cell or missing file."""
    manifest = Path(path)
    if manifest.is_dir():
        raise InputError(f"--manifest {manifest}: is a folder; give the manifest CSV file (for every scan in a "
                         "folder use --queries DIR)")
    if not manifest.is_file():
        raise InputError(f"{manifest}: manifest not found")
    base = manifest.resolve().parent
    out_base = Path(out_dir).resolve() if out_dir else base
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]  # (file line, cells)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{manifest}: cannot read the manifest ({e})") from None
    if not rows:
        raise InputError(f"{manifest}: the manifest is empty; expected a header with {', '.join(MANIFEST_COLUMNS)}")
    header = [c.strip().lower() for c in rows[0][1]]
    missing = [c for c in MANIFEST_COLUMNS if c not in header]
    unknown = [c for c in header if c not in MANIFEST_COLUMNS]
    if missing or unknown or len(set(header)) != len(header):
        problem = (f"missing column(s) {', '.join(missing)}" if missing else
                   f"unknown column(s) {', '.join(unknown)}" if unknown else "repeated column names")
        raise InputError(f"{manifest} header: {problem}; expected {', '.join(MANIFEST_COLUMNS)}")
    if len(rows) == 1:
        raise InputError(f"{manifest}: the manifest has a header and no cases")
    cases = []
    for line, cells in rows[1:]:
        where = f"{manifest.name} row {line}"
        if len(cells) != len(header):
            raise InputError(f"{where}: {len(cells)} cells for {len(header)} columns (quote cells that hold commas)")
        cell = {name: value.strip() for name, value in zip(header, cells)}
        for name in ("query", "support_image", "support_labels", "output"):
            if not cell[name]:
                raise InputError(f"{where}: the {name} cell is empty")
        images = [p.strip() for p in cell["support_image"].split(";")]
        label_maps = [p.strip() for p in cell["support_labels"].split(";")]
        if len(images) != len(label_maps) or not all(images) or not all(label_maps):
            raise InputError(f"{where}: {len(images)} support images for {len(label_maps)} support label maps; "
                             "give them pairwise, separated by ';'")
        labels_text = cell["labels"] or default_labels
        if not labels_text:
            raise InputError(f"{where}: the labels cell is empty and no --labels default was given")
        try:
            parse_label_selection(labels_text)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        cases.append(BatchCase(
            row=line,
            query=str(_resolve(cell["query"], base)),
            supports=[(str(_resolve(i, base)), str(_resolve(lab, base))) for i, lab in zip(images, label_maps)],
            labels=labels_text,
            output=str(_resolve(cell["output"], out_base)),
            where=where,
        ))
    _check_paths(cases, extra_inputs=[str(manifest)])
    return cases


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return (p if p.is_absolute() else base / p).absolute()


def _is_query_file(p: Path) -> bool:
    name = p.name.lower()
    return not name.startswith(".") and not name.endswith(".seg.nrrd") and name.endswith(QUERY_EXTENSIONS)


def cases_from_folder(folder: str, supports: list[tuple[str, str]], labels: str, out_dir: str,
                      out_format: str) -> list[BatchCase]:
    """One case per scan in `folder` (image files and DICOM series sub-folders), all with the same supports."""
    d = Path(folder)
    if not d.is_dir():
        raise InputError(f"--queries {folder}: no such folder")
    out_format = FORMAT_ALIASES.get(out_format, out_format)
    if out_format not in OUTPUT_FORMATS:
        raise InputError(f"--out-format {out_format}: choose one of {', '.join(OUTPUT_FORMATS)}")
    support_paths = {Path(p).resolve() for pair in supports for p in pair}
    out = Path(out_dir).resolve()
    queries, ours, not_dicom = [], [], []
    for p in sorted(d.iterdir()):
        if p.resolve() in support_paths or p.name.startswith("."):
            continue
        if p.is_dir():
            real = p.resolve()
            if real == out or _inside(str(out), str(real)):
                ours.append(p.name + "/")  # the output folder (or one holding it): this tool's own files
            elif not _holds_dicom(p):
                not_dicom.append(p.name + "/")
            else:
                queries.append(p)
        elif _is_query_file(p):
            if record_path(p).is_file():
                ours.append(p.name)  # written by this tool (an earlier run with --out-dir inside DIR)
            else:
                queries.append(p)
    if ours or not_dicom:
        skipped = ([f"this tool's own outputs {', '.join(ours[:5])}"] if ours else []) + (
            [f"folders without DICOM files {', '.join(not_dicom[:5])}"] if not_dicom else [])
        warnings.warn(f"--queries {folder}: skipped {' and '.join(skipped)}", stacklevel=2)
    if not queries:
        if _holds_dicom(d):
            raise InputError(f"--queries {folder}: is itself a DICOM series folder; --queries takes the folder that "
                             "holds the scans (files or one folder per series); for one series use segment --query")
        raise InputError(f"--queries {folder}: no scans found ({', '.join(QUERY_EXTENSIONS)} files or DICOM folders)")
    parse_label_selection(labels)
    cases = []
    for i, q in enumerate(queries, start=1):
        stem = q.name
        for ext in QUERY_EXTENSIONS:
            if stem.lower().endswith(ext):
                stem = stem[: -len(ext)]
                break
        cases.append(BatchCase(i, str(q.absolute()), [(str(Path(a).absolute()), str(Path(b).absolute()))
                                                      for a, b in supports],
                               labels, str(out / f"{stem}{out_format}"), f"--queries {folder}: {q.name}"))
    _check_paths(cases)
    return cases


def _inside(child: str, folder: str) -> bool:
    return child != folder and os.path.commonpath([child, folder]) == folder


def _holds_dicom(folder: Path) -> bool:
    """Whether GDCM finds a DICOM series in `folder` (a notes or results folder holds none)."""
    import SimpleITK as sitk

    from fewshotsam2.io.volume import _stderr_captured

    with _stderr_captured():  # GDCM complains on stderr about every file that is not DICOM
        try:
            return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
        except RuntimeError:
            return False


def _check_paths(cases: list[BatchCase], extra_inputs: Optional[list[str]] = None) -> None:
    """Inputs exist; outputs have a known format, a name the file system takes, a folder that exists or can be
    made, one case each, and are none of the inputs (the row's own, by `paths.refuse_overwriting_inputs`; every
    row's and the manifest's, by resolved path: one set, so that a thousand-row manifest is not checked
    pairwise)."""
    from fewshotsam2.io.volume import _output_extension

    inputs = {os.path.realpath(p): f"the manifest {p}" for p in extra_inputs or []}
    for c in cases:
        for p in [c.query] + [p for pair in c.supports for p in pair]:
            inputs.setdefault(os.path.realpath(input_path(p)), c.where)
    seen: dict[str, str] = {}
    for c in cases:
        where = c.where
        for what, p in [("query", c.query)] + [(k, p) for pair in c.supports
                                               for k, p in zip(("support image", "support labels"), pair)]:
            if not os.path.exists(input_path(p)):  # input_path: a DICOM "FOLDER#N" names its folder
                raise InputError(f"{where}: {what} {p} does not exist")
        if _output_extension(c.output) is None:
            raise InputError(f"{where}: output {c.output}: unknown format; use one of {', '.join(OUTPUT_FORMATS)}")
        if _output_extension(c.output) == ".dcm" and not os.path.isdir(input_path(c.query)):
            raise InputError(f"{where}: output {c.output}: a DICOM SEG needs a DICOM series as the query; {c.query} "
                             "is not a DICOM folder")
        try:
            check_name_length(c.output)
        except InputError as e:
            raise InputError(f"{where}: output {e}") from None
        try:
            refuse_overwriting_inputs([("output", c.output)], [c.query, *(p for pair in c.supports for p in pair)])
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        real = os.path.realpath(c.output)
        if real in inputs:
            raise InputError(f"{where}: output {c.output} is an input ({inputs[real]}); it would be overwritten")
        if os.path.isdir(c.output):
            raise InputError(f"{where}: output {c.output} is a folder; give a file name")
        if real in seen:
            raise InputError(f"{where}: output {c.output} is also the output of {seen[real]}")
        seen[real] = c.where
        folder = Path(c.output).parent
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise InputError(f"{where}: cannot write {c.output}: {folder} is not a writable folder")


def check_supports(cases: list[BatchCase]) -> "SupportReader":
    """Read every distinct support once and load each row's structures with the one support rule
    (support_loader.py); an InputError names the row. Returns the reader, which keeps what it read."""
    from fewshotsam2.supports.support_loader import SupportReader

    reader = SupportReader()
    checked: set[tuple] = set()  # (supports, selection): a cohort repeats them
    for c in cases:
        key = (tuple(c.supports), c.labels)
        if key in checked:
            continue
        try:
            reader.load(c.supports, c.labels)
        except InputError as e:
            raise InputError(f"{c.where}: {e}") from None
        checked.add(key)
    return reader


def check_slice_ranges(cases: list[BatchCase], slice_range: str, axis: str) -> None:
    """A FIRST:LAST --slice-range must fit every query (read from its header): checked with the manifest, not
    after the model is built."""
    from fewshotsam2.slicing.slices import SlicePlan
    from fewshotsam2.io.volume import read_volume_header

    given = [(r.first, r.last) for r in parse_slice_ranges(slice_range).values() if r.kind == "range"]
    if not given:
        return
    for c in cases:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the oblique warning comes again, once, when the case runs
                plan = SlicePlan.for_volume(read_volume_header(c.query), axis)
            for first, last in given:
                check_slice_range(first, last, plan.n_slices, plan.array_axis)
        except InputError as e:
            raise InputError(f"{c.where}: {e}") from None


def record_path(output) -> Path:
    """The hidden completion record beside an output: `.NAME.fewshotsam2.json`."""
    p = Path(output)
    return p.with_name(f".{p.name}{RECORD_SUFFIX}")


def _fingerprint(path: str) -> list:
    """What identifies an input without reading it: its resolved path, size and modification time (every file of
    a DICOM folder)."""
    real = os.path.realpath(input_path(path))
    try:
        if os.path.isdir(real):
            entries = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(real) if e.is_file())
        else:
            st = os.stat(real)
            entries = [st.st_size, st.st_mtime_ns]
    except OSError:
        entries = []
    return [os.fspath(path), real, entries]


def case_key(case: BatchCase, options) -> str:
    """A hash of what decides a case's output: its inputs, its labels and the options that change the result."""
    flat = {k: v for k, v in options.to_flat().items() if k not in RUN_ONLY_OPTIONS}
    text = json.dumps({"query": _fingerprint(case.query),
                       "supports": [[_fingerprint(a), _fingerprint(b)] for a, b in case.supports],
                       "labels": case.labels, "options": flat}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def write_record(case: BatchCase, key: str) -> None:
    """Record that this tool completed `case`'s output for these inputs and options (after the output's rename)."""
    record = {"tool": "fewshotsam2", "row": case.where, "key": key, "size": os.path.getsize(case.output),
              "sha256": _sha256(case.output)}
    write_text_atomic(record_path(case.output), json.dumps(record) + "\n")


def resume_state(case: BatchCase, key: str) -> tuple[bool, str]:
    """(done, why not): done when the output exists and matches this tool's record for these inputs and options;
    `why not` is said only when a file is at the output path (it is redone)."""
    out = case.output
    if not os.path.lexists(out):
        return False, ""
    try:
        with open(record_path(out), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return False, f"{out} exists but was not completed by this tool (no record)"
    if not isinstance(record, dict) or record.get("key") != key:
        return False, f"{out} was made from other inputs or options"
    try:
        if os.path.getsize(out) != record.get("size") or _sha256(out) != record.get("sha256"):
            return False, f"{out} changed since this tool wrote it (size or checksum)"
    except OSError as e:
        return False, f"{out} cannot be read ({e.strerror})"
    return True, ""


# ---------------------------------------------------------------------------------------------- running one case


class PeakMemory:
    """Peak memory of one case, in MB: CUDA's peak allocation on a GPU, else the process's peak resident set
    (sampled every 20 ms; where /proc is missing, the process's lifetime peak)."""

    def __init__(self, device) -> None:
        self.device = device
        self.mb = 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        elif os.path.exists("/proc/self/statm"):
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _rss_mb(self) -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _sample(self) -> None:
        while True:
            self.mb = max(self.mb, self._rss_mb())
            if self._stop.wait(0.02):
                return

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            import torch

            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            import resource  # Unix only

            self.mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _is_support_frame(key) -> bool:
    # frame keys are the pipeline's: ("query", i) for the query, ("support", ...) / ("lpips-support", ...) else
    return not (isinstance(key, tuple) and key and key[0] == "query")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, InputError) else f"{type(exc).__name__}: {text}"


class CaseRunner:
    """One model and the supports read so far; runs cases one after the other (locally, or inside a Ray actor)."""

    def __init__(self, options, supports: Optional["SupportReader"] = None, engine=None) -> None:
        from fewshotsam2.run.segmenter import Segmenter
        from fewshotsam2.supports.support_loader import SupportReader

        self.options = options
        self.segmenter = Segmenter(options, engine=engine)
        # the batch's reason to exist: support slices are encoded for the first query only
        self.engine.keep_features(_is_support_frame)
        self.supports = supports or SupportReader()

    @property
    def engine(self):
        return self.segmenter.engine

    def run(self, case: BatchCase, progress: Optional[Callable[[str, int, int], None]] = None) -> CaseResult:
        """Segment one case and write its output atomically; errors become a failed result, never an exception
        (except cancellation, Ctrl-C and SIGTERM)."""
        from fewshotsam2.io.volume import write_labels

        result = CaseResult(case.row, case.name, case.query, case.output, "failed")
        t0 = time.perf_counter()
        self.engine.reset()  # segment() resets too; this one makes a case that fails early count 0 encoder calls
        peak = PeakMemory(self.engine.device)
        try:
            with peak, out_of_memory_as_input_error(self.options):
                if case.output.lower().endswith(".dcm"):  # DICOM SEG: the query must be a DICOM series
                    from fewshotsam2.io.dicom_seg import check_query as check_seg_query

                    check_seg_query(case.query)
                query, supports, structures = self.segmenter.read_inputs(case.query, case.supports, case.labels,
                                                                         self.supports)
                seg = self.segmenter.segment(query, supports, structures, progress)
                os.makedirs(Path(case.output).parent, exist_ok=True)
                write_labels(case.output, seg.labels, seg.structures, source=case.query,
                             method=self.options.method, model=self.options.model)
            result.status = "ok"
            result.encoder_calls = seg.encoder_calls
            reports = seg.range_reports.values()
            result.slice_ranges = "; ".join(r.summary() for r in reports)
            result.range_ends = "; ".join(f"{r.structure}: {e.describe()}" for r in reports for e in r.ends)
        except (Cancelled, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001  one case's failure must not stop the cohort
            result.error = _one_line(exc)
            result.encoder_calls = self.engine.encoder_calls
            if not isinstance(exc, InputError):
                logging.getLogger(__name__).info("case %s failed:\n%s", case.name, traceback.format_exc())
        result.seconds = time.perf_counter() - t0
        result.peak_memory_mb = peak.mb
        return result


# ---------------------------------------------------------------------------------------------- summary


def write_summary(path: str, results: list[CaseResult]) -> None:
    """The per-case summary CSV, atomically (rewritten after every case, so a crash keeps what was done); it
    follows the umask like every other output. A failed write (a full disk) is an InputError: exit code 2."""
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(SUMMARY_COLUMNS)
    for r in sorted(results, key=lambda r: r.row):
        d = asdict(r)
        d["seconds"] = f"{r.seconds:.2f}"
        d["peak_memory_mb"] = f"{r.peak_memory_mb:.0f}"
        w.writerow([d[c] for c in SUMMARY_COLUMNS])
    folder = os.path.dirname(os.path.abspath(path))
    try:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise CannotWrite(path, disk_problem(e, folder)) from None
        write_text_atomic(path, f.getvalue())
    except CannotWrite as e:
        done = sum(r.status == "ok" for r in results)
        raise InputError(f"cannot write the batch summary {path} ({e.reason}); the batch stopped; "
                         f"the {done} output(s) written so far are complete and resume") from None


def summary_location(cases: list[BatchCase], out_dir: Optional[str], manifest: Optional[str]) -> str:
    """Where the summary goes, checked before any work: --out-dir, else the folder the outputs share when the user
    named it (one of the outputs' folders, or the manifest's folder or one inside it); never an input, never a
    case's output, never a folder that cannot be written."""
    if out_dir:
        folder = os.path.abspath(out_dir)
    else:
        parents = {os.path.realpath(os.path.dirname(c.output)) for c in cases}
        folder = os.path.commonpath(sorted(parents))
        base = os.path.realpath(os.path.dirname(os.path.abspath(manifest))) if manifest else None
        if folder not in parents and not (base and (folder == base or _inside(folder, base))):
            shown = ", ".join(sorted(parents)[:2])
            raise InputError(f"the outputs lie in different folders ({shown}, ...) whose only common folder is "
                             f"{folder}; give --out-dir DIR for the batch summary ({SUMMARY_NAME})")
    path = os.path.join(folder, SUMMARY_NAME)
    real = os.path.realpath(path)
    inputs = ([manifest] if manifest else []) + [p for c in cases for p in [c.query, *(q for s in c.supports
                                                                                      for q in s)]]
    for p in inputs:
        if os.path.realpath(input_path(p)) == real:
            raise InputError(f"the batch summary {path} would replace the input {p}; give --out-dir another folder "
                             "(or rename the input)")
    if real in {os.path.realpath(c.output) for c in cases}:
        raise InputError(f"{path}: the summary would overwrite a case's output")
    if os.path.isdir(path):
        raise InputError(f"the batch summary {path} is a folder; give --out-dir another folder")
    existing = Path(folder)
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write the batch summary {path}: {existing} is not a writable folder; "
                         "give --out-dir another folder")
    return path


def read_summary(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  fewshotsam2 batch --manifest cohort.csv --out-dir out\n"
        "  fewshotsam2 batch --queries scans/ --support ct-a/image.nii.gz ct-a/labels.nii.gz --labels 1,5 "
        "--out-dir out\n"
        "  fewshotsam2 batch --manifest cohort.csv --ray local --workers 2\n"
        "manifest columns: query,support_image,support_labels,labels,output (several supports: ';' between paths)"
    )
    src = parser.add_argument_group("cases (one of --manifest or --queries)")
    what = src.add_mutually_exclusive_group(required=True)
    what.add_argument("--manifest", metavar="CSV",
                      help="CSV with columns query, support_image, support_labels, labels, output; relative paths "
                           "are relative to the manifest")
    what.add_argument("--queries", metavar="DIR",
                      help="segment every scan in DIR (image files and DICOM series folders) from the --support(s)")
    src.add_argument("--support", nargs=2, action="append", metavar=("IMAGE", "LABELS"),
                     help="with --queries: a labeled support for every scan; repeat for several supports")
    src.add_argument("--labels", metavar="L1,L2",
                     help="structures to segment (as for segment): for --queries, and for manifest rows whose "
                          "labels cell is empty")
    src.add_argument("--out-dir", metavar="DIR",
                     help="where outputs with relative paths and the summary go (default: outputs relative to the "
                          "manifest, summary in their common folder; required with --queries); created if missing")
    src.add_argument("--out-format", default=".nii.gz", choices=OUTPUT_FORMATS[::-1] + tuple(FORMAT_ALIASES),
                     help="with --queries: output format (default .nii.gz); .dcm or dicom-seg = a DICOM SEG per "
                          "DICOM series query (needs highdicom)")
    src.add_argument("--force", action="store_true", help="redo cases whose output already exists")
    settings.add_arguments(parser, only=("method",))
    settings.add_arguments(parser, groups=("slices", "reverse", "lpips", "model"))
    dist = parser.add_argument_group("distribution (optional, needs: pip install 'fewshotsam2[ray]')")
    dist.add_argument("--ray", metavar="ADDRESS",
                      help="run the cases on a Ray cluster: 'local' starts one on this machine, otherwise a "
                           "cluster address (e.g. auto, ray://head:10001); paths must be valid on every node")
    dist.add_argument("--workers", type=int, metavar="N",
                      help="with --ray: Ray actors, each holding one model (default: one per GPU, else one per "
                           "4 CPUs)")
    dist.add_argument("--retries", type=int, default=2, metavar="N",
                      help="with --ray: times Ray restarts a lost worker and retries its case (default 2)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _cases(args: argparse.Namespace) -> tuple[list[BatchCase], Optional[str]]:
    """(cases, --out-dir: where the summary goes, None for a manifest without one)."""
    if args.manifest:
        if args.support:
            raise InputError("--support belongs to --queries; a manifest names its supports in its rows")
        # the summary goes to --out-dir, else next to the outputs (`summary_location`)
        return read_manifest(args.manifest, args.out_dir, args.labels), args.out_dir
    if not args.support:
        raise InputError("--queries needs at least one --support IMAGE LABELS")
    if not args.labels:
        raise InputError("--queries needs --labels")
    if not args.out_dir:
        raise InputError("--queries needs --out-dir (where the outputs go)")
    return cases_from_folder(args.queries, args.support, args.labels, args.out_dir, args.out_format), args.out_dir


def run(args: argparse.Namespace) -> int:
    options = options_from_args(args)  # checks every option value
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be at least 1, got {args.workers}")
    if args.workers is not None and not args.ray:
        raise InputError("--workers needs --ray (a local batch runs one model in this process)")
    if args.retries < 0:
        raise InputError(f"--retries must be 0 or more, got {args.retries}")
    if args.ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise InputError("--ray needs Ray, which is not installed: pip install 'fewshotsam2[ray]' "
                             "(or pip install ray)") from None
    cases, out_dir = _cases(args)
    for c in cases:  # --overlap allow: every output a layered .seg.nrrd, or nothing runs
        check_overlap_output(options.overlap, c.output, f"{c.where}: output")
    summary_path = summary_location(cases, out_dir, args.manifest)
    check_slice_ranges(cases, options.slice_range, options.axis)
    supports = check_supports(cases)
    options = _check_model_files(options)
    # checked: from here on, work (folders are made when the first file goes into them)
    started = time.time()
    _remove_stale_temporaries([os.path.dirname(c.output) for c in cases] + [os.path.dirname(summary_path)],
                              started - STALE_AFTER_S)
    results: dict[int, CaseResult] = {}
    todo = []
    keys = {c.row: case_key(c, options) for c in cases}
    for c in cases:
        done, why = (False, "") if args.force else resume_state(c, keys[c.row])
        if done:
            results[c.row] = CaseResult(c.row, c.name, c.query, c.output, "skipped")
        else:
            if why:
                print(f"fewshotsam2: {c.where}: {why}; it is redone", file=sys.stderr)
            todo.append(c)
    t0 = time.perf_counter()
    if todo:
        if args.ray:
            from fewshotsam2.commands import batch_ray

            run_cases = batch_ray.run_cases
            kwargs = dict(address=args.ray, workers=args.workers, retries=args.retries)
        else:
            run_cases = run_cases_locally
            kwargs = dict(supports=supports, engine_factory=getattr(args, "engine_factory", None))

        by_row = {c.row: c for c in todo}

        def record(r: CaseResult) -> None:
            results[r.row] = r
            if r.status == "ok":
                try:
                    write_record(by_row[r.row], keys[r.row])
                except (CannotWrite, OSError) as e:  # the output is complete; without its record a re-run redoes it
                    reason = e.reason if isinstance(e, CannotWrite) else e.strerror
                    raise InputError(f"cannot write the completion record of {r.output} ({reason}); the batch "
                                     "stopped") from None
            write_summary(summary_path, list(results.values()))

        run_cases(todo, options, record=record, quiet=args.quiet, **kwargs)
    write_summary(summary_path, list(results.values()))
    counts = {s: sum(r.status == s for r in results.values()) for s in ("ok", "skipped", "failed")}
    wall = time.perf_counter() - t0
    calls = sum(r.encoder_calls for r in results.values())
    print(f"batch: {len(cases)} cases: {counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed "
          f"in {wall:.1f} s ({calls} slices encoded); summary {summary_path}")
    for r in sorted(results.values(), key=lambda r: r.row):
        if r.status == "failed":
            print(f"fewshotsam2: case {r.case} (row {r.row}) failed: {r.error}", file=sys.stderr)
    return EXIT_SOME_FAILED if counts["failed"] else EXIT_OK


def _remove_stale_temporaries(folders: list[str], older_than: float) -> None:
    """Remove what a killed run left in the output folders (this package's temporary names only), and say so."""
    for folder in sorted(set(folders)):
        stale = stale_temporaries(folder, older_than)
        removed = 0
        for p in stale:
            try:
                p.unlink()
                removed += 1
            except OSError:
                pass
        if removed:
            print(f"fewshotsam2: removed {removed} temporary file(s) an interrupted run left in {folder}",
                  file=sys.stderr)


def _check_model_files(options):
    """As `segment` does before any work (`Segmenter.check_model_files`). Returns the options to run with:
    `--slice-range auto` without loadable AlexNet weights becomes "off" once for the cohort (one warning),
    instead of a failed load and a warning in every case."""
    from fewshotsam2.run.segmenter import Segmenter

    Segmenter(options).check_model_files()
    if options.slice_range == "auto":
        from fewshotsam2.model.device import pick_device
        from fewshotsam2.matching.lpips_distance import shared_lpips

        weights = options.extent_weights or getattr(options.method_options, "weights", None)
        try:
            shared_lpips("alex", weights, str(pick_device(options.device)))  # loaded once, shared by the cases
        except InputError as exc:
            if weights:  # weights the user named must work
                raise
            warnings.warn(f"slice range estimation is off for the whole batch, every slice is segmented: {exc}",
                          stacklevel=2)
            options = dataclasses.replace(options, slice_range="off")
    return options


def run_cases_locally(cases: list[BatchCase], options, record: Callable[[CaseResult], None], quiet: bool = False,
                      supports: Optional["SupportReader"] = None, engine_factory: Optional[Callable] = None) -> None:
    """One model in this process; the supports read during the checks; a tqdm bar over cases with the stage."""
    from tqdm import tqdm

    bar = tqdm(total=len(cases), unit="case", desc="batch", file=sys.stderr, disable=quiet, dynamic_ncols=True)
    try:
        bar.set_postfix_str("building the model")
        runner = CaseRunner(options, supports, engine_factory(options) if engine_factory else None)
    except BaseException:
        bar.close()
        raise
    try:
        for case in cases:
            def stage(text: str, done: int, total: int, _name=case.name) -> None:
                bar.set_postfix_str(f"{_name}: {text}", refresh=False)
                bar.refresh()

            stage("reading", 0, 1)
            result = runner.run(case, progress=stage)
            record(result)
            bar.update(1)
    finally:
        bar.close()
        runner.engine.keep_features(None)  # an engine handed in (engine_factory) may serve other work next
