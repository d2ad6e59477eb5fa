"""The `fewshotsam2 segment` command: end to end (in-process and as a subprocess), its help, and bad input
(exit code 2, one "fewshotsam2: error:" line on stderr, nothing written)."""

from __future__ import annotations

import argparse
import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch

from conftest import crop_slices, folder_state, run_cli
from fewshotsam2 import cli
from fewshotsam2.io.volume import Structure, read_labels, read_volume, write_labels

MODEL = ["--untrained", "--image-size", "256", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shared_dir):
    """Small real inputs: 3-slice crops of ct-a (CT) and abdomen-mr (MR) as queries, ct-a as the support, and
    broken files of every kind."""
    d = tmp_path_factory.mktemp("inputs")
    ct = shared_dir / "data" / "abdomen-ct" / "ct-a"
    image = read_volume(ct / "image.nii.gz")
    labels, structures = read_labels(ct / "labels.nii.gz", image)
    p = {"support_image": str(ct / "image.nii.gz"), "support_labels": str(ct / "labels.nii.gz")}
    sitk.WriteImage(crop_slices(image, 14, 17).to_sitk(), str(d / "query_ct.nii.gz"))
    mr = read_volume(shared_dir / "data" / "abdomen-mr" / "image.nii.gz")
    sitk.WriteImage(crop_slices(mr, 8, 11).to_sitk(), str(d / "query_mr.nii.gz"))
    p["query_ct"], p["query_mr"] = str(d / "query_ct.nii.gz"), str(d / "query_mr.nii.gz")
    # a Slicer segmentation with names and colours, plus an empty segment
    named = [Structure(1, "spleen", (1.0, 0.0, 0.0)), Structure(5, "liver", (0.0, 0.5, 1.0)),
             Structure(77, "ghost", (0.2, 0.2, 0.2))]
    sub = labels.with_array(np.where(np.isin(labels.array, (1, 5)), labels.array, 0).astype(np.uint8))
    write_labels(d / "support.seg.nrrd", sub, named)
    p["support_seg"] = str(d / "support.seg.nrrd")
    zero = labels.with_array(np.zeros_like(labels.array))
    sitk.WriteImage(zero.to_sitk(), str(d / "zeros.nii.gz"))
    p["zeros"] = str(d / "zeros.nii.gz")
    (d / "garbage.nii.gz").write_bytes(b"not an image at all\n" * 50)
    p["garbage"] = str(d / "garbage.nii.gz")
    img2d = sitk.GetImageFromArray(np.zeros((32, 32), np.int16))
    sitk.WriteImage(img2d, str(d / "flat.nii.gz"))
    p["2d"] = str(d / "flat.nii.gz")
    vol = crop_slices(image, 13, 15).to_sitk()
    sitk.WriteImage(sitk.JoinSeries([vol, vol]), str(d / "time.nii.gz"))
    p["4d"] = str(d / "time.nii.gz")
    for name, bad in (("nan", np.nan), ("inf", np.inf)):
        arr = crop_slices(image, 13, 17).array.astype(np.float32)
        arr[1, 10, 10] = bad
        out = crop_slices(image, 13, 17).with_array(arr)
        # NRRD: ITK's NIfTI reader silently turns NaN/inf into 0, so a NIfTI file could not carry them
        sitk.WriteImage(out.to_sitk(), str(d / f"{name}.nrrd"))
        p[name] = str(d / f"{name}.nrrd")
    # a checkpoint of the wrong model: SAM2.1 small with random weights, offered for tiny
    from fewshotsam2.model.checkpoints import checkpoint_info
    from fewshotsam2.model.engine import build_sam2_model

    torch.save({"model": build_sam2_model(checkpoint_info("small"), 64).state_dict()}, d / "small.pt")
    p["small_ckpt"] = str(d / "small.pt")
    p["dir"] = d
    return p


