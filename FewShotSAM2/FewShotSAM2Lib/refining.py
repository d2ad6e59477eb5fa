"""Refine from the user's edits, Slicer side: what the Logic keeps of a run, the edited slices, the refine process.

After each run the Logic keeps, per output segmentation node, the run's inputs and the label map as produced
(`RefineState`, in memory: the "job cache"). `corrections` compares the node's segments now with that map and
names the slices the user changed; `startRefine` runs `fewshotsam2 refine ... --progress json` in its own
process (as segment: progress, Cancel); `finishRefine` replaces the node's segments in one step and keeps the
previous version for `undoRefine`. No Qt here; the core runs only in the process (refine.py is numpy-only here).
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from . import mrml_io, process
from .mrml_io import nodeName

PREVIOUS_FILE = "previous.seg.nrrd"
CORRECTED_FILE = "corrected.seg.nrrd"
PREVIOUS_SCORES_FILE = "previous-scores.csv"


@dataclass
class RefineState:
    """A run's inputs (the Logic's prepared run) and its label map as produced, on the query's grid."""

    prepared: Any  # FewShotSAM2Run
    produced: np.ndarray  # structure values, [k, j, i] of the query
    scores: list = field(default_factory=list)  # process.ScoreRow
    sliceRanges: dict = field(default_factory=dict)  # structure name -> [first, last] | None
    sliceAxis: int = 0


@dataclass
class RefineJob(process.ProcessJob):
    """A started refine: the process, the node it refines and the slices taken as corrections (name -> slices)."""

    state: RefineState
    node: Any
    process: process.SegmentationProcess
    corrections: dict

    @property
    def prepared(self):
        return self.state.prepared


def remember(states: dict, node, prepared, result, done: Optional[dict]) -> None:
    """Keep what a later refine of `node` needs (called when a run's result is written into it)."""
    states.pop(node.GetID(), None)  # the most recent run comes last
    states[node.GetID()] = RefineState(
        dataclasses.replace(prepared, outputSegmentationNode=node), np.array(result.labels.array, copy=True),
        list(result.scores), dict((done or {}).get("slice_ranges") or {}), int(result.slice_axis))


def lastNode(states: dict):
    """The output node of the most recent run (or refine) that is still in its scene; None if there is none."""
    for state in reversed(list(states.values())):
        node = state.prepared.outputSegmentationNode
        if node is not None and node.GetScene() is not None:
            return node
    return None


def refusal(states: dict, node) -> str:
    """Why refine cannot take the run in `node` ('' when it can, or when `node` holds no run: `_state` says that):
    an overlap 'allow' result, whose overlaps a refine (one label per voxel) would flatten."""
    state = states.get(node.GetID()) if node is not None else None
    if state is None or state.prepared.options.get("overlap") != "allow":
        return ""
    return (f"Refine: '{nodeName(node)}' keeps overlapping segments (overlap 'allow': Keep overlaps); refine "
            "corrects one label per voxel: segment again with overlap 'logits' (decided by SAM2's logits) or 'order' "
            "(first listed wins).")


def _state(states: dict, node) -> RefineState:
    if node is None or not node.IsA("vtkMRMLSegmentationNode"):
        raise mrml_io.inputError("Refine: select the output segmentation of a FewShotSAM2 run.")
    state = states.get(node.GetID())
    if state is None:
        raise mrml_io.inputError(f"Refine: '{nodeName(node)}' is not the result of a FewShotSAM2 run of this session; "
                                 "segment first, then correct slices and refine.")
    if state.prepared.queryVolumeNode is None or state.prepared.queryVolumeNode.GetScene() is None:
        raise mrml_io.inputError("Refine: the query volume of that run is no longer in the scene.")
    return state


def currentLabels(state: RefineState, node) -> np.ndarray:
    """The node's segments now, as one label map in the run's structure values (segments matched by name)."""
    structures = {s.name: s for s in state.prepared.structures}
    segmentation = node.GetSegmentation()
    query = state.prepared.queryVolumeNode
    labels = np.zeros(state.produced.shape, state.produced.dtype)
    masks = {}
    for sid in segmentation.GetSegmentIDs():
        name = segmentation.GetSegment(sid).GetName() or sid
        mask = mrml_io.segmentMaskOnVolume(node, sid, query)
        if name not in structures:
            if mask.any():
                raise mrml_io.inputError(f"Refine: segment '{name}' is not one of the run's structures "
                                         f"({', '.join(structures)}); remove or rename it.")
            continue
        masks[name] = mask
    for s in reversed(state.prepared.structures):  # the first listed keeps an overlap, as the core writes it
        if s.name in masks:
            labels[masks[s.name]] = s.value
    if labels.shape != state.produced.shape:
        raise mrml_io.inputError("Refine: the segmentation is no longer on the query's grid.")
    return labels


