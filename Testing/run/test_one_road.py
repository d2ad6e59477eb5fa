"""One road from inputs to a result: the support loader's one rule, the settings table everything derives from,
the process protocol, and a command line that holds no segmentation logic and changes no global state."""

import ast
import logging
import signal
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from fewshotsam2 import cli, settings
from fewshotsam2.errors import InputError
from fewshotsam2.options import SegmentOptions
from fewshotsam2.protocol import JsonEvents, parse_event
from fewshotsam2.supports.support_loader import load_supports
from fewshotsam2.io.volume import LabelMap, Structure, Volume, read_labels, read_volume, write_labels

CORE = Path(__file__).resolve().parents[2] / "FewShotSAM2" / "fewshotsam2"


def _image(shape=(10, 48, 48), seed=0, origin=(0.0, 0.0, 0.0)) -> Volume:
    """A smooth synthetic MR-like volume (no HU range: the percentile window) with a bright blob."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    blob = np.exp(-(((j - 24) / 10.0) ** 2 + ((i - 22) / 12.0) ** 2 + ((k - 5) / 6.0) ** 2))
    array = (800 * blob + rng.normal(0, 20, shape) + 100).astype(np.int16)
    return Volume(array, (1.0, 1.0, 2.5), origin, np.eye(3))


def _nested_masks(shape=(10, 48, 48)):
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    outer = ((j - 24) ** 2 + (i - 22) ** 2 < 14 ** 2) & (k >= 2) & (k <= 7)
    inner = ((j - 24) ** 2 + (i - 22) ** 2 < 6 ** 2) & (k >= 3) & (k <= 6)  # inside outer: overlaps it entirely
    return outer, inner


OUTER = Structure(1, "outer", (0.9, 0.2, 0.2))
INNER = Structure(2, "inner", (0.2, 0.9, 0.2))


# ---------------------------------------------------------------------------------------------- the support rule


def test_from_masks_keeps_overlapping_segments_in_layers(tmp_path):
    image = _image()
    outer, inner = _nested_masks()
    labels = LabelMap.from_masks(image, [(OUTER, outer), (INNER, inner)])
    assert labels.volume.layers.shape[0] == 2  # nested: the inner segment needs its own layer
    assert [s.layer for s in labels.structures] == [0, 1]
    np.testing.assert_array_equal(labels.mask(labels.structures[0]), outer)
    np.testing.assert_array_equal(labels.mask(labels.structures[1]), inner)
    # written as a .seg.nrrd and read back: every voxel of both segments survives
    path = tmp_path / "support.seg.nrrd"
    write_labels(path, labels.volume, labels.structures)
    back = read_labels(path, image)
    assert [s.name for s in back.structures] == ["outer", "inner"]
    for s, mask in zip(back.structures, (outer, inner)):
        np.testing.assert_array_equal(back.mask(s), mask)
    # a flat format cannot hold the layers: one clear error, nothing written
    with pytest.raises(InputError, match="overlapping segments"):
        write_labels(tmp_path / "flat.nii.gz", labels.volume, labels.structures)
    assert not (tmp_path / "flat.nii.gz").exists()


def test_disjoint_masks_share_one_layer():
    image = _image()
    a = np.zeros(image.shape, bool)
    b = np.zeros(image.shape, bool)
    a[2, 5:10, 5:10] = True
    b[6, 20:30, 20:30] = True
    labels = LabelMap.from_masks(image, [(OUTER, a), (INNER, b)])
    assert labels.volume.layers is None and set(np.unique(labels.volume.array)) == {0, 1, 2}


def test_load_supports_one_rule():
    """A support may hold a subset; each structure needs one support; the first holder names it; overlaps stay."""
    image = _image()
    outer, inner = _nested_masks()
    both = LabelMap.from_masks(image, [(OUTER, outer), (INNER, inner)])
    only_inner = LabelMap.from_masks(image, [(Structure(7, "Inner", (0.0, 0.0, 1.0)), inner)])
    supports, structures = load_supports([(image, only_inner, "a"), (image, both, "b")], "inner,outer")
    # "inner" is first held by support a (as "Inner", value 7); names and values come from the first holder
    assert [(s.value, s.name) for s in structures] == [(7, "Inner"), (1, "outer")]
    np.testing.assert_array_equal(supports[0].mask(7), inner)
    assert not supports[0].mask(1).any()  # support a lacks "outer": it prompts only "inner"
    np.testing.assert_array_equal(supports[1].mask(7), inner)  # from its own layer, not cut by "outer"
    np.testing.assert_array_equal(supports[1].mask(1), outer)
    with pytest.raises(InputError, match="label 'spleen' is absent from every support"):
        load_supports([(image, only_inner, "a"), (image, both, "b")], "inner,spleen")
    with pytest.raises(InputError, match="absent from the support labels a"):  # one support: the precise message
        load_supports([(image, only_inner, "a")], "outer")
    empty = LabelMap(image.with_array(np.zeros(image.shape, np.uint8)), [OUTER])
    with pytest.raises(InputError, match="the support mask of 'outer' in e is empty"):
        load_supports([(image, empty, "e")], "outer")


# ---------------------------------------------------------------------------------------------- the settings table


def test_every_front_end_derives_from_the_settings_table():
    parser = cli.build_parser(["segment"])
    segment = parser._subparsers._group_actions[0].choices["segment"]
    actions = {a.dest: a for a in segment._actions}
    defaults = SegmentOptions.flat_defaults()
    for row in settings.SETTINGS:
        assert actions[row.name].option_strings == [row.flag]
        assert defaults[row.name] == row.default  # the Python API's defaults are the table's
        assert actions[row.name].default == (False if row.kind is bool else row.front_end_default)
    # the command line and the GUI start from "auto"; the Python API from "off" (whole volume)
    assert settings.BY_NAME["slice_range"].front_end_default == "auto" and defaults["slice_range"] == "off"
    # the extent command takes the same rows, under the same names and defaults
    extent = cli.build_parser(["extent"])._subparsers._group_actions[0].choices["extent"]
    flags = {a.dest: a for a in extent._actions}
    for name in settings.EXTENT_SETTINGS:
        assert flags[name].default == settings.BY_NAME[name].front_end_default
    assert settings.command_arguments({"image_size": 64, "untrained": True, "keep_supports": False,
                                       "checkpoint": None}) == ["--image-size", "64", "--untrained"]


def test_gui_parameters_map_to_settings():
    class Node:  # what the parameter node holds, by GUI name
        pass

    node = Node()
    for row in settings.gui_settings():
        setattr(node, row.gui, row.gui_default)
    flat = settings.from_gui(node)
    assert set(flat) == {r.name for r in settings.gui_settings()}
    SegmentOptions.from_flat(**flat)  # every GUI value is a valid core setting


# ---------------------------------------------------------------------------------------------- structure


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            found.update(f"{base}.{a.name}" if not node.module else base for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_no_core_module_imports_the_command_line():
    for path in CORE.rglob("*.py"):
        if path.name == "cli.py":
            continue
        bad = {name for name in _imports(path) if name.rstrip(".").endswith("cli") or name.endswith(".cli")}
        assert not bad, f"{path.relative_to(CORE)} imports the command line: {bad}"


def test_the_command_line_holds_no_segmentation_logic():
    imports = _imports(CORE / "cli.py")
    for heavy in ("pipeline", "engine", "volume", "backends", "support_loader", "extent"):
        assert not any(heavy in name.lstrip(".").split(".") for name in imports), heavy  # fewshotsam2.run.pipeline


# ---------------------------------------------------------------------------------------------- protocol


def test_json_events_round_trip(tmp_path):
    path = tmp_path / "events.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        events = JsonEvents(f)
        events("Reading", 0, 2)
        events.warning("careful")
        events.done(seconds=1.5)
    parsed = [parse_event(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [e["event"] for e in parsed] == ["progress", "warning", "done"]
    assert parsed[0]["total"] == 2 and parsed[1]["message"] == "careful" and parsed[2]["seconds"] == 1.5
    assert parse_event("not json") is None and parse_event('{"event": "other"}') is None


def _write_image(path: Path, volume: Volume) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(volume.to_sitk(), str(path))


def test_the_command_line_changes_no_global_state(tmp_path, capsys):
    """A whole `segment --progress json` run (64 px, random weights) leaves stdout, warnings, logging and the
    SIGTERM handler as it found them, and prints only event lines on stdout."""
    image = _image()
    outer, _ = _nested_masks()
    _write_image(tmp_path / "image.nrrd", image)
    _write_image(tmp_path / "query.nrrd", _image(seed=1))
    write_labels(tmp_path / "labels.nii.gz", image.with_array(outer.astype(np.uint8)), [OUTER])
    import fewshotsam2.model.engine  # noqa: F401  (torch's first import adds its own warning filters: not the command's)

    before = (sys.stdout, warnings.showwarning, warnings.formatwarning, signal.getsignal(signal.SIGTERM),
              list(logging.getLogger("fewshotsam2").handlers), list(warnings.filters))
    code = cli.main(["segment", "--query", str(tmp_path / "query.nrrd"), "--support", str(tmp_path / "image.nrrd"),
                     str(tmp_path / "labels.nii.gz"), "--labels", "1", "--out", str(tmp_path / "out.nrrd"),
                     "--method", "propagate", "--slice-range", "off", "--untrained", "--image-size", "64",
                     "--device", "cpu", "--progress", "json"])
    after = (sys.stdout, warnings.showwarning, warnings.formatwarning, signal.getsignal(signal.SIGTERM),
             list(logging.getLogger("fewshotsam2").handlers), list(warnings.filters))
    assert code == 0
    assert after == before
    lines = capsys.readouterr().out.splitlines()
    events = [parse_event(line) for line in lines]
    assert all(events) and events[-1]["event"] == "done" and events[0]["stage"] == "Reading the volumes"
    assert any(e["event"] == "warning" and "RANDOM WEIGHTS" in e["message"] for e in events)
    assert read_volume(tmp_path / "out.nrrd").shape == image.shape


# ---------------------------------------------------------------------------------------------- Slicer == CLI


@pytest.mark.slow  # starts the segmentation process
def test_overlapping_support_segments_give_the_same_voxels_in_slicer_and_on_the_command_line(tmp_path, capsys):
    """One support with nested segments (inner entirely inside outer): the Slicer Logic (slicer-core MRML, the
    core in its own process) and the command line on the same .seg.nrrd give the same label map. Before the one
    support rule the Logic merged the segments (the first listed kept shared voxels: "inner" came out empty)."""
    pytest.importorskip("slicer")
    import vtk

    import FewShotSAM2 as module
    from slicer_scene import add_segment_from_mask, load_volume, new_scene

    image, query = _image(), _image(seed=1, origin=(3.0, -2.0, 5.0))
    outer, inner = _nested_masks()
    _write_image(tmp_path / "image.nrrd", image)
    _write_image(tmp_path / "query.nrrd", query)
    labels = LabelMap.from_masks(image, [(OUTER, outer), (INNER, inner)])
    write_labels(tmp_path / "support.seg.nrrd", labels.volume, labels.structures)
    run = dict(method="propagate", untrained=True, image_size=64, device="cpu", slice_range="off")
    assert cli.main(["segment", "--query", str(tmp_path / "query.nrrd"), "--support", str(tmp_path / "image.nrrd"),
                     str(tmp_path / "support.seg.nrrd"), "--labels", "outer,inner", "--out", str(tmp_path / "cli.nrrd"),
                     "--method", "propagate", "--untrained", "--image-size", "64", "--device", "cpu",
                     "--slice-range", "off", "--quiet"]) == 0
    from_cli = read_volume(tmp_path / "cli.nrrd").array

    scene = new_scene()
    support_node = load_volume(scene, tmp_path / "image.nrrd", "support")
    query_node = load_volume(scene, tmp_path / "query.nrrd", "query")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "support labels")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(support_node)
    m = vtk.vtkMatrix4x4()
    support_node.GetIJKToRASMatrix(m)
    ids = [add_segment_from_mask(segmentation, mask, m, s.name, s.color) for s, mask in ((OUTER, outer), (INNER, inner))]
    logic = module.FewShotSAM2Logic()
    logic.segment(query_node, [(support_node, segmentation, ids)], **run)
    from_slicer = logic.lastResult.labels.array
    np.testing.assert_array_equal(from_slicer, from_cli)
    assert [s.name for s in logic.lastResult.structures] == ["outer", "inner"]
