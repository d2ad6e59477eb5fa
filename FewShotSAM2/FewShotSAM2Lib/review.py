"""Reviewing a result: the per-slice confidence (table + plot), the slices to look at first, jumping to a slice.

No Qt. `result` is anything with the core's result fields (`scores` of SliceScore-like rows with structure,
slice_index, score; `structures` with name and color).
"""

from __future__ import annotations

import numpy as np
import vtk

import slicer

from .mrml_io import ijkToWorldMatrix

# Below this reverse-propagation score pi (mean Dice on the supports) a slice is listed as low confidence.
LOW_CONFIDENCE_PI = 0.5
# For LPIPS matching the slices whose distance is in the top 10 % of the run are listed.
LOW_CONFIDENCE_LPIPS_QUANTILE = 0.9


def confidenceKind(method: str):
    """What the per-slice score means for a method, or None if it has none."""
    return {"reverse": "pi (mean Dice on the supports, higher is better)",
            "lpips": "LPIPS distance to the matched support (lower is better)"}.get(method)


def lowConfidenceSlices(result, method: str) -> list[tuple[str, int, float]]:
    """[(structure name, slice index, score)] of the slices to review first, worst first.

    reverse: pi below LOW_CONFIDENCE_PI; lpips: distance in the top (1 - LOW_CONFIDENCE_LPIPS_QUANTILE) of the run.
    """
    scores = list(result.scores or [])
    if not scores:
        return []
    if method == "reverse":
        low = [s for s in scores if s.score < LOW_CONFIDENCE_PI]
        low.sort(key=lambda s: s.score)
    elif method == "lpips":
        threshold = float(np.quantile([s.score for s in scores], LOW_CONFIDENCE_LPIPS_QUANTILE))
        low = [s for s in scores if s.score >= threshold and s.score > min(x.score for x in scores)]
        low.sort(key=lambda s: -s.score)
    else:
        return []
    return [(s.structure, int(s.slice_index), float(s.score)) for s in low]


def confidenceColors(scores: list[float], higherIsBetter: bool = True) -> list[tuple[int, int, int]]:
    """An RGB colour per score for the Results table: red for the least confident, shading to yellow for the most
    confident of the listed ones (reverse: pi, higher is better; lpips: distance, lower is better)."""
    if not scores:
        return []
    values = np.asarray(scores, dtype=float)
    low, high = float(values.min()), float(values.max())
    spread = high - low
    out = []
    for v in values:
        good = 0.5 if spread <= 0 else (v - low) / spread  # 0..1, 1 = best
        if not higherIsBetter:
            good = 1.0 - good
        out.append((255, int(round(90 + 130 * good)), 90))
    return out


def markLowConfidenceSlices(result, lowConfidence, queryVolumeNode, sliceAxis: int, markupsNode=None,
                            name: str = "FewShotSAM2 low confidence"):
    """Mark each low-confidence slice in the slice views: one locked point per (structure, slice, score) of
    `lowConfidence`, at the centre of that structure's mask on that slice (the slice's centre when the mask is
    empty there), labelled "liver 12: 0.31". A point list shows a point only on the slice it lies on, so scrolling
    through the query shows the mark exactly on the slices to check. Reuses `markupsNode` if given (its points are
    replaced); returns the node, or None (and removes a given node's points) when there is nothing to mark."""
    scene = queryVolumeNode.GetScene()
    if markupsNode is not None and markupsNode.GetScene() is not scene:
        markupsNode = None
    if not lowConfidence:
        if markupsNode is not None:
            markupsNode.RemoveAllControlPoints()
        return markupsNode
    if markupsNode is None:
        markupsNode = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", scene.GenerateUniqueName(name))
        markupsNode.CreateDefaultDisplayNodes()
    markupsNode.RemoveAllControlPoints()
    structures = {s.name: s for s in result.structures}
    labels = np.asarray(result.labels.array)
    layers = getattr(result.labels, "layers", None)  # a "keep overlaps" result: each structure in its own layer
    toWorld = ijkToWorldMatrix(queryVolumeNode)
    for structureName, sliceIndex, score in lowConfidence:
        s = structures.get(structureName)
        source = labels if layers is None or s is None else layers[s.layer]  # `array` flattens the overlaps
        plane = np.take(source, int(sliceIndex), axis=int(sliceAxis)) == (-1 if s is None else s.value)
        other = [a for a in range(3) if a != int(sliceAxis)]  # the two array axes left in `plane`, in order
        index = [0.0, 0.0, 0.0]  # array index [k, j, i]
        index[int(sliceAxis)] = float(sliceIndex)
        if plane.any():
            rows, cols = np.nonzero(plane)
            index[other[0]], index[other[1]] = float(rows.mean()), float(cols.mean())
        else:
            shape = labels.shape
            index[other[0]], index[other[1]] = (shape[other[0]] - 1) / 2.0, (shape[other[1]] - 1) / 2.0
        ras = toWorld @ np.array([index[2], index[1], index[0], 1.0])  # IJK = reversed array index
        point = markupsNode.AddControlPoint(float(ras[0]), float(ras[1]), float(ras[2]),
                                            f"{structureName} {int(sliceIndex)}: {score:.2f}")
        markupsNode.SetNthControlPointLocked(point, True)
    displayNode = markupsNode.GetDisplayNode()
    if displayNode is not None:
        displayNode.SetSelectedColor(1.0, 0.25, 0.25)
        displayNode.SetColor(1.0, 0.25, 0.25)
    return markupsNode


