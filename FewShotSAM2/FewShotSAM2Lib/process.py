"""Run one segmentation in its own process: the core's command line, started with Slicer's Python.

Why a process and not a thread: Slicer never enables PythonQt's thread support, so a Python worker thread only
advances while main-thread Python runs (2.7x slower measured), torch would stay resident in Slicer with the model
on the GPU, and a thread cannot be killed. A process runs at full speed, frees everything when it ends and is
killed at once on Cancel.

The job folder (a fresh temporary folder) holds the inputs as NRRD files with their exact geometry, the result,
the per-slice scores and the process's output. `--progress json` makes the core print one JSON object per line;
stdout goes to a file (not a pipe, which could fill up and stall the process while Slicer is busy) that `poll`
reads incrementally. No MRML, no Qt, no torch here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from fewshotsam2 import protocol, settings  # pure Python: the process table and the settings table

from . import windows_job

QUERY_FILE = "query.nrrd"
RESULT_FILE = "result.nrrd"
# --overlap allow: overlapping structures in separate layers, which only a .seg.nrrd holds
LAYERED_RESULT_FILE = "result.seg.nrrd"
SCORES_FILE = "scores.csv"
PROGRESS_FILE = "progress.jsonl"
STDERR_FILE = "stderr.txt"
REMOTE_CANCEL_S = 5.0  # how long Cancel waits for a remote run to cancel its server job before killing it
EXIT_BAD_INPUT = protocol.EXIT_BAD_INPUT
EXTENT_OPTIONS = settings.EXTENT_SETTINGS  # the Logic options `extent` takes
KILL_WAIT_S = 10  # longest wait for a killed process to be gone
REMOVE_ATTEMPTS = 6  # tries to remove a job folder (about 4 s in all)


def coreFolder() -> Path:
    """The folder that holds the `fewshotsam2` package shipped with the module (FewShotSAM2/)."""
    return Path(__file__).resolve().parents[1]


def pythonExecutable() -> str:
    """Slicer's Python launcher (PythonSlicer sets up Slicer's environment), else this interpreter.

    In the Slicer application PythonSlicer is on PATH (as slicer.util._executePythonModule relies on); from
    PythonSlicer itself it sits beside sys.executable; outside Slicer (tests, slicer-core) sys.executable is used.
    """
    found = shutil.which("PythonSlicer")
    if found:
        return found
    beside = Path(sys.executable).with_name("PythonSlicer.exe" if os.name == "nt" else "PythonSlicer")
    if beside.is_file():
        return str(beside)
    return sys.executable


def coreEnvironment() -> dict:
    """The environment of a core process: Slicer's own, with the module's fewshotsam2 first on the path."""
    env = dict(os.environ)
    core = str(coreFolder())
    env["PYTHONPATH"] = core + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    # the progress lines and error messages are read as UTF-8; on Windows Python would write the ANSI code page
    env["PYTHONIOENCODING"] = "utf-8"
    # Apple GPUs: operators MPS lacks run on the CPU instead of failing (the user can still set it to 0)
    env.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    env.pop("PYTHONSTARTUP", None)
    return env


def coreMismatch() -> Optional[str]:
    """Why Slicer's process imports another fewshotsam2 than the one shipped with the module, or None.

    The run process puts the module's folder first on PYTHONPATH; Slicer appends module folders to sys.path last,
    so a fewshotsam2 pip-installed into Slicer's Python would win there and the two processes would run different
    versions (options, file formats).
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec("fewshotsam2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    shipped = (coreFolder() / "fewshotsam2").resolve()
    found = [Path(p).resolve() for p in spec.submodule_search_locations]
    if shipped in found:
        return None
    return (f"another fewshotsam2 is installed in Slicer's Python ({', '.join(str(f) for f in found)}) and shadows "
            f"the one of this module ({shipped}); the segmentation would run a different version than the panel. "
            "Uninstall it (in Slicer's Python console: slicer.util.pip_uninstall('fewshotsam2')) and restart Slicer.")


def _windowsNoWindow() -> dict:
    """Popen keywords that keep a console window from flashing up on Windows (nothing elsewhere)."""
    if os.name != "nt":
        return {}
    info = subprocess.STARTUPINFO()
    info.dwFlags |= subprocess.STARTF_USESHOWWINDOW  # wShowWindow 0 = SW_HIDE
    return {"startupinfo": info, "creationflags": subprocess.CREATE_NO_WINDOW}


def runCore(code: str, *arguments: str, python: Optional[str] = None) -> str:
    """Run a short piece of the core (`code`, with `arguments` in sys.argv[1:]) in a process of its own, so that
    torch is never imported into Slicer; returns its standard output. The core's InputError becomes an InputError
    here (its one line), any other failure a RuntimeError with the last line of the traceback."""
    from fewshotsam2.errors import InputError

    body = "\n".join("    " + line for line in code.strip().splitlines())
    script = (f"import sys\nfrom fewshotsam2.errors import InputError\ntry:\n{body}\n"
              f"except InputError as exc:\n    print(f'fewshotsam2: error: {{exc}}', file=sys.stderr)\n"
              f"    sys.exit({EXIT_BAD_INPUT})\n")
    run = subprocess.run([python or pythonExecutable(), "-c", script, *arguments], cwd=str(coreFolder()),
                         env=coreEnvironment(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         encoding="utf-8", errors="replace", **_windowsNoWindow())
    if run.returncode == 0:
        return run.stdout
    message = errorFromStderr(run.stderr, run.returncode)
    if run.returncode == EXIT_BAD_INPUT:
        raise InputError(message)
    logging.error("FewShotSAM2: a core process failed (exit code %s):\n%s", run.returncode, run.stderr)
    raise RuntimeError(message)


def unknownOptions(options: dict) -> list[str]:
    """Settings the command line cannot be given (a None value is left out, so it needs no flag)."""
    return sorted(name for name, value in options.items() if name not in settings.BY_NAME and value is not None)


def optionArguments(options: dict) -> list[str]:
    """Command-line arguments for the Logic's option keywords (the settings table's flags; None values left out)."""
    return settings.command_arguments(options)


# ---------------------------------------------------------------------------------------------- job files


def writeImage(path: Path, volume) -> None:
    """A core Volume as an uncompressed NRRD (exact geometry, native pixel type), written under a temporary name."""
    import SimpleITK as sitk

    tmp = path.with_name(".tmp-" + path.name)
    sitk.WriteImage(volume.to_sitk(), str(tmp), useCompression=False)
    os.replace(tmp, path)


def writeJobInputs(folder: Path, query, supports, structures) -> list[str]:
    """Write the query and each support (image + .seg.nrrd labels on its grid) into `folder`.

    Returns the command-line arguments that name them (--query, --support ..., --labels by value).
    """
    from fewshotsam2.io.volume import LabelMap, write_labels

    writeImage(folder / QUERY_FILE, query)
    args = ["--query", str(folder / QUERY_FILE)]
    for index, support in enumerate(supports, start=1):
        image, labels = folder / f"support-{index}.nrrd", folder / f"support-{index}-labels.seg.nrrd"
        writeImage(image, support.image)
        # .seg.nrrd: the structures' names reach the core (its progress lines and warnings use them), and
        # overlapping segments keep their own layers; only the structures this support has, or the core would
        # warn about empty segments
        if isinstance(support.labels, LabelMap):
            write_labels(labels, support.labels.volume, support.labels.structures)
        else:
            present = set(np.unique(support.labels.array).tolist())
            write_labels(labels, support.labels, [s for s in structures if s.value in present])
        args += ["--support", str(image), str(labels)]
    # by value: the Logic numbers its structures 1..N, one value each (a digit-only segment name is no value)
    args += ["--labels", ",".join(f"value:{s.value}" for s in structures)]
    return args


def extentArguments(folder: Path, query, supports, structures, options: dict) -> list[str]:
    """Write the job files into `folder`; returns the arguments of `fewshotsam2 extent` for them (options: axis,
    preset, extent_margin, lpips_weights; None values are left out)."""
    arguments = writeJobInputs(folder, query, supports, structures)
    return arguments + settings.command_arguments({name: options.get(name) for name in EXTENT_OPTIONS})


@dataclass
class ScoreRow:
    """One row of the core's per-slice scores (the fields of fewshotsam2.run.pipeline.SliceScore the GUI uses)."""

    structure: str
    value: int
    slice_index: int
    score: float
    selected: bool
    matched_support: str = ""


@dataclass
class ProcessResult:
    """What the process produced, read back from the job folder (same field names as the core's result)."""

    labels: Any  # fewshotsam2.io.volume.Volume on the query's grid
    structures: list
    scores: list = field(default_factory=list)
    slice_axis: int = 0
    encoder_calls: int = 0
    device: str = ""
    seconds: float = 0.0
    warnings: list = field(default_factory=list)
    # per structure, one line on its slice range when the prediction touched a range end ("liver 12-47 (auto
    # 12-40; continued to 47)"): the core's `range_reports` of its done line
    range_notes: list = field(default_factory=list)

    @property
    def timings(self) -> dict:
        return {"total": self.seconds}


def readScores(path: Path, structures) -> list[ScoreRow]:
    """The core's scores CSV, with the Logic's structure names (the file names structures by label value)."""
    import csv

    if not path.is_file():
        return []
    names = {s.value: s.name for s in structures}
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            value = int(row["value"])
            rows.append(ScoreRow(names.get(value, row["structure"]), value, int(row["slice_index"]), float(row["score"]),
                                 row["selected"] == "1", row.get("matched_support", "")))
    return rows


# ---------------------------------------------------------------------------------------------- progress lines


parseProgressLine = protocol.parse_event  # one line of `--progress json` output as an event dict, or None


def errorFromStderr(text: str, returncode: int, what: str = "segmentation") -> str:
    """One readable line for a failed run: the core's own error line, else the last line of a traceback."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith(protocol.ERROR_PREFIX):
            return line[len(protocol.ERROR_PREFIX):].strip()
    if lines:
        return f"the {what} process stopped with exit code {returncode}: {lines[-1]}"
    return f"the {what} process stopped with exit code {returncode} and no message"


class ProcessJob:
    """What every started job (a segmentation, a slice-range estimate, a refine) offers the main thread: its
    process's events and state. Subclasses hold the process in `self.process`."""

    process: "SegmentationProcess"

    def poll(self) -> list:
        """New events from the process (dicts: progress / warning / done)."""
        return self.process.poll()

    @property
    def progress(self) -> tuple:
        """(stage, done, total) of the latest progress line."""
        return self.process.progress

    @property
    def warnings(self) -> list:
        return self.process.warnings

    @property
    def finished(self) -> bool:
        return self.process.finished


class SegmentationProcess:
    """One run of the core's command line in a temporary job folder: `segment ... --progress json` (`start`) or
    `extent ... --json` (`startExtent`, the slice-range estimate).

    `poll()` returns the events printed since the last call; `finished` / `returncode` tell the state; `cancel()`
    kills the process and its children at once; `cleanup()` removes the job folder (call it in every case).
    `readResult` / `readExtent` read what the finished run wrote.
    """

    def __init__(self, folder: Optional[Path] = None, python: Optional[str] = None, parent: Optional[str] = None):
        """folder: the job folder (None: a new one in `parent`, else in the system's temporary folder)."""
        if parent is not None:
            os.makedirs(parent, exist_ok=True)
        self.folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="FewShotSAM2-", dir=parent))
        self.resultFile = RESULT_FILE  # where the core writes the label map (`start(layered=True)`: a .seg.nrrd)
        self.python = python or pythonExecutable()
        self.process: Optional[subprocess.Popen] = None
        self.command: list[str] = []
        self.events: list[dict] = []
        self.warnings: list[str] = []
        self.progress: tuple[str, int, int] = ("Starting", 0, 0)
        self.done: Optional[dict] = None
        self.cancelled = False
        self.what = "segmentation"  # what the process does, for its error messages
        self._offset = 0
        self._partial = b""
        self._job = None  # Windows: the Job Object handle (kill on close)
        self.server = None  # a remote.Server: the run goes to a `fewshotsam2 serve` server (see remote.py)

    # -------------------------------------------------------------------------- start / stop

    def start(self, arguments: list[str], scores: bool = True, layered: bool = False) -> "SegmentationProcess":
        """Start the core's `segment` command with `arguments` (inputs, options); output files go in the folder.

        scores: ask for the per-slice scores (reverse and LPIPS matching have them; propagation has none).
        layered: the result is a .seg.nrrd whose overlapping structures keep separate layers (`--overlap allow`).
        """
        self.resultFile = LAYERED_RESULT_FILE if layered else RESULT_FILE
        command = ["segment", *arguments, "--out", str(self.folder / self.resultFile)]
        if self.server is not None:
            command += self.server.arguments()
        if scores:
            command += ["--scores", str(self.folder / SCORES_FILE)]
        return self._launch(command + ["--progress", "json"], "segmentation")

    def startRefine(self, arguments: list[str]) -> "SegmentationProcess":
        """Start the core's `refine` with `arguments` (inputs, --previous, --corrected, options; FewShotSAM2Lib.
        refining); the refined label map goes where `readResult` reads it."""
        return self._launch(["refine", *arguments, "--out", str(self.folder / RESULT_FILE), "--progress", "json"],
                            "refine")

    def startExtent(self, arguments: list[str]) -> "SegmentationProcess":
        """Start the core's `extent --json` with `arguments` (from `extentArguments`); `readExtent` reads its answer."""
        command = ["extent", *arguments, "--json"]
        if self.server is not None:
            command += self.server.arguments()  # the estimate runs on the server (the token goes by environment)
        return self._launch(command, "slice range")

    def _launch(self, cliArguments: list[str], what: str) -> "SegmentationProcess":
        """Start `python -m fewshotsam2.cli <cliArguments>` in its own process group, stdout/stderr to files."""
        core = str(coreFolder())
        self.what = what
        self.command = [self.python, "-m", "fewshotsam2.cli", *cliArguments]
        # the fewshotsam2 shipped with the module comes first; -m also puts the working folder (core) on sys.path
        env = coreEnvironment()
        env[protocol.PARENT_PID_ENV] = str(os.getpid())  # the run stops if Slicer is killed (protocol.py)
        if self.server is not None:
            env.update(self.server.environment())  # the token: not on the command line (visible in `ps`)
        kwargs: dict = {}
        if os.name == "nt":
            kwargs.update(_windowsNoWindow())
            kwargs["creationflags"] |= subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs.update(start_new_session=True)  # its own process group: Cancel kills the children too
        with open(self.folder / PROGRESS_FILE, "wb") as out, open(self.folder / STDERR_FILE, "wb") as err:
            self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                            cwd=core, env=env, **kwargs)
        if os.name == "nt":
            # a Job Object that kills the run when Slicer's handle closes (Slicer killed or crashed): the
            # FEWSHOTSAM2_PARENT_PID check of the command line is POSIX only
            self._job = windows_job.killOnCloseJob(self.process)
        logging.info("FewShotSAM2: started %s", " ".join(self.command))
        return self

    def cancel(self) -> None:
        """Kill the process and every process it started, now, and wait for it to be gone."""
        self.cancelled = True
        process = self.process
        if process is None or process.poll() is not None:
            return
        if self.server is not None and os.name != "nt":
            # a remote run: SIGTERM first, so that the client cancels the job on the server before it exits
            try:
                process.terminate()
                process.wait(timeout=REMOTE_CANCEL_S)
                return
            except (subprocess.TimeoutExpired, OSError):
                pass
        try:
            if os.name == "nt":
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, check=False, timeout=KILL_WAIT_S, **_windowsNoWindow())
            else:
                os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError, subprocess.TimeoutExpired):
            process.kill()
        try:
            process.wait(timeout=KILL_WAIT_S)
        except subprocess.TimeoutExpired:  # never hang Slicer on a process that does not die
            logging.warning("FewShotSAM2: process %s did not stop within %s s", process.pid, KILL_WAIT_S)

    def cleanup(self) -> None:
        """Remove the job folder (inputs, result, logs). On Windows a just-killed process may hold its files open
        for a moment (files cannot be deleted while open there): removal is retried for a few seconds."""
        if self.process is not None and self.process.poll() is None:
            self.cancel()
        for attempt in range(REMOVE_ATTEMPTS):
            shutil.rmtree(self.folder, ignore_errors=True)
            if not self.folder.exists():
                break
            time.sleep(0.2 * (attempt + 1))
        else:
            logging.warning("FewShotSAM2: could not remove the job folder %s", self.folder)
        if self._job is not None:
            windows_job.close(self._job)
            self._job = None

    # -------------------------------------------------------------------------- state

    @property
    def finished(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    @property
    def returncode(self) -> Optional[int]:
        return None if self.process is None else self.process.poll()

    def poll(self) -> list[dict]:
        """Events printed since the last call (complete lines only); updates progress, warnings and done."""
        path = self.folder / PROGRESS_FILE
        try:
            with open(path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return []
        self._offset += len(chunk)
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        events = []
        for raw in lines:
            event = parseProgressLine(raw.decode("utf-8", "replace"))
            if event is None:
                continue
            events.append(event)
            if event["event"] == "progress":
                self.progress = (str(event.get("stage", "")), int(event.get("done", 0)), int(event.get("total", 0)))
            elif event["event"] == "warning":
                self.warnings.append(str(event.get("message", "")))
            elif event["event"] == "done":
                self.done = event
        self.events += events
        return events

    def stderr(self) -> str:
        try:
            return (self.folder / STDERR_FILE).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def _raiseIfFailed(self) -> None:
        """Raise Cancelled / RuntimeError (still running) / InputError (exit 2) / RuntimeError (failed), one line."""
        from fewshotsam2.errors import Cancelled, InputError

        if self.cancelled:
            raise Cancelled("cancelled by the user")
        self.poll()
        code = self.returncode
        if code is None:
            raise RuntimeError(f"the {self.what} process is still running")
        if code != 0:
            stderr = self.stderr()
            message = errorFromStderr(stderr, code, self.what)
            if code == EXIT_BAD_INPUT:
                raise InputError(message[:1].upper() + message[1:])
            logging.error("FewShotSAM2: the %s process failed (exit code %s):\n%s", self.what, code, stderr)
            raise RuntimeError(message)

    def readResult(self, structures) -> ProcessResult:
        """The finished run's label map and scores; raises InputError / RuntimeError with one line if it failed."""
        from fewshotsam2.io.volume import read_seg_nrrd, read_volume

        self._raiseIfFailed()
        if self.done is None:
            logging.error("FewShotSAM2: the segmentation process ended without its result:\n%s", self.stderr())
            raise RuntimeError(errorFromStderr(self.stderr(), self.returncode))
        path = self.folder / self.resultFile
        if path.name == LAYERED_RESULT_FILE:
            # every structure from its own layer: overlapping ones keep their voxels (structures by label value)
            layered = read_seg_nrrd(path)
            labels, layers = layered.volume, {s.value: s.layer for s in layered.structures}
            structures = [dataclasses.replace(s, layer=layers.get(s.value, 0)) for s in structures]
        else:
            labels = read_volume(path)
        return ProcessResult(
            labels=labels,
            structures=list(structures),
            scores=readScores(self.folder / SCORES_FILE, structures),
            slice_axis=int(self.done.get("slice_axis", 0)),
            encoder_calls=int(self.done.get("encoder_calls", 0)),
            device=str(self.done.get("device", "")),
            seconds=float(self.done.get("seconds", 0.0)),
            warnings=list(self.warnings),
            range_notes=[str(r.get("summary", "")) for r in self.done.get("range_reports", [])
                         if isinstance(r, dict) and r.get("ends")],
        )

    def readExtent(self) -> dict:
        """The finished `extent --json` answer: {"axis": A, "structures": [{"value", "name", "first", "last"}]}
        (its last line of output); raises InputError / RuntimeError with one line if it failed."""
        self._raiseIfFailed()
        try:
            text = (self.folder / PROGRESS_FILE).read_text(encoding="utf-8", errors="replace")
            lines = [line for line in text.splitlines() if line.strip().startswith("{")]
            answer = json.loads(lines[-1])
            if not isinstance(answer, dict) or not {"axis", "structures"} <= set(answer):
                raise ValueError("not the extent answer")
        except (OSError, IndexError, ValueError):
            logging.error("FewShotSAM2: the slice range process gave no answer:\n%s", self.stderr())
            raise RuntimeError("the slice range process ended without its answer") from None
        return answer
