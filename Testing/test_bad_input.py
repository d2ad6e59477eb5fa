"""The bad-input battery (issue 15), run through the command line as a user runs it.

Every case: exit code 2 (or a named warning), the exact first words of the one error line, the input files
byte-identical after the run, and nothing (no file, no hidden temporary file) left in the output folder.
The bad files are made from the shared data in tmp folders. Most cases are refused before SAM2 is built:
`pipeline.make_engine` is replaced by a function that records the call, and the test asserts it never ran.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import crop_slices
from fewshotsam2 import cli, pipeline
from fewshotsam2.volume import read_labels, read_volume

ERROR = "fewshotsam2: error: "


# ------------------------------------------------------------------------------------------------ helpers

@pytest.fixture(scope="module")
def data(tmp_path_factory, shared_dir):
    """A small CT query (4 slices of ct-a), and ct-a cropped to 6 slices around the liver as the support."""
    d = tmp_path_factory.mktemp("bad_inputs")
    ct = shared_dir / "data" / "abdomen-ct" / "ct-a"
    image = read_volume(ct / "image.nii.gz")
    labels, _ = read_labels(ct / "labels.nii.gz", image)
    sitk.WriteImage(crop_slices(image, 13, 17).to_sitk(), str(d / "query.nii.gz"))
    sitk.WriteImage(crop_slices(image, 10, 16).to_sitk(), str(d / "support.nii.gz"))
    sitk.WriteImage(crop_slices(labels, 10, 16).to_sitk(), str(d / "support_labels.nii.gz"))
    return {"dir": d, "query": str(d / "query.nii.gz"), "support": str(d / "support.nii.gz"),
            "labels": str(d / "support_labels.nii.gz"), "image": image, "label_map": labels}


def digest(folder: Path) -> dict:
    """Every file under `folder` (hidden ones too) -> SHA-256 of its bytes."""
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(Path(folder).rglob("*")) if f.is_file()}


@pytest.fixture
def no_engine(monkeypatch):
    """Record (and refuse) building SAM2: bad input must be refused before the model is built."""
    built = []

    def make(options):
        built.append(options)
        raise AssertionError("SAM2 was built although the input is bad")

    monkeypatch.setattr(pipeline, "make_engine", make)
    return built


def run_cli(argv, capsys, monkeypatch) -> tuple[int, str, str]:
    """cli.main in-process, warnings shown on stderr as the real command shows them."""
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() replaces it; restore after
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = warnings._showwarning_orig
        rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def segment_argv(query, support, labels, out, *extra) -> list[str]:
    return ["segment", "--query", query, "--support", support, labels, "--labels", "5", "--out", out,
            "--untrained", "--image-size", "64", "--device", "cpu", "--quiet", *extra]


def assert_refused(rc: int, err: str, first_words: str) -> str:
    """Exit 2 and exactly one line on stderr: "fewshotsam2: error: <first_words>..."; returns the line."""
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("warning:")]
    assert len(lines) == 1, err
    assert lines[0].startswith(ERROR + first_words), lines[0]
    return lines[0]


def refused(argv, capsys, monkeypatch, first_words, folders) -> str:
    """Run `argv`; assert it is refused with `first_words` and that no file in `folders` changed."""
    before = [digest(f) for f in folders]
    rc, out, err = run_cli(argv, capsys, monkeypatch)
    line = assert_refused(rc, err, first_words)
    assert [digest(f) for f in folders] == before, "an input or output folder changed"
    return line


# ------------------------------------------------------------------------------- outputs that are inputs

def _copy_inputs(data, folder: Path) -> dict:
    folder.mkdir()
    out = {}
    for key in ("query", "support", "labels"):
        dst = folder / Path(data[key]).name
        dst.write_bytes(Path(data[key]).read_bytes())
        out[key] = str(dst)
    return out


@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink", "hardlink", "support-labels", "support-image"])
def test_out_that_is_an_input_is_refused(data, tmp_path, capsys, monkeypatch, no_engine, spelling):
    inp = _copy_inputs(data, tmp_path / "in")
    q = Path(inp["query"])
    out = {
        "same": str(q),
        "dotdot": str(q.parent / ".." / q.parent.name / q.name),
        "symlink": str(tmp_path / "in" / "link.nii.gz"),
        "hardlink": str(tmp_path / "in" / "hard.nii.gz"),
        "support-labels": inp["labels"],
        "support-image": inp["support"],
    }[spelling]
    if spelling == "symlink":
        os.symlink(q, out)
    if spelling == "hardlink":
        os.link(q, out)
    line = refused(segment_argv(inp["query"], inp["support"], inp["labels"], out), capsys, monkeypatch,
                   "--out ", [tmp_path / "in"])
    assert "is the input" in line
    assert no_engine == []


def test_scores_that_is_an_input_is_refused(data, tmp_path, capsys, monkeypatch, no_engine):
    inp = _copy_inputs(data, tmp_path / "in")
    scores = tmp_path / "in" / "notes.csv"
    scores.write_text("my own notes\n")
    # a CSV handed in as an input (here: as --lpips-weights, the one CSV-able input) must survive too
    argv = segment_argv(inp["query"], inp["support"], inp["labels"], str(tmp_path / "in" / "o.nii.gz"),
                        "--scores", str(scores), "--lpips-weights", str(scores))
    line = refused(argv, capsys, monkeypatch, "--scores ", [tmp_path / "in"])
    assert "is the input" in line


def test_out_inside_a_dicom_input_folder_is_refused(shared_dir, tmp_path, capsys, monkeypatch, no_engine, data):
    dicom = tmp_path / "dicom"
    dicom.mkdir()
    src = shared_dir / "data" / "abdomen-ct" / "ct-b" / "dicom"
    first = sorted(src.iterdir())[0]
    (dicom / "slice.nii.gz").write_bytes(first.read_bytes())  # a series file whose name looks like an output
    line = refused(segment_argv(str(dicom), data["support"], data["labels"], str(dicom / "slice.nii.gz")),
                   capsys, monkeypatch, "--out ", [dicom])
    assert "inside the input folder" in line


def test_evaluate_output_folder_inside_a_case_is_refused(data, tmp_path, capsys, monkeypatch, no_engine):
    case = tmp_path / "case1"
    case.mkdir()
    (case / "image.nii.gz").write_bytes(Path(data["support"]).read_bytes())
    (case / "labels.nii.gz").write_bytes(Path(data["labels"]).read_bytes())
    for output in (case, case / "results"):
        refused(["evaluate", str(case), "-o", str(output), "--protocol", "within-volume", "--untrained",
                 "--image-size", "64", "--device", "cpu"], capsys, monkeypatch, "-o ", [tmp_path])
        assert not (case / "results").exists()


def test_bench_output_that_is_an_input_is_refused(data, tmp_path, capsys, monkeypatch, no_engine):
    inp = _copy_inputs(data, tmp_path / "in")
    refused(["bench", "--query", inp["query"], "--support", inp["support"], "--support-labels", inp["labels"],
             "-o", inp["labels"], "--untrained", "--image-size", "64", "--device", "cpu"],
            capsys, monkeypatch, "-o ", [tmp_path / "in"])


def test_refuse_overwriting_inputs_api(tmp_path):
    """The helper other commands (batch, sample-data) call: outputs against inputs and against each other."""
    from fewshotsam2.errors import InputError
    from fewshotsam2.paths import refuse_overwriting_inputs

    a = tmp_path / "a.nii.gz"
    a.write_bytes(b"x")
    refuse_overwriting_inputs([("--out", tmp_path / "b.nii.gz"), ("--scores", None)], [a, None])
    with pytest.raises(InputError, match="^--out .* is the input"):
        refuse_overwriting_inputs([("--out", tmp_path / "sub" / ".." / "a.nii.gz")], [a])
    with pytest.raises(InputError, match="^--a and --b are the same path"):
        refuse_overwriting_inputs([("--a", tmp_path / "c.csv"), ("--b", str(tmp_path / "c.csv"))], [])
    with pytest.raises(InputError, match="^-o .* lies inside the input"):
        refuse_overwriting_inputs([], [tmp_path], output_folders=[("-o", tmp_path / "results")])
    # a folder that merely contains the inputs is a fine output folder
    refuse_overwriting_inputs([], [a], output_folders=[("-o", tmp_path)])
