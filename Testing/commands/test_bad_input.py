"""The bad-input battery (issue 15), run through the command line as a user runs it.

Every case: exit code 2 (or a named warning), the exact first words of the one error line, the input files
byte-identical after the run, and nothing (no file, no hidden temporary file) left in the output folder.
The bad files are made from the shared data in tmp folders. Most cases are refused before SAM2 is built:
`pipeline.make_engine` is replaced by a function that records the call, and the test asserts it never ran.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import cli_command, cli_env, crop_slices, folder_state, run_cli, unchanged
from fewshotsam2 import cli
from fewshotsam2.run import pipeline
from fewshotsam2.io.volume import read_labels, read_volume

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


@pytest.fixture
def no_engine(monkeypatch):
    """Record (and refuse) building SAM2: bad input must be refused before the model is built."""
    built = []

    def make(options):
        built.append(options)
        raise AssertionError("SAM2 was built although the input is bad")

    monkeypatch.setattr(pipeline, "make_engine", make)
    return built


def main_in_process(argv, capsys, monkeypatch) -> tuple[int, str, str]:
    """cli.main in-process, warnings shown on stderr as the real command shows them."""
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() replaces it; restore after
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        # straight to stderr (pytest's own warning recorder would otherwise swallow them)
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(message, category, filename, lineno, line))
        rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def segment_argv(query, support, labels, out, *extra) -> list[str]:
    return ["segment", "--query", query, "--support", support, labels, "--labels", "5", "--out", out,
            "--method", "reverse", "--untrained", "--image-size", "64", "--device", "cpu", "--quiet", *extra]


def assert_refused(rc: int, err: str, first_words: str) -> str:
    """Exit 2 and exactly one line on stderr: "fewshotsam2: error: <first_words>..."; returns the line."""
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("warning:")]
    assert len(lines) == 1, err
    assert lines[0].startswith(ERROR + first_words), lines[0]
    return lines[0]


def refused(argv, capsys, monkeypatch, first_words, folders) -> str:
    """Run `argv`; assert it is refused with `first_words` and that no file in `folders` changed."""
    with unchanged(*folders):
        rc, out, err = main_in_process(argv, capsys, monkeypatch)
    return assert_refused(rc, err, first_words)


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
    from fewshotsam2.io.paths import refuse_overwriting_inputs

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


# ------------------------------------------------------------------------------------------- --labels grammar

def _structures(*pairs):
    from fewshotsam2.io.volume import Structure

    return [Structure(v, n, (1.0, 0.0, 0.0)) for v, n in pairs]


@pytest.mark.parametrize("text,expect", [
    ("1,5", [("auto", "1", None), ("auto", "5", None)]),
    (" liver , spleen ", [("auto", "liver", None), ("auto", "spleen", None)]),
    ("liver=5", [("auto", "5", "liver")]),
    ("value:5,name:5", [("value", "5", None), ("name", "5", None)]),
    ('"Tumour, core",x', [("auto", "Tumour, core", None), ("auto", "x", None)]),
    (r"Tumour\, core", [("auto", "Tumour, core", None)]),
    ('core="a=b"', [("auto", "a=b", "core")]),
    ('"name:x"', [("auto", "name:x", None)]),
    ("name:name:x", [("name", "name:x", None)]),
    ('"say ""hi"""', [("auto", 'say "hi"', None)]),
    ("Läsion ü 病变", [("auto", "Läsion ü 病变", None)]),
])
def test_labels_grammar_parses(text, expect):
    from fewshotsam2.supports.label_selection import parse_label_selection

    assert [(c.kind, c.key, c.rename) for c in parse_label_selection(text)] == expect


@pytest.mark.parametrize("text,first_words", [
    (" , ", "--labels is empty"),
    ('"open', "--labels '\"open' has an unclosed"),
    ("=5", "--labels item '=5': nothing before"),
    ("value:liver", "--labels item 'value:liver': value:liver is not"),
    ("a\\", "--labels 'a\\' ends with a lone backslash"),
])
def test_labels_grammar_refuses_malformed_text(text, first_words):
    from fewshotsam2.errors import InputError
    from fewshotsam2.supports.label_selection import parse_label_selection

    with pytest.raises(InputError) as exc:
        parse_label_selection(text)
    assert str(exc.value).startswith(first_words), str(exc.value)


