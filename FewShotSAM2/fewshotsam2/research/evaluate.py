"""`fewshotsam2 evaluate`: Dice / HD95 / volume error of the three methods on labeled cases.

Protocols (docs/evaluation.md):

* cross-subject (the papers' 1-way k-shot setting): each case in turn is the query; the support is another labeled
  case (one fixed case, or every other case in turn); `segment` chooses the k support slices as always
  (1 shot = the middle labeled slice). Every query slice is evaluated.
* within-volume: the query's own k support slices (chosen by `support.select_support_slices`, per structure) are
  the support, labels kept on those slices only; the metrics exclude those k slices.

Every comparison is reported over the whole query volume and restricted to the query slices inside the
structure's labeled extent (the SSL-ALPNet protocol's range). Summaries give the per-case mean and the global
Dice (TP/FP/FN summed over cases).

Outputs (in the output folder), written as they come: cases.csv and slices.csv get one flushed row at a time,
summary.csv / summary.md are rewritten atomically after every unit, plots at the end (and on interruption).
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from fewshotsam2.research import metrics as M
from fewshotsam2.io.atomic import write_text_atomic
from fewshotsam2.constants import METHODS
from fewshotsam2.errors import Cancelled, InputError

PROTOCOLS = ("cross-subject", "within-volume")
METHOD_NAMES = METHODS
UNTRAINED_BANNER = "UNTRAINED: SAM2 ran with random weights (--untrained); these numbers mean nothing"
MEAN_ROW = "mean over structures"

# Case folder layout: <case>/image.<ext> (or a DICOM folder <case>/dicom/ or <case>/image/) + <case>/labels.<ext>
IMAGE_NAMES = ("image.nii.gz", "image.nii", "image.nrrd", "image.nhdr", "image.mha", "image.mhd", "dicom", "image")
LABEL_NAMES = ("labels.seg.nrrd", "labels.nii.gz", "labels.nii", "labels.nrrd", "labels.nhdr", "labels.mha",
               "labels.mhd")
MANIFEST_SUFFIXES = (".csv", ".tsv")

CASE_COLUMNS = [
    "protocol", "query", "support", "method", "structure", "value", "shots", "image_size",
    "n_slices", "n_eval_slices", "n_extent_slices", "support_slices",
    "dice", "hd95_mm", "vol_pred_ml", "vol_true_ml", "vol_err_pct", "tp", "fp", "fn",
    "dice_extent", "hd95_extent_mm", "vol_pred_extent_ml", "vol_true_extent_ml", "vol_err_extent_pct",
    "tp_extent", "fp_extent", "fn_extent",
    "seconds", "encoder_calls",
]
SLICE_COLUMNS = [
    "protocol", "query", "support", "method", "structure", "value", "slice_index", "stack_index",
    "in_eval", "in_extent", "true_voxels", "pred_voxels", "dice",
    "score", "selected", "forward_dice", "matched_support", "matched_slice", "query_pos_rel", "support_pos_rel",
]
SKIP_COLUMNS = ["query", "support", "method", "structure", "reason"]
SUMMARY_COLUMNS = [
    "structure", "method", "n",
    "dice_mean", "dice_sd", "dice_global", "dice_extent_mean", "dice_extent_sd", "dice_extent_global",
    "hd95_mean", "hd95_sd", "hd95_n_inf", "hd95_extent_mean", "hd95_extent_sd", "hd95_extent_n_inf",
    "vol_err_mean", "vol_err_sd", "abs_vol_err_mean",
]


# ------------------------------------------------------------------------------------------------ cases


@dataclass(frozen=True)
class CaseSpec:
    """One labeled case: a name (unique in a run), an image (file or DICOM folder) and a label map."""

    name: str
    image: Path
    labels: Path


def find_case(folder: Path) -> Optional[CaseSpec]:
    """The case in `folder` if it holds an image and a label map under the documented names, else None."""
    folder = Path(folder)
    image = next((folder / n for n in IMAGE_NAMES if (folder / n).exists()), None)
    labels = next((folder / n for n in LABEL_NAMES if (folder / n).is_file()), None)
    if image is None or labels is None:
        return None
    return CaseSpec(folder.name, image, labels)


def discover_cases(root: Path) -> list[CaseSpec]:
    """`root` itself if it is a case folder, else every case folder below it (name = path relative to root)."""
    root = Path(root)
    case = find_case(root)
    if case is not None:
        return [case]
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        if here == root:
            continue
        case = find_case(here)
        if case is not None:
            found.append(CaseSpec(here.relative_to(root).as_posix(), case.image, case.labels))
            dirnames[:] = [d for d in dirnames if d not in IMAGE_NAMES]  # a DICOM folder is not a case
    return found


def read_manifest(path: Path) -> list[CaseSpec]:
    """Cases from a manifest: CSV (or TSV) with a header `name,image,labels`; `name` may be left empty
    (then the image's parent folder name). Paths are relative to the manifest's folder. Lines starting
    with '#' and blank lines are ignored."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise InputError(f"{path}: cannot read the manifest ({e.strerror})") from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise InputError(f"{path}: the manifest is empty; expected a header 'name,image,labels' and one row per case")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(io.StringIO("\n".join(lines)), delimiter=delimiter)
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    if "image" not in header or "labels" not in header:
        raise InputError(f"{path}: the manifest header must name the columns 'image' and 'labels' "
                         f"(and optionally 'name'); got {', '.join(header) or 'nothing'}")
    cases = []
    for line_no, raw in enumerate(reader, start=2):
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}
        if not row.get("image") or not row.get("labels"):
            raise InputError(f"{path}: data row {line_no - 1} lacks an image or labels path")
        image = (path.parent / row["image"]).resolve()
        labels = (path.parent / row["labels"]).resolve()
        for p in (image, labels):
            if not p.exists():
                raise InputError(f"{path}: data row {line_no - 1}: {p} does not exist")
        name = row.get("name") or image.parent.name
        cases.append(CaseSpec(name, image, labels))
    return cases


