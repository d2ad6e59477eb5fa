"""FewShotSAM2Lib without SAM2: the progress-line protocol, error lines, option flags, the job files, the plot
clean-up, the sample-data registration table and the dependency checks (fast; the real process runs in
test_slicer_logic.py)."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from FewShotSAM2Lib import choices, dependencies, process, review, slice_ranges  # noqa: E402
from fewshotsam2 import cli  # noqa: E402
from fewshotsam2.io.volume import Structure, Volume, read_labels, read_volume  # noqa: E402


def test_progress_lines_are_parsed_and_other_output_ignored():
    assert process.parseProgressLine('{"event": "progress", "stage": "Encoding slice 3/20", "done": 3, "total": 20}\n') == {
        "event": "progress", "stage": "Encoding slice 3/20", "done": 3, "total": 20}
    assert process.parseProgressLine('{"event": "warning", "message": "w"}')["message"] == "w"
    for other in ("", "wrote out.nrrd", "{not json", '["a"]', '{"event": "unknown"}', '{"stage": "x"}'):
        assert process.parseProgressLine(other) is None


def test_poll_reads_complete_lines_only(tmp_path):
    job = process.SegmentationProcess(folder=tmp_path)
    path = tmp_path / process.PROGRESS_FILE
    path.write_text('{"event": "progress", "stage": "Encoding slice 1/2", "done": 1, "total": 2}\n{"event": "warn')
    assert [e["event"] for e in job.poll()] == ["progress"]
    assert job.progress == ("Encoding slice 1/2", 1, 2)
    with open(path, "a") as f:  # the rest of the half-written line arrives
        f.write('ing", "message": "modality mismatch"}\n{"event": "done", "device": "cpu", "seconds": 1.5}\n')
    assert [e["event"] for e in job.poll()] == ["warning", "done"]
    assert job.warnings == ["modality mismatch"] and job.done["device"] == "cpu"
    assert job.poll() == []


def test_error_line_from_stderr():
    assert process.errorFromStderr("warning: x\nfewshotsam2: error: --image-size must be a multiple of 32\n", 2) == (
        "--image-size must be a multiple of 32")
    assert process.errorFromStderr("Traceback (most recent call last):\n  File x\nMemoryError: boom\n", 1) == (
        "the segmentation process stopped with exit code 1: MemoryError: boom")
    assert "no message" in process.errorFromStderr("", -9)


def test_option_flags_match_the_command_line():
    """Every setting the Logic passes (the settings table) is an option of `fewshotsam2 segment`, with the
    table's default; every setting of the core has a row (extent_weights: the command line takes the LPIPS
    weights for it)."""
    from fewshotsam2 import settings
    from fewshotsam2.options import SegmentOptions

    parser = cli.build_parser()
    segment = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "segment")[1]
    flags = {option: action for action in segment._actions for option in action.option_strings}
    for row in settings.SETTINGS:
        assert flags[row.flag].dest == row.name
        assert flags[row.flag].default == (row.front_end_default if row.kind is not bool else False)
    assert set(SegmentOptions.flat_names()) - {"extent_weights"} == set(settings.BY_NAME)
    assert process.unknownOptions({"extent_weights": None}) == []
    assert process.unknownOptions({"extent_weights": "w.pth"}) == ["extent_weights"]
    assert process.optionArguments({"image_size": 64, "untrained": True, "keep_supports": False, "checkpoint": None,
                                    "min_score": 0.25}) == ["--image-size", "64", "--untrained", "--min-score", "0.25"]
    assert process.unknownOptions({"image_size": 1, "magic": 2}) == ["magic"]
    # the library's default slice range ("off": every slice) is passed explicitly: the command line's is "auto"
    assert process.optionArguments({"slice_range": "off"}) == ["--slice-range", "off"]
    args = parser.parse_args(["segment", "--query", "q", "--support", "i", "l", "--labels", "1", "--out", "o.nrrd",
                              "--progress", "json"])
    assert args.progress == "json"


def test_job_files_keep_geometry_and_names(tmp_path):
    direction = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]], float)
    image = Volume(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), (0.7, 0.9, 2.5), (-10.25, 3.5, 7.125), direction)
    labels = np.zeros(image.shape, np.uint16)
    labels[1, 2, 3] = 2
    structures = [Structure(1, "liver", (1.0, 0.0, 0.0)), Structure(2, "spleen, left", (0.0, 1.0, 0.0))]
    support = type("Support", (), {"image": image, "labels": image.with_array(labels)})
    args = process.writeJobInputs(tmp_path, image, [support], structures)
    assert args[-2:] == ["--labels", "value:1,value:2"]
    query = read_volume(tmp_path / process.QUERY_FILE)
    assert query.array.dtype == np.int16 and np.array_equal(query.array, image.array)
    assert query.spacing == image.spacing and query.origin == image.origin
    assert np.array_equal(query.direction, direction)
    got, found = read_labels(tmp_path / "support-1-labels.seg.nrrd", query)
    assert np.array_equal(got.array, labels)
    assert [(s.value, s.name) for s in found] == [(2, "spleen, left")]  # only what this support has


def test_extent_arguments_are_those_of_the_extent_command(tmp_path):
    """The estimate's command line parses with `fewshotsam2 extent`, each option under its own name, None left out."""
    image = Volume(np.zeros((4, 5, 6), np.int16), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    labels = np.zeros(image.shape, np.uint16)
    labels[1, 1:3, 1:3] = 1
    support = type("Support", (), {"image": image, "labels": image.with_array(labels)})
    options = {"axis": "auto", "preset": "ct-abdomen", "extent_margin": 7.5, "lpips_weights": None, "device": None}
    args = process.extentArguments(tmp_path, image, [support], [Structure(1, "liver", (1.0, 0.0, 0.0))], options)
    assert "--lpips-weights" not in args
    parsed = cli.build_parser().parse_args(["extent", *args, "--json"])
    assert parsed.query == str(tmp_path / process.QUERY_FILE) and parsed.labels == "value:1" and parsed.json
    assert (parsed.axis, parsed.preset, parsed.extent_margin) == ("auto", "ct-abdomen", 7.5)
    assert [Path(p).is_file() for p in parsed.support[0]] == [True, True]
    assert parsed.device == "auto"  # not given: the table's default, as for segment


def test_error_line_names_the_process():
    assert process.errorFromStderr("RuntimeError: x\n", 1, "slice range") == (
        "the slice range process stopped with exit code 1: RuntimeError: x")


def test_slice_range_table_text_round_trip():
    table = slice_ranges.SliceRangeTable(2, {"liver": (3, 17), "spleen, left": (0, 9), "kidney": (0, 9)}, ["kidney"])
    text = slice_ranges.tableToText(table)
    assert json.loads(text) == {"axis": 2, "ranges": {"liver": [3, 17], "spleen, left": [0, 9], "kidney": [0, 9]},
                                "notFound": ["kidney"]}
    back = slice_ranges.tableFromText(text, (18, 5, 6))  # IJK dimensions: numpy axis 2 is IJK axis 0 (18 slices)
    assert back == table and list(back.ranges) == ["liver", "spleen, left", "kidney"]
    assert slice_ranges.tableFromText(text, (17, 500, 600)) is None  # slice 17 is outside 0..16
    assert slice_ranges.tableFromText(text, (18, 1, 1)) == table  # J and K do not matter for axis 2


def test_chart_series_are_all_removed_on_rerun():
    """Re-running on the same chart leaves exactly one series per structure in the scene (the old loop left every
    other one: removing a series from the scene also drops it from the chart)."""
    scene = slicer.vtkMRMLScene()
    structures = [Structure(v, f"s{v}", (0.1 * v, 0.2, 0.3)) for v in (1, 2, 3, 4)]
    scores = [process.ScoreRow(s.name, s.value, k, 0.1 * k, False) for s in structures for k in range(3)]
    result = type("Result", (), {"structures": structures, "scores": scores})
    table, chart = review.createConfidenceTable(result, "reverse", scene)
    for _ in range(3):
        assert review.createConfidenceTable(result, "reverse", scene, table, chart) == (table, chart)
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotSeriesNode") == 4
    assert chart.GetNumberOfPlotSeriesNodes() == 4


def test_every_choice_has_a_readable_name():
    for parameter, (widget, values) in choices.COMBO_BOXES.items():
        assert widget.endswith("ComboBox")
        for value in values:
            name = choices.displayName(parameter, value)
            assert name != str(value), (parameter, value)
            assert "_" not in name and not name.startswith("ct-"), name
    assert choices.displayName("method", "reverse") == "Reverse propagation (RevSAM2)"
    assert choices.displayName("imageSize", 256) == "256 px"


# ---------------------------------------------------------------------------------------------- the command line


def _tiny_case(folder, values):
    """A 6x24x24 volume with a bright square and a label map holding the given values (one small blob each)."""
    image = Volume(np.full((6, 24, 24), 100, np.int16), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    image.array[:, 6:18, 6:18] = 900
    labels = np.zeros(image.shape, np.uint8)
    for n, value in enumerate(values):
        labels[3, 6 + 4 * n : 9 + 4 * n, 6:18] = value
    from fewshotsam2.io.volume import write_labels

    process.writeImage(folder / "image.nrrd", image)
    write_labels(folder / "labels.nrrd", image.with_array(labels), [])
    return folder / "image.nrrd", folder / "labels.nrrd"


@pytest.mark.slow
def test_progress_json_and_supports_with_different_structures(tmp_path, capsys):
    """`segment --progress json` prints only JSON lines (progress, then done with the device); with several
    supports a label needs to be in one of them only, and one absent from all is one clear error."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    image_a, labels_a = _tiny_case(tmp_path / "a", [1])
    image_b, labels_b = _tiny_case(tmp_path / "b", [2])
    out = tmp_path / "out.nrrd"
    common = ["segment", "--query", str(image_a), "--support", str(image_a), str(labels_a),
              "--support", str(image_b), str(labels_b), "--out", str(out), "--method", "propagate",
              "--untrained", "--image-size", "64", "--device", "cpu", "--slice-range", "off", "--progress", "json"]
    assert cli.main(common + ["--labels", "2,1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    events = [process.parseProgressLine(line) for line in lines]
    assert None not in events  # nothing but JSON objects on stdout
    progress = [e for e in events if e["event"] == "progress"]
    assert [(e["stage"], e["total"]) for e in progress[:2]] == [("Reading the volumes", 0), ("Loading SAM2 tiny", 0)]
    # the bar of the one pass over both structures (propagate), at 0 before its first slice
    assert progress[2]["stage"] == "Label 2, Label 1: Propagating slice 0/6" and progress[2]["done"] == 0
    assert progress[2]["total"] == 6
    done = events[-1]
    assert done["event"] == "done" and done["device"] == "cpu" and done["seconds"] > 0
    assert list(done["voxels"]) == ["Label 2", "Label 1"]  # the --labels order
    assert read_volume(out).shape == (6, 24, 24)
    import warnings

    from fewshotsam2 import protocol

    # restored: warnings after the run are not JSON lines
    assert getattr(warnings.showwarning, "__func__", None) is not protocol.JsonEvents.showwarning

    # anything else printed during the run goes to stderr, not into the JSON stream
    def chatty(*a, **k):
        print("Downloading: something")
        raise ZeroDivisionError("stop here")

    with pytest.raises(ZeroDivisionError):
        cli.main(common + ["--labels", "1"], engine_factory=chatty)
    captured = capsys.readouterr()
    assert "Downloading: something" in captured.err and "Downloading" not in captured.out
    assert all(process.parseProgressLine(line) for line in captured.out.splitlines())
    assert sys.stdout is not sys.stderr  # restored

    out.unlink()
    assert cli.main(common + ["--labels", "1,3"]) == 2
    assert "label '3' is absent from every support" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- sample data


def test_sample_data_sources_match_the_shared_files(shared_dir):
    """The two SampleData entries (support CT + labels, query DICOM series) point at the core's table, and their
    SHA256 checksums are those of the copies in ../shared/data (offline)."""
    from FewShotSAM2Lib import sample_data
    from fewshotsam2.io import sample_data as core_sample_data

    support, query = sample_data.sampleSources()
    for source in (support, query):
        lengths = {len(source[key]) for key in ("uris", "fileNames", "nodeNames", "loadFileTypes", "loadFiles", "checksums")}
        assert len(lengths) == 1  # SampleDataSource refuses lists of different lengths
        assert all(uri.startswith("https://") for uri in source["uris"])
        assert len(set(source["fileNames"])) == len(source["fileNames"])  # one cache file each
        assert all(c.startswith("SHA256:") and len(c) == 7 + 64 for c in source["checksums"])
    by_url = {f.url: f for f in core_sample_data.DEMO_FILES}
    files = [by_url[uri] for source in (support, query) for uri in source["uris"]]
    assert {f.path for f in files} == {f.path for f in core_sample_data.DEMO_FILES if "ct-b/labels" not in f.path}
    for source in (support, query):
        for uri, checksum in zip(source["uris"], source["checksums"]):
            path = shared_dir / "data" / by_url[uri].path
            assert checksum == "SHA256:" + core_sample_data.sha256_of(path), path
    assert support["loadFileTypes"] == ["VolumeFile", "SegmentationFile"] and support["loadFiles"] == [True, True]
    assert query["loadFiles"] == [False] * 19 + [True] and query["nodeNames"][-1] == "ct-b"  # loaded once all are in


# ---------------------------------------------------------------------------------------------- dependencies


def test_incompatible_sam2_is_refused_with_a_message(tmp_path, monkeypatch):
    # another extension's own copy of sam2, first on sys.path, without the SAM2.1 configs
    (tmp_path / "sam2").mkdir()
    (tmp_path / "sam2" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "sam2", raising=False)  # find_spec would answer from an imported sam2
    problem = dependencies.sam2Problem()
    assert "no configs/sam2.1 folder" in problem and str(tmp_path) in problem
    monkeypatch.undo()
    # an older sam2 release
    real = dependencies._version
    monkeypatch.setattr(dependencies, "_version", lambda name: "1.0" if name == "sam2" else real(name))
    assert "incompatible sam2 is installed (version 1.0" in dependencies.sam2Problem()
    assert any("incompatible sam2" in p for p in dependencies.missingDependencies("reverse"))


def test_torch_version_is_bounded_and_never_replaced(monkeypatch):
    assert dependencies.versionTuple("2.5.1+cu121") == (2, 5, 1)
    real = dependencies._version
    for version, ok in (("2.4.1", False), ("2.5.1", True), ("2.14.1+cpu", True), ("3.0.0", False)):
        monkeypatch.setattr(dependencies, "_version", lambda name, v=version: v if name == "torch" else real(name))
        assert (dependencies.torchProblem() is None) is ok, version
    monkeypatch.setattr(dependencies, "_version", lambda name: "2.4.1" if name == "torch" else real(name))
    asked = []
    with pytest.raises(RuntimeError, match="torch 2.4.1 is installed; FewShotSAM2 needs torch >=2.5.1,<3"):
        dependencies.installDependencies("reverse", confirm=lambda message: asked.append(message) or True)
    assert asked == []  # refused before asking: an installed torch is not replaced


def test_dependencies_are_never_installed_silently(monkeypatch):
    # nothing missing (the AlexNet weights given as a file): nothing asked, nothing done
    assert dependencies.installDependencies("lpips", lpipsWeights="alexnet_features.pth") is False

    calls = []

    def pip_install(arguments):
        requirements = arguments[arguments.index("-r") + 1] if "-r" in arguments else None
        calls.append((list(arguments), os.environ.get("SAM2_BUILD_CUDA"),
                      open(requirements).read() if requirements else None))

    monkeypatch.setattr(dependencies, "_pipInstall", pip_install)
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sam2" else real_find_spec(name, *a))
    with pytest.raises(RuntimeError, match="cannot run without"):
        dependencies.installDependencies("reverse")  # no confirm callback: refuse
    asked = []
    with pytest.raises(RuntimeError, match="cannot run without"):
        dependencies.installDependencies("reverse", confirm=lambda message: asked.append(message) or False)
    assert asked and "sam2 is not installed" in asked[0] and "SHA256" in asked[0] and calls == []

    # agreed: the hash-pinned sam2 without build isolation, without deps, without its CUDA extension
    monkeypatch.setenv("SAM2_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match="still cannot run: sam2 is not installed"):  # find_spec still says no sam2
        dependencies.installDependencies("reverse", confirm=lambda message: True)
    (arguments, build_cuda, requirements), = calls
    assert arguments[:3] == ["--no-build-isolation", "--no-deps", "--require-hashes"]
    assert build_cuda == "0"
    assert requirements.strip() == ("sam2==1.1.0 --hash=sha256:"
                                    "7e0ea252d43c10d853e3acfce0b5770ac683c30481bd6de311300e9d44f45b74")
    assert os.environ["SAM2_BUILD_CUDA"] == "1"  # restored