def test_labels_resolution_rules():
    from fewshotsam2.errors import InputError
    from fewshotsam2.supports.label_selection import parse_label_selection as parse
    from fewshotsam2.supports.label_selection import resolve_structures as resolve

    segs = _structures((1, "5"), (5, "liver"), (7, "Lesion"), (8, "lesion"), (9, "Tumour, core"), (10, "Läsion ü 病变"),
                       (11, "Spleen"), (12, "42"))
    pick = lambda text: [(s.value, s.name) for s in resolve(parse(text), segs, "s.seg.nrrd")]  # noqa: E731
    assert pick("value:5,name:5") == [(5, "liver"), (1, "5")]
    assert pick("lesion,Lesion") == [(8, "lesion"), (7, "Lesion")]  # exact case first
    assert pick("spleen") == [(11, "Spleen")]  # one case-insensitive match is fine
    assert pick("42") == [(12, "42")]  # a digit-only name no value claims is that segment, not "value 42"
    assert pick('"Tumour, core",Läsion ü 病变') == [(9, "Tumour, core"), (10, "Läsion ü 病变")]
    assert pick("core=9,organ=name:liver") == [(9, "core"), (5, "organ")]
    for text, first_words in [
        ("5", "--labels '5' is ambiguous in s.seg.nrrd: label value 5 is 'liver' but segment '5' has value 1; "
              "write value:5 or name:5"),
        ("LESION", "--labels 'LESION' is ambiguous in s.seg.nrrd: it matches 'Lesion' (value 7), 'lesion' (value 8)"),
        ("liver,5=value:5", "--labels chooses 'liver' (value 5) twice"),
        ("11,spleen", "--labels chooses 'Spleen' (value 11) twice"),
        ("a=liver,a=Lesion", "--labels gives two output segments the name 'a'"),
        ("value:4", "label value '4' is absent from the support labels s.seg.nrrd"),
        ("name:kidney", "segment name 'kidney' is absent"),
    ]:
        with pytest.raises(InputError) as exc:
            resolve(parse(text), segs, "s.seg.nrrd")
        assert str(exc.value).startswith(first_words), str(exc.value)
    # a label map with many values lists only some of them
    many = _structures(*[(v, f"Label {v}") for v in range(1, 2001)])
    with pytest.raises(InputError) as exc:
        resolve(parse("5000"), many, "x.nii.gz")
    assert len(str(exc.value)) < 600 and "and 1980 more" in str(exc.value)


def test_duplicate_labels_on_the_command_line(data, tmp_path, capsys, monkeypatch, no_engine):
    out = tmp_path / "out"
    out.mkdir()
    argv = segment_argv(data["query"], data["support"], data["labels"], str(out / "o.nii.gz"))
    argv[argv.index("--labels") + 1] = "1,1"
    refused(argv, capsys, monkeypatch, "--labels chooses 'Label 1' (value 1) twice", [out, data["dir"]])
    assert no_engine == [] and list(out.iterdir()) == []


# ------------------------------------------------------------------------------------- bad files, refused fast

def _nifti_with(path: Path, volume, dtype, patch=None, gz=True) -> str:
    """Write `volume` as NIfTI with ITK, then (optionally) change voxels in the raw bytes: ITK would not write
    NaN/inf through, and this is how such files arrive from other tools."""
    import gzip

    raw = path.with_suffix("") if gz else path  # x.nii.gz -> x.nii
    sitk.WriteImage(volume.with_array(volume.array.astype(dtype)).to_sitk(), str(raw), useCompression=False)
    data = bytearray(raw.read_bytes())
    if patch is not None:
        offset = int(np.frombuffer(bytes(data[108:112]), "<f4")[0])
        voxels = np.frombuffer(data, dtype=dtype, offset=offset).copy()
        patch(voxels)
        data[offset:] = voxels.tobytes()
    if gz:
        raw.unlink()
        path.write_bytes(gzip.compress(bytes(data)))
    else:
        path.write_bytes(bytes(data))
    return str(path)