def _run(argv, capsys, monkeypatch, engine_factory=None):
    """cli.main in-process, with warnings shown on stderr as the real command shows them."""
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() replaces it; restore after
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = warnings._showwarning_orig
        rc = cli.main(argv, engine_factory=engine_factory)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def shared_engine(engine256):
    """An engine factory for cli.main handing out the session's engine (same settings); `.built` lists the
    options it was asked for."""

    def make(options):
        assert (options.model, options.image_size, options.device, options.untrained) == ("tiny", 256, "cpu", True)
        make.built.append(options)
        return engine256

    make.built = []
    return make


# ------------------------------------------------------------------------------------------- end to end

@pytest.mark.slow  # a real-data pipeline at 256 px
@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd"])
def test_segment_writes_label_maps(inputs, tmp_path, capsys, monkeypatch, shared_engine, ext):
    out = tmp_path / f"result{ext}"
    rc, stdout, err = _run(["segment", "--query", inputs["query_ct"], "--support", inputs["support_image"],
                            inputs["support_labels"], "--labels", "1,5", "--out", str(out), "--method", "propagate",
                            *MODEL], capsys, monkeypatch, shared_engine)
    assert rc == 0, err
    assert len(shared_engine.built) == 1
    assert "wrote" in stdout and str(out) in stdout
    assert "fewshotsam2: error" not in err and "Traceback" not in err
    query = read_volume(inputs["query_ct"])
    result = read_volume(out)
    assert result.same_grid(query) and result.shape == (3, 101, 122)
    assert set(np.unique(result.array).tolist()) <= {0, 1, 5}
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left


@pytest.mark.slow  # a real-data pipeline at 256 px
def test_segment_writes_seg_nrrd_with_the_supports_names_and_colours(inputs, tmp_path, capsys, monkeypatch,
                                                                    shared_engine):
    out = tmp_path / "result.seg.nrrd"
    rc, stdout, err = _run(["segment", "--query", inputs["query_ct"], "--support", inputs["support_image"],
                            inputs["support_seg"], "--labels", "liver,Spleen", "--out", str(out),
                            "--method", "propagate", *MODEL], capsys, monkeypatch, shared_engine)
    assert rc == 0, err
    seg = slicerio.read_segmentation(str(out))
    segments = {s["name"]: s for s in seg["segments"]}
    assert {"liver", "spleen"} <= set(segments)
    assert "ghost" not in segments
    np.testing.assert_allclose(segments["spleen"]["color"], (1.0, 0.0, 0.0), atol=1e-3)
    np.testing.assert_allclose(segments["liver"]["color"], (0.0, 0.5, 1.0), atol=1e-3)
    labels, structures = read_labels(out, read_volume(inputs["query_ct"]))
    assert labels.same_grid(read_volume(inputs["query_ct"]))
    assert {s.name for s in structures} <= {"liver", "spleen"}