def corrections(states: dict, node) -> dict:
    """{structure name: [slice indices]} the user changed since the run (array indices along its slice axis)."""
    from fewshotsam2.run.refine import changed_slices

    state = _state(states, node)
    refused = refusal(states, node)
    if refused:  # its label map flattens the overlaps: no honest slice comparison
        raise mrml_io.inputError(refused)
    current = currentLabels(state, node)
    changed = changed_slices(state.produced, current, [s.value for s in state.prepared.structures], state.sliceAxis)
    return {s.name: changed[s.value] for s in state.prepared.structures if changed[s.value]}


def _writePreviousScores(path: Path, state: RefineState) -> None:
    """The run's conditional slices and slice ranges in the form of `segment --scores` (what refine reads)."""
    values = {s.name: s.value for s in state.prepared.structures}
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["structure", "value", "slice_index", "score", "higher_is_better", "selected", "matched_support",
                    "matched_slice", "range_first", "range_last"])
        for s in state.prepared.structures:
            r = state.sliceRanges.get(s.name)
            bounds = ["", ""] if r is None else [int(r[0]), int(r[1])]
            if s.name in state.sliceRanges:
                w.writerow([s.name, s.value, "", "", "", "", "", ""] + bounds)
        for row in state.scores:
            if row.selected and row.structure in values:
                w.writerow([row.structure, values[row.structure], row.slice_index, row.score, "", 1, "", ""])


def startRefine(states: dict, node, python: Optional[str] = None) -> RefineJob:
    """Start `fewshotsam2 refine` for the slices changed in `node`; returns at once (poll the job)."""
    from fewshotsam2.io.volume import write_labels

    state = _state(states, node)
    changed = corrections(states, node)  # refuses an overlap 'allow' result
    if not changed:
        raise mrml_io.inputError(f"Refine: no slice of '{nodeName(node)}' was changed since the run; correct some "
                                 "slices (Segment Editor) first.")
    prepared = state.prepared
    current = currentLabels(state, node)
    job = process.SegmentationProcess(python=python)
    try:
        arguments = process.writeJobInputs(job.folder, prepared.query, prepared.supports, prepared.structures)
        i = arguments.index("--labels")
        del arguments[i : i + 2]  # refine takes the structures from the previous result
        write_labels(job.folder / PREVIOUS_FILE, prepared.query.with_array(state.produced), prepared.structures)
        write_labels(job.folder / CORRECTED_FILE, prepared.query.with_array(current), prepared.structures)
        _writePreviousScores(job.folder / PREVIOUS_SCORES_FILE, state)
        arguments += ["--previous", str(job.folder / PREVIOUS_FILE), "--corrected", str(job.folder / CORRECTED_FILE),
                      "--previous-scores", str(job.folder / PREVIOUS_SCORES_FILE), "--method", prepared.method]
        arguments += process.optionArguments(prepared.options)
        job.startRefine(arguments)
    except BaseException:
        job.cleanup()
        raise
    return RefineJob(state, node, job, changed)


def finishRefine(logic, states: dict, undo: dict, job: RefineJob):
    """Write the finished refine into its node in one step; the version before is kept for `undoRefine`."""
    try:
        result = job.process.readResult(job.prepared.structures)
        if not result.labels.same_grid(job.prepared.query):
            raise RuntimeError("the refine process wrote a result that is not on the query's voxel grid")
        backup = mrml_io.backupSegmentationNode(job.node)
        node = logic.apply(job.prepared, result)  # restores the node itself if writing fails
        undo[node.GetID()] = (backup, job.state)
        states[node.GetID()] = RefineState(job.prepared, np.array(result.labels.array, copy=True),
                                           job.state.scores, job.state.sliceRanges, job.state.sliceAxis)
        return node
    finally:
        job.process.cleanup()


def undoRefine(states: dict, undo: dict, node) -> None:
    """Put back the segments `node` had before its last refine (and what a next refine compares with)."""
    entry = undo.pop(node.GetID(), None) if node is not None else None
    if entry is None:
        raise mrml_io.inputError("Undo refine: this segmentation has no refine to undo.")
    backup, state = entry
    mrml_io.restoreSegmentationNode(node, backup)
    states[node.GetID()] = state