@pytest.fixture(scope="module")
def bad(data, tmp_path_factory, shared_dir):
    """Broken inputs made from the shared data."""
    d = tmp_path_factory.mktemp("bad_files")
    query = read_volume(data["query"])
    support_labels = read_volume(data["labels"])
    half = lambda src, dst: (d / dst).write_bytes(Path(src).read_bytes()[: Path(src).stat().st_size // 2])  # noqa
    # (MetaImage prints its complaint on the stderr descriptor and raises with a misleading "Reason")
    half(data["query"], "truncated.nii.gz")
    half(data["labels"], "truncated_labels.nii.gz")
    # complete gzip stream, short NIfTI payload (a copy cut off before it was compressed)
    full = _nifti_with(d / "short.nii", query, np.int16, gz=False)
    Path(full).write_bytes(Path(full).read_bytes()[:-1000])
    sitk.WriteImage(query.to_sitk(), str(d / "truncated.mha"))
    half(d / "truncated.mha", "truncated.mha")
    _nifti_with(d / "nan.nii.gz", query, np.float32, patch=lambda v: v.__setitem__(500, np.nan))
    _nifti_with(d / "inf.nii", query, np.float64, patch=lambda v: v.__setitem__(7, -np.inf), gz=False)
    sitk.WriteImage(query.with_array(np.zeros_like(query.array)).to_sitk(), str(d / "constant.nii.gz"))
    sitk.WriteImage(sitk.JoinSeries([query.to_sitk()]), str(d / "one_time_point.nii.gz"))
    huge = np.where(support_labels.array == 5, 3_000_000_000, 0).astype(np.uint32)
    sitk.WriteImage(support_labels.with_array(huge).to_sitk(), str(d / "huge_labels.nii.gz"))
    mr = read_volume(shared_dir / "data" / "abdomen-mr" / "image.nii.gz")
    sitk.WriteImage(crop_slices(mr, 8, 12).to_sitk(), str(d / "mr.nii.gz"))
    (d / "not_weights.pth").write_bytes(b"these are not LPIPS weights\n")
    (d / "cache_file").write_text("a file where the checkpoint cache folder should be\n")
    return {k: str(d / k) for k in ("truncated.nii.gz", "truncated.mha", "truncated_labels.nii.gz", "short.nii", "nan.nii.gz",
                                    "inf.nii", "constant.nii.gz", "one_time_point.nii.gz", "huge_labels.nii.gz",
                                    "mr.nii.gz", "not_weights.pth", "cache_file")} | {"dir": d}


# (case id, argv changes: {option: values}, extra options, first words of the error after "fewshotsam2: error: ")
REFUSED = [
    ("truncated-gz-query", {"--query": ["truncated.nii.gz"]}, [], "truncated.nii.gz: truncated or corrupt file"),
    ("truncated-gz-labels", {"--support": ["SUPPORT", "truncated_labels.nii.gz"]}, [],
     "truncated_labels.nii.gz: truncated or corrupt file"),
    ("truncated-mha-query", {"--query": ["truncated.mha"]}, [], "truncated.mha: truncated file (MetaImage"),
    ("short-nifti-query", {"--query": ["short.nii"]}, [], "short.nii: truncated file: the header promises"),
    ("nan-nifti-gz-query", {"--query": ["nan.nii.gz"]}, [], "nan.nii.gz: contains NaN or infinite intensities"),
    ("inf-nifti-support", {"--support": ["inf.nii", "LABELS"]}, [], "inf.nii: contains NaN or infinite"),
    ("constant-query", {"--query": ["constant.nii.gz"]}, [], "the query is constant (every voxel is 0)"),
    ("label-value-3e9", {"--support": ["SUPPORT", "huge_labels.nii.gz"]}, [],
     "huge_labels.nii.gz: label value 3000000000 is above 2147483647"),
    ("ct-image-as-labels", {"--support": ["SUPPORT", "SUPPORT"]}, [],
     "support.nii.gz: looks like an image, not a label map (negative values"),
    ("mr-image-as-labels", {"--support": ["mr.nii.gz", "mr.nii.gz"]}, [],
     "mr.nii.gz: looks like an image, not a label map ("),
    ("scores-is-a-folder", {}, ["--scores", "OUTDIR/folder.csv"], "OUTDIR/folder.csv: is a folder"),
    ("scores-with-propagate", {"--method": ["propagate"]}, ["--scores", "OUTDIR/s.csv"],
     "--scores: --method propagate has no per-slice scores"),
    ("out-name-too-long", {"--out": ["OUTDIR/" + "n" * 300 + ".nii.gz"]}, [], "n" * 40 + "...: file name too long"),
    ("lpips-weights-wrong", {"--method": ["lpips"]}, ["--lpips-weights", "not_weights.pth"],
     "cannot read LPIPS backbone weights"),
]


@pytest.mark.parametrize("case,changes,extra,first_words", [
    pytest.param(*c, id=c[0], marks=[pytest.mark.slow] if c[0].startswith("lpips") else [])  # lpips import: 4 s
    for c in REFUSED])
def test_bad_file_is_refused_before_sam2_is_built(data, bad, tmp_path, capsys, monkeypatch, no_engine, case, changes,
                                                   extra, first_words):
    out = tmp_path / "out"
    out.mkdir()
    (out / "folder.csv").mkdir()
    subst = lambda a: {"SUPPORT": data["support"], "LABELS": data["labels"]}.get(a) or (  # noqa: E731
        a.replace("OUTDIR", str(out)) if a.startswith("OUTDIR") else bad.get(a, a))
    argv = segment_argv(data["query"], data["support"], data["labels"], str(out / "o.nii.gz"), *map(subst, extra))
    for option, values in changes.items():
        i = argv.index(option)
        argv[i + 1: i + 1 + len(values)] = [subst(v) for v in values]
    first_words = first_words.replace("OUTDIR", str(out))
    refused(argv, capsys, monkeypatch, first_words, [out, data["dir"], bad["dir"]])
    assert sorted(p.name for p in out.iterdir()) == ["folder.csv"]  # nothing written, no hidden temporary file
    assert no_engine == []


def test_4d_file_with_one_time_point_is_read_with_a_warning(data, bad, tmp_path, capsys, monkeypatch, no_engine):
    out = tmp_path / "out"
    out.mkdir()
    argv = segment_argv(bad["one_time_point.nii.gz"], data["support"], data["labels"], str(out / "o.nii.gz"))
    argv[argv.index("--labels") + 1] = "250"  # stop after reading: the query was accepted, with a warning
    before = folder_state(bad["dir"])
    rc, _, err = main_in_process(argv, capsys, monkeypatch)
    assert_refused(rc, err, "label '250' is absent")
    assert "warning: one_time_point.nii.gz: a 4D file with one time point; read as the 3D volume it holds" in err
    assert folder_state(bad["dir"]) == before and list(out.iterdir()) == []


def test_checkpoint_cache_that_is_a_file_is_refused(data, bad, tmp_path, capsys, monkeypatch, no_engine):
    out = tmp_path / "out"
    out.mkdir()
    argv = [a for a in segment_argv(data["query"], data["support"], data["labels"], str(out / "o.nii.gz"))
            if a != "--untrained"] + ["--cache-dir", bad["cache_file"]]
    line = refused(argv, capsys, monkeypatch, f"checkpoint cache {bad['cache_file']} is a file, not a folder",
                   [out, bad["dir"]])
    assert "--cache-dir" in line and no_engine == []
    argv[-1] = str(Path(bad["cache_file"]) / "sub")
    refused(argv, capsys, monkeypatch, f"checkpoint cache {argv[-1]} lies under a file", [out, bad["dir"]])


def test_dicom_folder_with_two_series_can_be_chosen(shared_dir, tmp_path, capsys, monkeypatch, no_engine, data):
    import shutil

    folder = tmp_path / "dicom"
    shutil.copytree(shared_dir / "data" / "abdomen-ct/ct-b/dicom", folder)
    uid = "1.2.826.0.1.3680043.2.1125.999.1"
    small = sitk.Image(32, 32, 3, sitk.sitkInt16) + 5
    small.SetSpacing((1.0, 1.0, 2.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(3):
        sl = small[:, :, z]
        for tag, value in (("0020|000e", uid), ("0020|000d", uid + ".2"), ("0008|0060", "CT"),
                           ("0020|0032", f"0\\0\\{2.0 * z}"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0020|0013", str(z + 1))):
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"extra{z}.dcm"))
        writer.Execute(sl)
    before = folder_state(folder)
    with pytest.warns(UserWarning) as record:
        assert read_volume(folder).shape == (20, 512, 512)  # the largest, with a warning saying how to choose
    message = str(record[0].message)
    # ct-b's files carry an empty SeriesInstanceUID: the listing still names each series so it can be chosen
    assert f"#2: 3 files, UID {uid}, first file extra0.dcm" in message and "#1: 20 files, UID " in message
    assert message.endswith(f"using the largest, #1; choose one with {folder}#N or {folder}#SERIES_UID")
    assert read_volume(f"{folder}#{uid}").shape == (3, 32, 32)
    assert read_volume(f"{folder}#2").shape == (3, 32, 32)
    out = tmp_path / "out"
    out.mkdir()
    refused(segment_argv(f"{folder}#1.2.3", data["support"], data["labels"], str(out / "o.nii.gz")),
            capsys, monkeypatch, f"{folder}: no DICOM series 1.2.3 here; series found: ", [out, folder])
    assert folder_state(folder) == before and no_engine == []


def test_label_values_above_65535_are_kept_exact(data, tmp_path):
    from fewshotsam2.io.volume import Structure, write_labels

    labels = read_volume(data["labels"])
    big = labels.with_array(np.where(labels.array == 5, np.int64(70000), labels.array.astype(np.int64)))
    sitk.WriteImage(big.to_sitk(), str(tmp_path / "big.nrrd"))
    read, structures = read_labels(tmp_path / "big.nrrd", labels)
    assert 70000 in [s.value for s in structures] and read.array.dtype == np.int32
    assert np.array_equal(read.array, big.array)
    for name in ("o.nii.gz", "O.NII.GZ", "o.nrrd"):  # an upper-case extension is written too
        write_labels(tmp_path / name, read, [Structure(70000, "liver", (1.0, 0.0, 0.0))])
        assert np.array_equal(read_volume(tmp_path / name).array, big.array)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------- runs that build SAM2 (random weights, 64 px)

@pytest.fixture
def real_engine(engine64, monkeypatch):
    """The command builds its engine with pipeline.make_engine: hand it the session's real one (same settings)."""
    def make(options):
        assert (options.model, options.image_size, options.device, options.untrained) == ("tiny", 64, "cpu", True)
        return engine64

    monkeypatch.setattr(pipeline, "make_engine", make)
    return engine64


@pytest.mark.slow
def test_nested_seg_nrrd_segments_utf8_and_comma_names_through_the_command(data, tmp_path, capsys, monkeypatch,
                                                                         real_engine):
    import slicerio

    from fewshotsam2.io.volume import structure_mask

    support = read_volume(data["support"])
    liver = read_volume(data["labels"]).array == 5
    core = np.zeros_like(liver)
    k, j, i = np.nonzero(liver)
    core[k.min():k.max() + 1, int(np.median(j)) - 3:int(np.median(j)) + 3, int(np.median(i)) - 3:int(np.median(i)) + 3] = True
    core &= liver  # nested: every core voxel is also liver
    seg = slicerio.create_segmentation(support.shape[::-1], support.ijk_to_lps())
    slicerio.add_segment(seg, liver.transpose(2, 1, 0), {"id": "a", "name": "outer", "color": [1.0, 0.0, 0.0]})
    slicerio.add_segment(seg, core.transpose(2, 1, 0), {"id": "b", "name": "inner", "color": [0.0, 1.0, 0.0]})
    assert seg["voxels"].ndim == 4  # overlapping -> two layers, both with label value 1
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / "nested.seg.nrrd"
    slicerio.write_segmentation(str(path), seg)
    # give the segments UTF-8 names and a comma the way Slicer writes them: raw UTF-8 in the header
    raw = path.read_bytes()
    end = raw.index(b"\n\n")
    path.write_bytes(raw[:end].replace(b":=outer\n", "{}\n".format(":=Läsion ü 病变").encode())
                     .replace(b":=inner\n", b":=core, enhancing\n") + raw[end:])
    labels, structures = read_labels(path, support)
    assert [(s.name, s.layer, s.value) for s in structures] == [("Läsion ü 病变", 0, 1), ("core, enhancing", 1, 1)]
    assert np.array_equal(structure_mask(labels, structures[1]), core)  # the nested one is there, not "absent"

    out = tmp_path / "out"
    out.mkdir()
    before = folder_state(folder)
    argv = segment_argv(data["query"], data["support"], str(path), str(out / "r.seg.nrrd"))
    argv[argv.index("--labels") + 1] = '"core, enhancing",tumour=Läsion ü 病变'
    rc, stdout, err = main_in_process(argv, capsys, monkeypatch)
    assert rc == 0, err
    assert "warning: nested.seg.nrrd: segments 'tumour' and 'core, enhancing' both have label value 1" in err
    assert folder_state(folder) == before
    assert sorted(p.name for p in out.iterdir()) == ["r.seg.nrrd"]
    written = slicerio.read_segmentation(str(out / "r.seg.nrrd"), skip_voxels=True)
    from fewshotsam2.io.volume import _seg_nrrd_names

    assert sorted(_seg_nrrd_names(out / "r.seg.nrrd").values()) == ["core, enhancing", "tumour"]
    assert sorted(int(s["labelValue"]) for s in written["segments"]) == [1, 2]


@pytest.mark.slow
def test_support_cut_in_the_querys_plane_with_a_warning(data, tmp_path, capsys, monkeypatch, real_engine):
    # the support's y spacing made the coarsest: on its own it would be cut coronally, the query axially
    folder = tmp_path / "in"
    folder.mkdir()
    for key in ("support", "labels"):
        img = sitk.ReadImage(data[key])
        img.SetSpacing((img.GetSpacing()[0], 6.0, img.GetSpacing()[2]))
        sitk.WriteImage(img, str(folder / Path(data[key]).name))
    out = tmp_path / "out"
    out.mkdir()
    argv = segment_argv(data["query"], str(folder / "support.nii.gz"), str(folder / "support_labels.nii.gz"),
                        str(out / "o.NII.GZ"))
    before = folder_state(folder)
    rc, stdout, err = main_in_process(argv, capsys, monkeypatch)
    assert rc == 0, err
    assert ("warning: support_labels.nii.gz was acquired coronal, the query axial: the support is cut in the "
            "query's axial plane too") in err
    assert folder_state(folder) == before
    assert sorted(p.name for p in out.iterdir()) == ["o.NII.GZ"]  # an upper-case extension is written too
    assert read_volume(out / "o.NII.GZ").shape == read_volume(data["query"]).shape


@pytest.mark.slow
@pytest.mark.parametrize("shape,shots,warning", [
    ("voxel", 1, "support structure 'Label 5' in tiny.nii.gz is a single voxel: SAM2 gets almost no prompt"),
    ("slice", 3, "3 shots requested but structure 5 is on 1 slices only; using all of them"),
])
def test_tiny_support_structure_is_warned(data, tmp_path, capsys, monkeypatch, real_engine, shape, shots, warning):
    labels = read_volume(data["labels"])
    tiny = np.zeros(labels.shape, np.uint8)
    k, j, i = (a // 2 for a in labels.shape)
    if shape == "voxel":
        tiny[k, j, i] = 5
    else:
        tiny[k, j - 5:j + 5, i - 5:i + 5] = 5
    folder = tmp_path / "in"
    folder.mkdir()
    sitk.WriteImage(labels.with_array(tiny).to_sitk(), str(folder / "tiny.nii.gz"))
    out = tmp_path / "out"
    out.mkdir()
    argv = segment_argv(data["query"], data["support"], str(folder / "tiny.nii.gz"), str(out / "o.nii.gz"),
                        "--shots", str(shots))
    rc, _, err = main_in_process(argv, capsys, monkeypatch)
    assert rc == 0, err
    assert err.count(f"warning: {warning}") == 1, err
    # one word about the small support, not two (the support selector's and ours)
    assert len([ln for ln in err.splitlines() if "single voxel" in ln or "shots requested" in ln]) == 1, err


@pytest.mark.slow
def test_out_of_memory_is_one_message_and_writes_nothing(data, tmp_path):
    """A real allocation failure: the run is capped (RLIMIT_AS) to 1 GB above what the loaded libraries take,
    and SAM2 at 1024 px needs more to encode a batch of slices."""
    import subprocess

    out = tmp_path / "out"
    out.mkdir()
    script = (
        "import resource, sys\n"
        "import torch, SimpleITK\n"
        "from fewshotsam2 import cli\n"
        "from fewshotsam2.run import pipeline\n"
        "from fewshotsam2.model import engine\n"
        "from fewshotsam2.io import volume, paths\n"
        "from fewshotsam2.supports import label_selection\n"
        "vm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize'))\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + 10**9, resource.RLIM_INFINITY))\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    argv = segment_argv(data["query"], data["support"], data["labels"], str(out / "o.nii.gz"), "--scores",
                        str(out / "s.csv"))
    argv[argv.index("--image-size") + 1] = "1024"
    before = folder_state(data["dir"])
    proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, encoding="utf-8",
                          env=cli_env(), timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith(ERROR + "out of memory (--image-size 1024"), lines
    assert "--slice-range" in lines[0] and "nothing was written" in lines[0]
    assert list(out.iterdir()) == [] and folder_state(data["dir"]) == before


@pytest.mark.slow
def test_sigterm_during_a_run_is_handled_like_ctrl_c(data, tmp_path):
    import signal
    import subprocess

    out = tmp_path / "out"
    out.mkdir()
    argv = [a for a in segment_argv(data["query"], data["support"], data["labels"], str(out / "o.nii.gz"))
            if a != "--quiet"]
    argv[argv.index("--image-size") + 1] = "256"
    proc = subprocess.Popen(cli_command(*argv), stderr=subprocess.PIPE, text=True, encoding="utf-8", env=cli_env())
    seen = ""
    while "prediction" not in seen:  # the progress bar: SAM2 is built and working
        chunk = proc.stderr.read(1)
        assert chunk, f"the run ended before it started encoding: {seen}"
        seen += chunk
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert rest.strip().splitlines()[-1].endswith("fewshotsam2: terminated (SIGTERM); unfinished files were removed")
    assert "Traceback" not in rest
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_sigterm_while_writing_leaves_no_temporary_file(data, tmp_path):
    """SIGTERM arrives while the label map is being compressed: the handler `cli.main` installs raises once the
    writer returns, and the temporary file is removed. The signal is sent as soon as the temporary file appears
    (not after a fixed delay, which a fast machine outruns)."""
    import signal
    import threading

    from fewshotsam2.io.volume import default_structure, write_labels

    image = read_volume(data["query"])
    big = sitk.GetArrayFromImage(sitk.Expand(image.to_sitk(), (4, 4, 40)))  # 32 M voxels: compressing takes ~1 s
    labels = read_volume(data["query"])
    labels = type(labels)((big > 0).astype(np.uint8), labels.spacing, labels.origin, labels.direction)
    seen = []
    done = threading.Event()

    def send_when_the_temporary_file_appears():
        while not done.is_set():
            tmp = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
            if tmp:
                seen.extend(tmp)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.001)

    previous = signal.signal(signal.SIGTERM, cli._raise_terminated)
    watcher = threading.Thread(target=send_when_the_temporary_file_appears, daemon=True)
    try:
        watcher.start()
        with pytest.raises(cli.Terminated):
            write_labels(tmp_path / "o.nii.gz", labels, [default_structure(1)])
    finally:
        done.set()
        watcher.join(5)
        signal.signal(signal.SIGTERM, previous)
    assert seen, "the writer never made a temporary file"
    assert list(tmp_path.iterdir()) == []  # neither the output nor the hidden .tmp- file


@pytest.mark.slow
@pytest.mark.parametrize("query,first_words", [
    ("truncated.mha", "truncated.mha: truncated"), ("truncated.nii.gz", "truncated.nii.gz: truncated"),
    ("DATA", "DATA: folder contains no DICOM series"),  # GDCM complains about every NIfTI file in it
    ("", "an empty path was given"),
])
def test_bad_query_is_one_line_as_a_process(data, bad, tmp_path, query, first_words):
    """As a process, so what C++ readers print on the stderr descriptor counts too."""
    out = tmp_path / "out"
    out.mkdir()
    before = folder_state(bad["dir"])
    query = bad.get(query) or (str(data["dir"]) if query == "DATA" else query)
    proc = run_cli(*segment_argv(query, data["support"], data["labels"], str(out / "o.nii.gz")), timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(ERROR + first_words.replace("DATA", str(data["dir"])))
    assert folder_state(bad["dir"]) == before and list(out.iterdir()) == []


def test_a_long_but_legal_output_name_is_written(data, tmp_path):
    """The temporary name is short: a name near the file system's limit (255 bytes here) still works."""
    from fewshotsam2.io.volume import default_structure, write_labels

    labels = read_volume(data["labels"])
    name = "n" * (255 - len(".seg.nrrd")) + ".seg.nrrd"
    write_labels(tmp_path / name, labels, [default_structure(5)])
    assert [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.parametrize("structures,first_words", [("liver", "--structures 'liver': give positive label values"),
                                                    ("5,5", "--structures '5,5': a label value is listed twice")])
def test_bench_structures_that_are_not_values(data, tmp_path, capsys, monkeypatch, no_engine, structures, first_words):
    refused(["bench", "--query", data["query"], "--support", data["support"], "--support-labels", data["labels"],
             "--structures", structures, "--untrained", "--image-size", "64", "--device", "cpu"],
            capsys, monkeypatch, first_words, [data["dir"]])