def resolve_cases(paths: Sequence[str]) -> list[CaseSpec]:
    """Each path: a manifest file (.csv/.tsv), a case folder, or a folder searched for case folders."""
    cases: list[CaseSpec] = []
    for raw in paths:
        p = Path(raw)
        if p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES:
            cases.extend(read_manifest(p))
        elif p.is_dir():
            found = discover_cases(p)
            if not found:
                raise InputError(f"{p}: no case folders found (a case folder holds image.* or dicom/ and labels.*)")
            cases.extend(found)
        elif p.exists():
            raise InputError(f"{p}: not a folder or a .csv/.tsv manifest")
        else:
            raise InputError(f"{p}: no such file or folder")
    names = [c.name for c in cases]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"case names must be unique; repeated: {', '.join(dupes)} (name them in a manifest)")
    return cases


# ------------------------------------------------------------------------------------------------ protocols


def cross_subject_pairs(names: Sequence[str], support: Optional[str] = None) -> list[tuple[str, str]]:
    """(query, support) pairs: every case is the query once per support; the support is the fixed case
    `support` (which is then never a query) or, for None / "all", every other case in turn."""
    names = list(names)
    if support in (None, "", "all"):
        if len(names) < 2:
            raise InputError("cross-subject evaluation needs at least two cases")
        return [(q, s) for q in names for s in names if s != q]
    if support not in names:
        raise InputError(f"support case '{support}' is not among the cases: {', '.join(names)}")
    if len(names) < 2:
        raise InputError("cross-subject evaluation needs at least one query besides the support case")
    return [(q, support) for q in names if q != support]


def within_volume_support(image, labels, values: Sequence[int], shots: int, axis: str = "auto",
                          name: str = "self"):
    """The query as its own support: labels kept only on each structure's k selected slices, so the core sees
    no other label of the query. (Slices are chosen as the core chooses support slices; which ones it used is
    read from its result, `SegmentationResult.support_slices`, not from here.)
    """
    from fewshotsam2.run.pipeline import SupportCase
    from fewshotsam2.slicing.slices import SlicePlan
    from fewshotsam2.slicing.support import select_support_slices

    plan = SlicePlan.for_volume(labels, axis)
    stack = plan.stack(labels.array)
    kept = np.zeros_like(labels.array)
    for v in values:
        idx = select_support_slices(stack, int(v), shots)
        arr_idx = sorted(plan.slice_index_to_array_index(i) for i in idx)
        src = np.moveaxis(labels.array, plan.array_axis, 0)
        dst = np.moveaxis(kept, plan.array_axis, 0)  # view into `kept`
        for a in arr_idx:
            dst[a][src[a] == v] = v
    return SupportCase(image=image, labels=labels.with_array(kept), name=name)


def _support(image, labels, name: str, structures: Sequence):
    """The support of one evaluation unit, by the one support rule (support_loader.py): each structure by its
    label value, under the name the evaluation gives it."""
    from fewshotsam2.supports.label_selection import LabelChoice
    from fewshotsam2.supports.support_loader import load_supports

    chosen = [LabelChoice(str(s.value), "value", str(s.value), s.name) for s in structures]
    return load_supports([(image, labels, name)], chosen)[0][0] if structures else None


def parse_structures(spec: Optional[str], available: Sequence) -> list:
    """`--structures` in `--labels`' grammar (label_selection.py: "1,5", "spleen=1,liver=5", names) resolved in
    the first case's structures; None = every structure of the first case."""
    from dataclasses import replace

    from fewshotsam2.supports.label_selection import parse_label_selection, resolve_structures
    from fewshotsam2.io.volume import default_structure

    if not spec:
        return list(available)
    try:
        choices = parse_label_selection(spec)
        # a label value the first case lacks may be in the others: it is scored where it is
        known = list(available) + [default_structure(int(c.key)) for c in choices
                                   if c.kind != "name" and c.key.isascii() and c.key.isdigit() and int(c.key) > 0
                                   and not any(s.value == int(c.key) for s in available)]
        chosen = resolve_structures(choices, known, "the first case's labels")
    except InputError as exc:
        raise InputError(f"--structures: {exc}") from None
    if len({s.value for s in chosen}) != len(chosen):
        raise InputError("--structures: a label value is listed twice")
    return [replace(s, layer=0) for s in chosen]