@pytest.mark.slow  # a real-data pipeline at 256 px
def test_segment_reverse_writes_scores(inputs, tmp_path, capsys, monkeypatch, shared_engine):
    out, scores = tmp_path / "result.nii.gz", tmp_path / "scores.csv"
    rc, stdout, err = _run(["segment", "--query", inputs["query_ct"], "--support", inputs["support_image"],
                            inputs["support_labels"], "--labels", "5,1", "--out", str(out), "--scores", str(scores),
                            "--method", "reverse", "--top-k", "2", *MODEL], capsys, monkeypatch, shared_engine)
    assert rc == 0, err
    with open(scores, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["structure", "value", "slice_index", "score", "higher_is_better", "selected",
                             "matched_support", "matched_slice", "range_first", "range_last"]
    assert {r["higher_is_better"] for r in rows} == {"1"}  # pi is a Dice
    assert len(rows) == 2 * 3
    for v in ("5", "1"):
        mine = [r for r in rows if r["value"] == v]
        assert sorted(int(r["slice_index"]) for r in mine) == [0, 1, 2]
        assert 1 <= sum(int(r["selected"]) for r in mine) <= 2
        assert all(0.0 <= float(r["score"]) <= 1.0 for r in mine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.nii.gz", "scores.csv"]


@pytest.mark.slow  # a subprocess
def test_segment_as_a_subprocess_cross_modality(inputs, tmp_path):
    out = tmp_path / "mr.seg.nrrd"
    proc = run_cli("segment", "--query", inputs["query_mr"], "--support", inputs["support_image"],
                   inputs["support_labels"], "--labels", "1", "--out", out, "--method", "propagate", *MODEL,
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    warning_lines = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert any("modalit" in line for line in warning_lines), proc.stderr  # CT support, MR query: allowed
    assert any("RANDOM WEIGHTS" in line for line in warning_lines)
    assert "wrote" in proc.stdout
    labels, structures = read_labels(out, read_volume(inputs["query_mr"]))
    assert labels.shape == (3, 91, 117) and {s.value for s in structures} <= {1}


# ------------------------------------------------------------------------------------------- help

def _all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def _options_without_help(parser: argparse.ArgumentParser) -> list:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        if not (action.help and action.help.strip()) or action.help == argparse.SUPPRESS:
            missing.append((parser.prog, action.dest))
    return missing


def test_segment_help_explains_every_option(capsys):
    parser = cli.build_parser()
    segment = next(p for p in _all_parsers(parser) if p.prog == "fewshotsam2 segment")
    assert _options_without_help(parser) == [] and _options_without_help(segment) == []
    with pytest.raises(SystemExit) as exc:
        cli.main(["segment", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for action in segment._actions:
        for option in action.option_strings:
            assert option in text, option
    for option in ("--query", "--support", "--labels", "--out", "--method", "--scores", "--top-k", "--min-score",
                   "--shots", "--preset", "--axis", "--model", "--checkpoint", "--untrained", "--image-size",
                   "--device", "--keep-supports", "--augmentations", "--lpips-weights"):
        assert option in text, option


def test_every_subcommand_option_has_help():
    parser = cli.build_parser()
    subcommands = [p.prog for p in _all_parsers(parser)]
    assert "fewshotsam2 segment" in subcommands
    missing = [m for p in _all_parsers(parser) for m in _options_without_help(p)]
    assert missing == [], f"options without help: {missing}"


# ------------------------------------------------------------------------------------------- bad input

BAD = [
    # (case id, argv builder, what the message must say)
    ("missing-query", lambda p, o: ["--query", str(p["dir"] / "nope.nii.gz")], "no such file"),
    ("unreadable-query", lambda p, o: ["--query", p["garbage"]], "cannot read"),
    ("2d-query", lambda p, o: ["--query", p["2d"]], "2D"),
    ("4d-query", lambda p, o: ["--query", p["4d"]], "4D"),
    ("inf-query", lambda p, o: ["--query", p["inf"]], "NaN or infinite"),
    ("nan-support", lambda p, o: ["--support", p["nan"], p["support_labels"]], "NaN or infinite"),
    ("missing-support-labels", lambda p, o: ["--support", p["support_image"], str(p["dir"] / "x.nii.gz")],
     "no such file"),
    ("label-absent", lambda p, o: ["--labels", "250"], "label '250' is absent"),
    ("all-zero-labels", lambda p, o: ["--support", p["support_image"], p["zeros"]], "(present: none)"),
    ("empty-labels", lambda p, o: ["--labels", " , "], "--labels is empty"),
    ("unknown-model", lambda p, o: ["--model", "huge"], "--model must be one of tiny"),
    ("out-folder-missing", lambda p, o: ["--out", str(o / "missing" / "x.nii.gz")], "does not exist"),
    ("out-bad-extension", lambda p, o: ["--out", str(o / "x.png")], "unknown output format"),
    ("scores-bad-extension", lambda p, o: ["--scores", str(o / "s.txt")], ".csv"),
    ("top-k-0", lambda p, o: ["--top-k", "0"], "--top-k"),
    ("min-score-1.5", lambda p, o: ["--min-score", "1.5"], "--min-score"),
    ("shots-0", lambda p, o: ["--shots", "0"], "--shots"),
    ("image-size", lambda p, o: ["--image-size", "100"], "--image-size must be a multiple of 32"),
    ("image-size-above-training-size", lambda p, o: ["--image-size", "2048"], "--image-size must be"),
    ("batch-size-0", lambda p, o: ["--batch-size", "0"], "--batch-size must be at least 1"),
    ("augmentations", lambda p, o: ["--augmentations", "-1"], "--augmentations"),
]


def _argv(p, out_dir: Path, overrides: list[str], untrained: bool = True) -> list[str]:
    base = {"--query": [p["query_ct"]], "--support": [p["support_image"], p["support_labels"]],
            "--labels": ["1"], "--out": [str(out_dir / "out.nii.gz")], "--method": ["reverse"]}
    i = 0
    while i < len(overrides):
        key = overrides[i]
        n = 2 if key == "--support" else 1
        base[key] = overrides[i + 1: i + 1 + n]
        i += 1 + n
    argv = ["segment"]
    for key, values in base.items():
        argv += [key, *values]
    if "--image-size" not in base:
        argv += ["--image-size", "256"]
    return argv + (["--untrained"] if untrained else []) + ["--device", "cpu", "--quiet"]


def _check_refused(rc, out, err, expect, folders_before, folders):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line, no traceback, no progress bar
    assert lines[0].startswith("fewshotsam2: error:") and expect in lines[0], lines[0]
    assert out == ""
    for folder, before in zip(folders, folders_before):
        assert folder_state(folder, times=True) == before, f"{folder} changed"


@pytest.mark.parametrize("case,build,expect", BAD, ids=[b[0] for b in BAD])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(inputs, tmp_path, capsys, monkeypatch, case, build,
                                                            expect):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("already here")
    built = []
    folders = [out_dir, inputs["dir"]]
    before = [folder_state(f, times=True) for f in folders]
    argv = _argv(inputs, out_dir, build(inputs, out_dir))
    rc, out, err = _run(argv, capsys, monkeypatch, engine_factory=lambda options: built.append(options) or 1 / 0)
    _check_refused(rc, out, err, expect, before, folders)
    assert built == []  # refused before SAM2 was even built


def test_seg_nrrd_empty_segment_is_absent(inputs, tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = folder_state(out_dir, times=True)
    argv = _argv(inputs, out_dir, ["--support", inputs["support_image"], inputs["support_seg"], "--labels", "ghost"])
    rc, out, err = _run(argv, capsys, monkeypatch)
    assert rc == 2
    lines = err.strip().splitlines()
    # the reader says why (the segment is empty), then the one error line
    assert lines[-1].startswith("fewshotsam2: error:") and "'ghost' is absent" in lines[-1]
    assert all(line.startswith("warning:") and "empty" in line for line in lines[:-1])
    assert folder_state(out_dir, times=True) == before


def test_checkpoint_of_another_model_is_refused(inputs, tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    folders = [out_dir, inputs["dir"]]
    before = [folder_state(f, times=True) for f in folders]
    argv = _argv(inputs, out_dir, ["--image-size", "64", "--checkpoint", inputs["small_ckpt"]], untrained=False)
    rc, out, err = _run(argv, capsys, monkeypatch)
    _check_refused(rc, out, err, "does not match the sam2.1_hiera_tiny model", before, folders)
    argv = [a if a != inputs["small_ckpt"] else inputs["garbage"] for a in argv]
    rc, out, err = _run(argv, capsys, monkeypatch)
    _check_refused(rc, out, err, "not a valid PyTorch weights file", before, folders)


@pytest.mark.parametrize("extra,expect", [(["--preset", "bone-ish"], "--preset"), (["--device", "tpu"], "--device"),
                                          (["--top-k", "many"], "--top-k"), (["--method", "magic"], "--method")])
def test_usage_errors_exit_2(inputs, tmp_path, capsys, extra, expect):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = folder_state(out_dir, times=True)
    with pytest.raises(SystemExit) as exc:
        cli.main(_argv(inputs, out_dir, []) + extra)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fewshotsam2 segment: error:") and expect in last
    assert folder_state(out_dir, times=True) == before
    with pytest.raises(SystemExit) as exc:
        cli.main(["segment", "--query", inputs["query_ct"]])  # required options missing
    assert exc.value.code == 2