def sliceCenterRAS(volumeNode, sliceAxis: int, sliceIndex: int) -> list[float]:
    """World RAS of the centre of one slice of a volume (slice index along the labels array axis sliceAxis)."""
    dims = volumeNode.GetImageData().GetDimensions()
    ijk = [(d - 1) / 2.0 for d in dims]
    ijk[2 - int(sliceAxis)] = float(sliceIndex)  # array axis a ([k, j, i]) is IJK axis 2 - a
    ras = ijkToWorldMatrix(volumeNode) @ np.array(ijk + [1.0])
    return [float(v) for v in ras[:3]]


def jumpToSlice(volumeNode, sliceAxis: int, sliceIndex: int) -> None:
    """Centre all slice views on one slice of the volume."""
    r, a, s = sliceCenterRAS(volumeNode, sliceAxis, sliceIndex)
    slicer.vtkMRMLSliceNode.JumpAllSlices(volumeNode.GetScene(), r, a, s, slicer.vtkMRMLSliceNode.CenteredJumpSlice)


def removePlotSeries(chartNode, scene) -> None:
    """Remove every series of a chart from the chart and from the scene.

    The series are collected first: removing a series node from the scene also drops it from the chart, so
    removing while walking the chart by index would skip every other one.
    """
    series = [chartNode.GetNthPlotSeriesNode(i) for i in range(chartNode.GetNumberOfPlotSeriesNodes())]
    chartNode.RemoveAllPlotSeriesNodeIDs()
    for node in series:
        if node is not None and node.GetScene() is scene:
            scene.RemoveNode(node)


def createConfidenceTable(result, method: str, scene, tableNode=None, chartNode=None, namePrefix: str = "FewShotSAM2"):
    """A table (slice, one score column per structure) and a plot chart of the per-slice confidence.

    A table and chart given are reused (the chart's previous series are removed). Returns (tableNode, chartNode),
    or (None, None) when the method gives no score.
    """
    kind = confidenceKind(method)
    if kind is None or not result.scores:
        return None, None
    structures = [s.name for s in result.structures]
    slices = sorted({int(s.slice_index) for s in result.scores})
    row = {k: i for i, k in enumerate(slices)}
    values = {name: np.full(len(slices), np.nan) for name in structures}
    for s in result.scores:
        if s.structure in values:
            values[s.structure][row[int(s.slice_index)]] = float(s.score)

    if tableNode is None:
        tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(f"{namePrefix} confidence"))
    wasModifying = tableNode.StartModify()
    table = tableNode.GetTable()
    table.Initialize()
    sliceColumn = vtk.vtkIntArray()
    sliceColumn.SetName("slice")
    for k in slices:
        sliceColumn.InsertNextValue(k)
    table.AddColumn(sliceColumn)
    for name in structures:
        column = vtk.vtkDoubleArray()
        column.SetName(name)
        for v in values[name]:
            column.InsertNextValue(v)
        table.AddColumn(column)
    tableNode.Modified()
    tableNode.EndModify(wasModifying)

    if chartNode is None:
        chartNode = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(f"{namePrefix} confidence chart"))
    removePlotSeries(chartNode, scene)
    chartNode.SetTitle("Per-slice confidence: " + kind)
    chartNode.SetXAxisTitle("slice")
    chartNode.SetYAxisTitle("pi" if method == "reverse" else "LPIPS distance")
    colors = {s.name: s.color for s in result.structures}
    for name in structures:
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(f"{namePrefix} {name}"))
        series.SetAndObserveTableNodeID(tableNode.GetID())
        series.SetXColumnName("slice")
        series.SetYColumnName(name)
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetColor(*[float(c) for c in colors[name]])
        chartNode.AddAndObservePlotSeriesNodeID(series.GetID())
    return tableNode, chartNode