def check_structures_present(structures: Sequence, names: Sequence[str], case_structures: Callable) -> None:
    """Every --structures value must be in some case's labels: else every run is skipped and the summary has no
    numbers. Reads cases only until each value is found (usually the first case holds them all)."""
    missing = {s.value for s in structures}
    for name in names:
        missing -= {s.value for s in case_structures(name)}
        if not missing:
            return
    shown = ", ".join(f"{s.name} ({s.value})" for s in structures if s.value in missing)
    raise InputError(f"--structures: {shown} is in no case's labels ({', '.join(names[:5])}"
                     f"{', ...' if len(names) > 5 else ''}); nothing would be evaluated; check the label values")


def parse_methods(spec: str) -> list[str]:
    methods = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHOD_NAMES]
    if bad or not methods:
        raise InputError(f"--methods: unknown {', '.join(bad) or 'empty list'}; choose from {', '.join(METHOD_NAMES)}")
    return list(dict.fromkeys(methods))


# ------------------------------------------------------------------------------------------------ files


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.6g}"
    return "" if v is None else str(v)


class CsvLog:
    """Append-only CSV: header (after the untrained banner) when new, each row flushed and fsynced."""

    def __init__(self, path: Path, columns: list[str], banner: Optional[str]) -> None:
        self.path = Path(path)
        self.columns = columns
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._f = open(self.path, "a", encoding="utf-8", newline="")
        self._w = csv.writer(self._f)
        if new:
            if banner:
                self._f.write(f"# {banner}\n")
            self._w.writerow(columns)
            self._sync()

    def _sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def write(self, row: dict, sync: bool = True) -> None:
        self._w.writerow([_fmt(row.get(c)) for c in self.columns])
        if sync:
            self._sync()

    def sync(self) -> None:
        self._sync()

    def close(self) -> None:
        if not self._f.closed:
            self._sync()
            self._f.close()


def read_rows(path: Path) -> list[dict]:
    """Rows of one of our CSV files ('#' banner lines skipped); [] if it does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, encoding="utf-8", newline="") as f:
        lines = [ln for ln in f if not ln.startswith("#")]
    return list(csv.DictReader(lines))


def _csv_text(columns: list[str], rows: Iterable[dict], banner: Optional[str]) -> str:
    buf = io.StringIO()
    if banner:
        buf.write(f"# {banner}\n")
    w = csv.writer(buf)
    w.writerow(columns)
    for r in rows:
        w.writerow([_fmt(r.get(c)) for c in columns])
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ summary


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def summarize(case_rows: Sequence[dict], structure_order: Sequence[str] = (),
              method_order: Sequence[str] = METHOD_NAMES) -> list[dict]:
    """Summary rows per structure x method, then one "mean over structures" row per method.

    Means are over the rows of cases.csv (one per query x support); HD95 means use finite values only and
    count the infinite ones (empty prediction) in hd95_n_inf. Global Dice = Dice of the summed TP/FP/FN.
    The "mean over structures" row averages the per-structure values (macro mean); its sd is left empty.
    """
    structures = list(dict.fromkeys([*structure_order, *(r["structure"] for r in case_rows)]))
    structures = [s for s in structures if any(r["structure"] == s for r in case_rows)]
    methods = [m for m in dict.fromkeys([*method_order, *(r["method"] for r in case_rows)])
               if any(r["method"] == m for r in case_rows)]
    out = []
    for s in structures:
        for m in methods:
            rows = [r for r in case_rows if r["structure"] == s and r["method"] == m]
            if not rows:
                continue
            d_mean, d_sd, _, _ = M.finite_mean_sd(_num(r["dice"]) for r in rows)
            de_mean, de_sd, _, _ = M.finite_mean_sd(_num(r["dice_extent"]) for r in rows)
            h_mean, h_sd, _, _ = M.finite_mean_sd(_num(r["hd95_mm"]) for r in rows)
            he_mean, he_sd, _, _ = M.finite_mean_sd(_num(r["hd95_extent_mm"]) for r in rows)
            v_mean, v_sd, _, _ = M.finite_mean_sd(_num(r["vol_err_pct"]) for r in rows)
            av_mean, _, _, _ = M.finite_mean_sd(abs(_num(r["vol_err_pct"])) for r in rows)
            g = M.global_dice(M.Counts(int(r["tp"]), int(r["fp"]), int(r["fn"])) for r in rows)
            ge = M.global_dice(M.Counts(int(r["tp_extent"]), int(r["fp_extent"]), int(r["fn_extent"])) for r in rows)
            # inf counts only real infinities (an empty prediction), not nan (nothing to compare)
            h_inf = sum(1 for r in rows if math.isinf(_num(r["hd95_mm"])))
            he_inf = sum(1 for r in rows if math.isinf(_num(r["hd95_extent_mm"])))
            out.append(dict(structure=s, method=m, n=len(rows), dice_mean=d_mean, dice_sd=d_sd, dice_global=g,
                            dice_extent_mean=de_mean, dice_extent_sd=de_sd, dice_extent_global=ge,
                            hd95_mean=h_mean, hd95_sd=h_sd, hd95_n_inf=h_inf,
                            hd95_extent_mean=he_mean, hd95_extent_sd=he_sd, hd95_extent_n_inf=he_inf,
                            vol_err_mean=v_mean, vol_err_sd=v_sd, abs_vol_err_mean=av_mean))
    for m in methods:
        per = [r for r in out if r["method"] == m]
        if not per:
            continue
        row: dict = dict(structure=MEAN_ROW, method=m, n=sum(r["n"] for r in per))
        for key in SUMMARY_COLUMNS[3:]:
            if key.endswith("_sd"):
                row[key] = float("nan")
            elif key.endswith("_n_inf"):
                row[key] = sum(r[key] for r in per)
            else:
                row[key] = M.finite_mean_sd(r[key] for r in per)[0]
        out.append(row)
    return out


def summary_markdown(summary: Sequence[dict], settings: dict, skipped: Sequence[dict], untrained: bool) -> str:
    lines = []
    if untrained:
        lines += [f"**{UNTRAINED_BANNER}**", ""]
    lines += ["# FewShotSAM2 evaluation", ""]
    for k, v in settings.items():
        lines.append(f"- {k}: {v}")
    lines.append("")
    structures = list(dict.fromkeys(r["structure"] for r in summary))
    methods = list(dict.fromkeys(r["method"] for r in summary))
    by = {(r["structure"], r["method"]): r for r in summary}

    def table(title: str, note: str, cell: Callable[[dict], str]) -> None:
        lines.extend([f"## {title}", "", note, "", "| structure | " + " | ".join(methods) + " |",
                      "| --- |" + " --- |" * len(methods)])
        for s in structures:
            cells = [cell(by[(s, m)]) if (s, m) in by else "" for m in methods]
            name = f"**{s}**" if s == MEAN_ROW else s
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")

    def ms(key: str, digits: int = 3) -> Callable[[dict], str]:
        def f(r: dict) -> str:
            n = f" (n={r['n']})" if key == "dice" else ""
            return M.format_mean_sd(r[f"{key}_mean"], r[f"{key}_sd"], digits) + n
        return f

    def glob(key: str) -> Callable[[dict], str]:
        return lambda r: "n/a" if math.isnan(r[key]) else f"{r[key]:.3f}"

    def hd(key: str) -> Callable[[dict], str]:
        def f(r: dict) -> str:
            text = M.format_mean_sd(r[f"{key}_mean"], r[f"{key}_sd"], 1)
            return text + (f" ({r[f'{key}_n_inf']} inf)" if r[f"{key}_n_inf"] else "")
        return f

    table("Dice, whole volume, per-case mean ± sd", "Mean over the query x support rows of each case's Dice.",
          ms("dice"))
    table("Dice, whole volume, global", "Dice of TP/FP/FN summed over all cases (FS-MedSAM2's choice).",
          glob("dice_global"))
    table("Dice, labeled extent only, per-case mean ± sd",
          "Only the query slices between the first and last slice containing the structure (SSL-ALPNet protocol; "
          "optimistic: false positives outside the organ's extent are not counted).", ms("dice_extent"))
    table("Dice, labeled extent only, global", "TP/FP/FN summed over cases, extent slices only.",
          glob("dice_extent_global"))
    table("HD95 (mm), whole volume, mean ± sd",
          "95th percentile of the pooled symmetric surface distances; mean over finite values, "
          "'(k inf)' = k cases with an empty prediction.", hd("hd95"))
    table("HD95 (mm), labeled extent only, mean ± sd", "As above, extent slices only.", hd("hd95_extent"))
    table("Volume error (%), whole volume, mean ± sd", "(V_pred - V_true) / V_true, signed.", ms("vol_err", 1))
    if skipped:
        lines += ["## Skipped", "", "| query | support | method | structure | reason |",
                  "| --- | --- | --- | --- | --- |"]
        for r in skipped:
            lines.append(f"| {r['query']} | {r['support']} | {r['method']} | {r['structure']} | {r['reason']} |")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ evaluation


@dataclass
class EvaluationConfig:
    cases: list[CaseSpec]
    output: Path
    methods: list[str] = field(default_factory=lambda: list(METHOD_NAMES))
    structures: Optional[str] = None  # --structures spec; None = all values of the first case
    protocol: str = "cross-subject"
    support: Optional[str] = None  # cross-subject: fixed support case name; None = every other case
    shots: int = 1
    per_structure: bool = True  # one segment call per structure (1-way); False = all structures in one call
    resume: bool = False
    overwrite: bool = False
    show_progress: bool = True
    options: dict = field(default_factory=dict)  # SegmentOptions fields (model, image_size, untrained, ...)


@dataclass
class EvaluationOutputs:
    folder: Path
    cases_csv: Path
    slices_csv: Path
    summary_csv: Path
    summary_md: Path
    plots: list[Path]
    summary: list[dict]


OUR_FILES = ("cases.csv", "slices.csv", "skipped.csv", "summary.csv", "summary.md", "run.json")
# settings that must match to resume into an existing folder
RESUME_KEYS = ("protocol", "support", "shots", "per_structure", "model", "version", "image_size", "checkpoint",
               "untrained", "axis", "preset", "top_k", "min_score", "keep_supports", "augmentations", "lpips_net",
               "seed")


def _run_settings(cfg: EvaluationConfig) -> dict:
    o = cfg.options
    s = dict(protocol=cfg.protocol, support=cfg.support or ("self" if cfg.protocol == "within-volume" else "all"),
             shots=cfg.shots, per_structure=cfg.per_structure)
    for k in RESUME_KEYS[4:]:
        if k in o:
            s[k] = o[k]
    return s


def _prepare_folder(cfg: EvaluationConfig, settings: dict, untrained: bool) -> None:
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: output exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    has_results = (out / "cases.csv").exists()
    if has_results and not (cfg.resume or cfg.overwrite):
        raise InputError(f"{out}: holds results of an earlier run; pass --resume to continue it or --overwrite")
    if has_results and cfg.resume:
        old = {}
        if (out / "run.json").exists():
            try:
                old = json.loads((out / "run.json").read_text(encoding="utf-8")).get("settings", {})
            except (OSError, ValueError):
                old = {}
        diff = [k for k in settings if k in old and old[k] != settings[k]]
        if diff:
            raise InputError(f"{out}: cannot resume, settings differ from the earlier run: "
                             + ", ".join(f"{k} {old[k]!r} -> {settings[k]!r}" for k in diff))
    if cfg.overwrite or not has_results:
        for name in OUR_FILES:
            (out / name).unlink(missing_ok=True)
    meta = {"warning": UNTRAINED_BANNER} if untrained else {}
    meta.update(settings=settings,
                cases=[asdict(c) | {"image": str(c.image), "labels": str(c.labels)} for c in cfg.cases])
    write_text_atomic(out / "run.json", json.dumps(meta) + "\n")  # one line: the warning is in the first line


def _rel_position(stack_index: int, first: int, last: int) -> float:
    if last < first:
        return float("nan")
    return 0.5 if last == first else (stack_index - first) / (last - first)


def _stack_extent(plan, labels_array: np.ndarray, value: int) -> tuple[int, int]:
    from fewshotsam2.slicing.support import labeled_slices

    present = labeled_slices(plan.stack(labels_array), value)
    return (int(present[0]), int(present[-1])) if present.size else (0, -1)


def evaluate_result(result, truth_labels, value: int, eval_keep: Optional[np.ndarray] = None) -> dict:
    """Metrics of one structure of a SegmentationResult against the truth label Volume (same grid).

    `eval_keep`: bool per slice along result.slice_axis; False slices (within-volume support slices) are
    excluded from every metric. Returns the metric columns of cases.csv and per-slice arrays (keys "_...").
    """
    axis = int(result.slice_axis)
    from fewshotsam2.io.volume import structure_mask

    # --overlap allow: a structure's voxels from its own layer (overlaps kept)
    pred = structure_mask(result.labels, next(s for s in result.structures if s.value == value)) \
        if result.labels.layers is not None else np.asarray(result.labels.array) == value
    truth = np.asarray(truth_labels.array) == value
    n = truth.shape[axis]
    keep = np.ones(n, bool) if eval_keep is None else np.asarray(eval_keep, bool)
    spacing = M.spacing_kji(truth_labels.spacing)
    extent = M.labeled_extent(truth, axis) & keep
    p_all, t_all = (pred, truth) if keep.all() else (M.keep_slices(pred, axis, keep), M.keep_slices(truth, axis, keep))
    whole = M.compare(p_all, t_all, spacing)
    ext = M.compare(M.keep_slices(pred, axis, extent), M.keep_slices(truth, axis, extent), spacing)
    other = tuple(a for a in range(3) if a != axis)
    row = dict(
        n_slices=n, n_eval_slices=int(keep.sum()), n_extent_slices=int(extent.sum()),
        dice=whole.dice, hd95_mm=whole.hd95_mm, vol_pred_ml=whole.volume_pred_ml, vol_true_ml=whole.volume_true_ml,
        vol_err_pct=whole.volume_error_pct, tp=whole.counts.tp, fp=whole.counts.fp, fn=whole.counts.fn,
        dice_extent=ext.dice, hd95_extent_mm=ext.hd95_mm, vol_pred_extent_ml=ext.volume_pred_ml,
        vol_true_extent_ml=ext.volume_true_ml, vol_err_extent_pct=ext.volume_error_pct,
        tp_extent=ext.counts.tp, fp_extent=ext.counts.fp, fn_extent=ext.counts.fn,
    )
    row["_keep"] = keep
    row["_extent"] = extent
    row["_slice_dice"] = M.per_slice_dice(pred, truth, axis)
    row["_true_vox"] = truth.sum(axis=other)
    row["_pred_vox"] = pred.sum(axis=other)
    fwd = getattr(result, "forward_masks", {}).get(value)
    row["_forward_dice"] = None if fwd is None else M.per_slice_dice(np.asarray(fwd, bool), truth, axis)
    return row


class _Evaluator:
    def __init__(self, cfg: EvaluationConfig, engine=None) -> None:
        self.cfg = cfg
        self.engine = engine
        self.untrained = bool(cfg.options.get("untrained", False))
        self.banner = UNTRAINED_BANNER if self.untrained else None
        self.out = Path(cfg.output)
        self.by_name = {c.name: c for c in cfg.cases}
        self.load = functools.lru_cache(maxsize=3)(self._load)  # query + support (+1) stay in memory

    def _load(self, name: str):
        from fewshotsam2.io.volume import read_labels, read_volume

        c = self.by_name[name]
        image = read_volume(c.image)
        labels, structures = read_labels(c.labels, image)
        return image, labels, structures

    def options(self, method: str):
        from fewshotsam2.options import SegmentOptions

        names = SegmentOptions.flat_names()
        kw = {k: v for k, v in self.cfg.options.items() if k in names}
        kw.update(method=method, shots=self.cfg.shots)
        return SegmentOptions.from_flat(**kw)

    def build_engine(self, method: str):
        # built once: every case and method reuses the model (the engine resets its frame cache per run)
        if self.engine is None:
            from fewshotsam2.run.pipeline import make_engine

            self.engine = make_engine(self.options(method))
        return self.engine


def run_evaluation(cfg: EvaluationConfig, engine=None, segment=None,
                   on_start: Optional[Callable[[], None]] = None) -> EvaluationOutputs:
    """Run the whole evaluation (see the module docstring); returns where everything was written.

    `engine`: a SAM2 engine to use (default: built from the options). `segment`: the segmentation function
    (default `pipeline.segment`; tests hand in one whose answers are known). `on_start()` is called once every
    check has passed and the output folder is ready.
    """
    from tqdm import tqdm

    from fewshotsam2.io.volume import LabelMap

    if segment is None:
        from fewshotsam2.run.pipeline import segment

    if cfg.protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol '{cfg.protocol}'; choose {' or '.join(PROTOCOLS)}")
    if not cfg.cases:
        raise InputError("no cases to evaluate")
    methods = parse_methods(",".join(cfg.methods))
    from fewshotsam2.io.paths import refuse_overwriting_inputs

    out_folder = Path(cfg.output)
    refuse_overwriting_inputs([(f"-o {out_folder}/{name}", out_folder / name) for name in OUR_FILES],
                              [*(p for c in cfg.cases for p in (c.image, c.labels, Path(c.labels).parent)),
                               cfg.options.get("checkpoint"), cfg.options.get("lpips_weights")],
                              output_folders=[("-o", out_folder)])
    ev = _Evaluator(cfg, engine)
    names = [c.name for c in cfg.cases]
    if cfg.protocol == "cross-subject":
        pairs = cross_subject_pairs(names, cfg.support)
    else:
        if cfg.support:
            raise InputError("--support applies to the cross-subject protocol only")
        pairs = [(n, "self") for n in names]

    for m in methods:  # bad options fail here, before anything is written or the model is built
        ev.options(m)
    _, _, first_structures = ev.load(pairs[0][0])
    structures = parse_structures(cfg.structures, first_structures)
    check_structures_present(structures, names, lambda n: ev.load(n)[2])
    settings = _run_settings(cfg)
    ev.build_engine(methods[0])  # a missing checkpoint fails here, before the output folder is touched
    _prepare_folder(cfg, settings, ev.untrained)
    if on_start is not None:
        on_start()
    out = ev.out
    paths = dict(cases=out / "cases.csv", slices=out / "slices.csv", skipped=out / "skipped.csv",
                 summary_csv=out / "summary.csv", summary_md=out / "summary.md")

    groups = [[s] for s in structures] if cfg.per_structure else [list(structures)]
    units = [(q, s, m, g) for (q, s) in pairs for m in methods for g in groups]

    done: set[tuple[str, str, str, int]] = set()
    if cfg.resume:
        done = {(r["query"], r["support"], r["method"], int(r["value"])) for r in read_rows(paths["cases"])}
        skipped_before = {(r["query"], r["support"], r["method"], r["structure"]) for r in read_rows(paths["skipped"])}
        # drop per-slice rows of units interrupted before their case rows were written (they are recomputed)
        slices_rows = [r for r in read_rows(paths["slices"])
                       if (r["query"], r["support"], r["method"], int(r["value"])) in done]
        write_text_atomic(paths["slices"], _csv_text(SLICE_COLUMNS, slices_rows, ev.banner))
        units = [u for u in units
                 if not all((u[0], u[1], u[2], s.value) in done or (u[0], u[1], u[2], s.name) in skipped_before
                            for s in u[3])]

    settings_text = {
        "protocol": cfg.protocol + (f" ({cfg.shots}-shot, support {settings['support']})"),
        "methods": ", ".join(methods),
        "model": f"SAM2 {cfg.options.get('version', '2.1')} {cfg.options.get('model', 'tiny')}, image size "
                 f"{cfg.options.get('image_size', 1024)}" + (", RANDOM WEIGHTS" if ev.untrained else ""),
        "cases": ", ".join(names),
        "structures": ", ".join(f"{s.name} ({s.value})" for s in structures),
        "one segment call per structure (1-way)": "yes" if cfg.per_structure else "no (all structures in one call)",
    }
    if cfg.protocol == "within-volume":
        settings_text["metrics"] = "exclude each structure's support slices"

    cases_log = CsvLog(paths["cases"], CASE_COLUMNS, ev.banner)
    slices_log = CsvLog(paths["slices"], SLICE_COLUMNS, ev.banner)
    skip_log = CsvLog(paths["skipped"], SKIP_COLUMNS, ev.banner)
    structure_order = [s.name for s in structures]

    def write_summaries() -> list[dict]:
        rows = read_rows(paths["cases"])
        summary = summarize(rows, structure_order, methods)
        skipped = read_rows(paths["skipped"])
        write_text_atomic(paths["summary_csv"], _csv_text(SUMMARY_COLUMNS, summary, ev.banner))
        write_text_atomic(paths["summary_md"], summary_markdown(summary, settings_text, skipped, ev.untrained))
        return summary

    bar = tqdm(total=len(units), desc="evaluate", unit="run", disable=not cfg.show_progress, dynamic_ncols=True)
    summary: list[dict] = []
    try:
        for query, support_name, method, group in units:
            bar.set_description_str(f"{query} <- {support_name} {method}"[:60])
            image, truth, _ = ev.load(query)
            skips = []
            present_q = [s for s in group if np.any(truth.array == s.value)]
            skips += [(s, "absent from the query labels") for s in group if s not in present_q]
            if cfg.protocol == "within-volume":
                support = within_volume_support(image, truth, [s.value for s in present_q], cfg.shots,
                                                ev.options(method).axis, name=query) if present_q else None
                s_labels = truth
                run_structures = present_q
            else:
                s_image, s_labels, s_structures = ev.load(support_name)
                run_structures = [s for s in present_q if np.any(s_labels.array == s.value)]
                skips += [(s, "absent from the support labels") for s in present_q if s not in run_structures]
                support = _support(s_image, LabelMap(s_labels, s_structures), support_name, run_structures)
            for s, reason in skips:
                skip_log.write(dict(query=query, support=support_name, method=method, structure=s.name, reason=reason))
            if not run_structures:
                bar.update(1)
                continue

            def progress(stage: str, i: int, n: int) -> None:
                bar.set_postfix_str(f"{stage} {i}/{n}", refresh=False)

            t0 = time.perf_counter()
            try:
                result = segment(image, [support], run_structures, ev.options(method), progress=progress,
                                 engine=ev.engine)
            except InputError as e:
                for s in run_structures:
                    skip_log.write(dict(query=query, support=support_name, method=method, structure=s.name,
                                        reason=str(e).splitlines()[0]))
                bar.update(1)
                continue
            seconds = time.perf_counter() - t0
            # what the core did: how it sliced query and support, which support slices it used
            q_plan, s_plan = result.query_plan, result.support_plans[0]
            scores = {}
            for sc in getattr(result, "scores", []) or []:
                scores[(int(sc.value), int(sc.slice_index))] = sc
            case_rows = []
            for s in run_structures:
                used = sorted(u.array_index for u in result.support_slices_of(s.value))
                keep = None
                if cfg.protocol == "within-volume":  # the query's own labeled slices prompted SAM2: not scored
                    keep = np.ones(truth.array.shape[result.slice_axis], bool)
                    keep[used] = False
                m = evaluate_result(result, truth, s.value, keep)
                q_first, q_last = _stack_extent(q_plan, truth.array, s.value)
                sp_first, sp_last = _stack_extent(s_plan, s_labels.array, s.value)
                base = dict(protocol=cfg.protocol, query=query, support=support_name, method=method,
                            structure=s.name, value=s.value)
                for k in range(m["n_slices"]):
                    sc = scores.get((s.value, k))
                    stack_k = q_plan.array_index_to_slice_index(k)
                    match = None if sc is None else sc.match
                    slices_log.write(dict(
                        base, slice_index=k, stack_index=stack_k, in_eval=bool(m["_keep"][k]),
                        in_extent=bool(m["_extent"][k]), true_voxels=int(m["_true_vox"][k]),
                        pred_voxels=int(m["_pred_vox"][k]), dice=float(m["_slice_dice"][k]),
                        score=None if sc is None else float(sc.score),
                        selected=None if sc is None else bool(sc.selected),
                        forward_dice=None if m["_forward_dice"] is None else float(m["_forward_dice"][k]),
                        matched_support="" if match is None else str(match),
                        matched_slice=None if match is None else match.array_index,
                        query_pos_rel=_rel_position(stack_k, q_first, q_last),
                        # positions compare canonical stacks
                        support_pos_rel=None if match is None else _rel_position(match.stack_index, sp_first,
                                                                                  sp_last),
                    ), sync=False)
                case_rows.append(dict(base, shots=cfg.shots, image_size=cfg.options.get("image_size"),
                                      support_slices=";".join(str(i) for i in used),
                                      seconds=seconds, encoder_calls=int(getattr(result, "encoder_calls", 0)),
                                      **{k: v for k, v in m.items() if not k.startswith("_")}))
            slices_log.sync()  # per-slice rows first: a unit counts as done once its case rows are on disk
            for r in case_rows:
                cases_log.write(r)
            summary = write_summaries()
            bar.update(1)
    except (KeyboardInterrupt, Cancelled):
        bar.write("interrupted: the rows written so far are kept; --resume continues")
        raise
    finally:
        bar.close()
        for log in (cases_log, slices_log, skip_log):
            log.close()
        summary = write_summaries()
        plots = write_plots(out, summary, methods, ev.untrained)
    return EvaluationOutputs(out, paths["cases"], paths["slices"], paths["summary_csv"], paths["summary_md"],
                             plots, summary)


def write_plots(out: Path, summary: Sequence[dict], methods: Sequence[str], untrained: bool) -> list[Path]:
    """dice.png always; reverse_pi_vs_dice.png / lpips_matching.png when those methods ran."""
    from fewshotsam2.research import plots

    folder = Path(out) / "plots"
    folder.mkdir(exist_ok=True)
    made = []
    if summary:
        made.append(plots.plot_dice(summary, folder / "dice.png", untrained))
    else:
        made.append(plots.empty_plot(folder / "dice.png", "no results yet", untrained))
    rows = read_rows(Path(out) / "slices.csv")
    if "reverse" in methods:
        pts = [r for r in rows if r["method"] == "reverse" and r["score"] not in ("", "nan")
               and r["forward_dice"] not in ("", "nan") and r["in_eval"] == "1"]
        path = folder / "reverse_pi_vs_dice.png"
        made.append(plots.plot_pi_vs_dice(pts, path, untrained) if pts
                    else plots.empty_plot(path, "no reverse scores with forward masks", untrained))
    if "lpips" in methods:
        pts = [r for r in rows if r["method"] == "lpips" and r["support_pos_rel"] not in ("", "nan")
               and r["in_eval"] == "1"]
        path = folder / "lpips_matching.png"
        if not pts:
            made.append(plots.empty_plot(path, "no LPIPS matches recorded", untrained))
        elif plots.matching_is_flat(pts):
            made.append(plots.empty_plot(
                path, "1-shot with one support: every query slice can only match the one support slice (or its "
                      "augmented copies), so this plot would be a flat line. Use --shots 3 or more to see where "
                      "LPIPS matching puts each query slice.", untrained))
        else:
            made.append(plots.plot_lpips_matching(pts, path, untrained))
    return made


# ------------------------------------------------------------------------------------------------ command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Evaluate the methods on labeled cases: Dice, HD95 (mm) and volume error per case, "
                          "structure and method, summaries (Markdown, CSV) and plots. See docs/evaluation.md.")
    parser.add_argument("cases", nargs="+", metavar="CASES",
                        help="case folders (image.* or dicom/, and labels.*), folders searched for them, "
                             "or a .csv/.tsv manifest with columns name,image,labels")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--structures", default=None,
                        help="label values to evaluate, e.g. 1,5 or spleen=1,liver=5 (default: all in the first case)")
    parser.add_argument("--methods", default=",".join(METHOD_NAMES), help="comma-separated: propagate,reverse,lpips")
    parser.add_argument("--protocol", default="cross-subject", choices=PROTOCOLS,
                        help="cross-subject (default): each case is the query, another case the support (the "
                             "papers' 1-way k-shot setting); within-volume: k labeled slices of the query itself "
                             "are the support and the other slices are scored")
    parser.add_argument("--support", default=None,
                        help="cross-subject: name of the fixed support case (default: every other case in turn)")
    parser.add_argument("--joint", action="store_true",
                        help="segment all structures in one call per case (default: one call per structure, 1-way)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in the same folder")
    parser.add_argument("--overwrite", action="store_true", help="replace the results in the output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    from fewshotsam2.settings import add_arguments as add_setting_arguments  # the options `segment` has, same names

    add_setting_arguments(parser, groups=("model", "slices", "reverse", "lpips"))


def config_from_args(args: argparse.Namespace) -> EvaluationConfig:
    from fewshotsam2.options import SegmentOptions

    # every SegmentOptions setting except those evaluate decides per run (method) or holds itself (shots)
    options = {k: getattr(args, k) for k in SegmentOptions.flat_names()
               if k not in ("method", "shots") and hasattr(args, k)}
    if options.get("image_size") is None:  # not given: the model's own, written as a number in the results
        from fewshotsam2.model.models import default_image_size

        options["image_size"] = default_image_size(options.get("model") or "tiny", options.get("config"))
    return EvaluationConfig(
        cases=resolve_cases(args.cases), output=Path(args.output), methods=parse_methods(args.methods),
        structures=args.structures, protocol=args.protocol, support=args.support, shots=args.shots,
        per_structure=not args.joint, resume=args.resume, overwrite=args.overwrite,
        show_progress=not args.no_progress, options=options,
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    # the banner once the run starts, not before a refusal (a refused run has no numbers to warn about)
    started = (lambda: print(UNTRAINED_BANNER, flush=True)) if cfg.options.get("untrained") else None
    with warnings.catch_warnings():
        # the engine's own random-weights warning is said once, by the banner
        warnings.filterwarnings("ignore", message=".*RANDOM WEIGHTS.*")
        outputs = run_evaluation(cfg, on_start=started)
    print(f"results in {outputs.folder}: summary.md, summary.csv, cases.csv, slices.csv, plots/")
    for r in outputs.summary:
        if r["structure"] == MEAN_ROW:
            print(f"{r['method']}: mean Dice over structures {r['dice_mean']:.3f} (global {r['dice_global']:.3f})")
    return 0
