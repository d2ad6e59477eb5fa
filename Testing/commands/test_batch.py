"""`fewshotsam2 batch`: a local cohort of 3 real cases (random-weight SAM2 at 64 px), support slices encoded once,
resuming after a kill, the folder form, a failing case, and bad manifests (exit 2 before any work)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import cli_command, cli_env, crop_slices, folder_state
from fewshotsam2 import cli
from fewshotsam2.commands.batch import SUMMARY_NAME, read_summary, record_path
from fewshotsam2.io.volume import read_labels, read_volume

# every query slice segmented (the command line's default range, auto, depends on AlexNet weights being found)
# the listing order settles overlaps: Ray's workers run with other thread counts than this process, and under the
# default --overlap logits a voxel two structures claim with logits equal to float precision could go either way
MODEL = ["--untrained", "--image-size", "64", "--device", "cpu", "--slice-range", "off", "--overlap", "order", "--quiet"]
HEADER = "query,support_image,support_labels,labels,output"
# rows: a small MR crop first, then the whole 20-slice ct-b DICOM series (the slowest case), then a CT crop with
# two structures; outputs in three formats
OUTPUTS = ("out/mr.nii.gz", "out/ct-b.nrrd", "out/spleen.seg.nrrd")


def _run(argv, capsys, monkeypatch, engine=None):
    """cli.main in-process; `engine`: the session's 64 px engine instead of building one (same settings)."""
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() replaces it; restore after
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = cli.main(argv, engine_factory=(lambda options: engine) if engine is not None else None)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, shared_dir):
    """queries/ (two crops and a link to the ct-b DICOM folder), the ct-a support, and cohort.csv with relative
    query paths and an absolute support."""
    d = tmp_path_factory.mktemp("cohort")
    data = shared_dir / "data"
    q = d / "queries"
    q.mkdir()
    mr = read_volume(data / "abdomen-mr" / "image.nii.gz")
    sitk.WriteImage(crop_slices(mr, 8, 11).to_sitk(), str(q / "mr.nii.gz"))
    spleen = read_volume(data / "spleen-ct" / "image.nii.gz")
    sitk.WriteImage(crop_slices(spleen, 11, 14).to_sitk(), str(q / "spleen.nii.gz"))
    os.symlink(data / "abdomen-ct" / "ct-b" / "dicom", q / "ct-b")
    support = (str(data / "abdomen-ct" / "ct-a" / "image.nii.gz"), str(data / "abdomen-ct" / "ct-a" / "labels.nii.gz"))
    rows = [("queries/mr.nii.gz", "1", OUTPUTS[0]), ("queries/ct-b", "1", OUTPUTS[1]),
            ("queries/spleen.nii.gz", '"1,5"', OUTPUTS[2])]
    text = HEADER + "\n" + "".join(f"{qp},{support[0]},{support[1]},{lab},{out}\n" for qp, lab, out in rows)
    (d / "cohort.csv").write_text(text)
    return {"dir": d, "manifest": d / "cohort.csv", "support": support, "text": text,
            "queries": [d / r[0] for r in rows]}


@pytest.fixture(scope="module")
def local_run(cohort):
    """The local batch over the cohort, run once: (exit code, stdout, summary rows, outputs by row)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        warnings.simplefilter("ignore")
        rc = cli.main(["batch", "--manifest", str(cohort["manifest"]), *MODEL])
    assert rc == 0, err.getvalue()
    summary = read_summary(str(cohort["dir"] / "out" / SUMMARY_NAME))
    labels = [sitk.GetArrayFromImage(sitk.ReadImage(str(cohort["dir"] / o))) for o in OUTPUTS]
    return rc, out.getvalue(), summary, labels


@pytest.mark.slow
def test_local_batch_writes_each_output_on_its_querys_grid(cohort, local_run):
    rc, stdout, summary, labels = local_run
    assert "3 cases: 3 ok, 0 skipped, 0 failed" in stdout and SUMMARY_NAME in stdout
    assert [r["status"] for r in summary] == ["ok"] * 3 and [r["error"] for r in summary] == [""] * 3
    assert [r["case"] for r in summary] == ["mr", "ct-b", "spleen"]
    assert all(float(r["seconds"]) > 0 and float(r["peak_memory_mb"]) > 0 for r in summary)
    for query, output, allowed in zip(cohort["queries"], OUTPUTS, ({0, 1}, {0, 1}, {0, 1, 5})):
        result, _ = read_labels(cohort["dir"] / output, read_volume(query))
        written = read_volume(cohort["dir"] / output)  # the file's own grid, not resampled
        assert written.same_grid(read_volume(query)), output
        assert set(np.unique(result.array).tolist()) <= allowed
    assert sorted(p.name for p in (cohort["dir"] / "out").iterdir()) == sorted(
        [Path(o).name for o in OUTPUTS] + [record_path(o).name for o in OUTPUTS] + [SUMMARY_NAME])  # no temporary


@pytest.mark.slow
def test_support_slices_are_encoded_once_for_the_cohort(cohort, local_run):
    """encoder calls = every query slice + every distinct support slice, not x cases."""
    from fewshotsam2.slicing.slices import SlicePlan
    from fewshotsam2.slicing.support import select_support_slices

    image = read_volume(cohort["support"][0])
    labels, _ = read_labels(cohort["support"][1], image)
    plan = SlicePlan.for_volume(image, "auto")
    stack = plan.stack(labels.array)
    spleen, liver = set(select_support_slices(stack, 1, 1)), set(select_support_slices(stack, 5, 1))
    query_slices = [SlicePlan.for_volume(read_volume(q), "auto").n_slices for q in cohort["queries"]]
    calls = [int(r["encoder_calls"]) for r in local_run[2]]
    assert calls == [query_slices[0] + len(spleen), query_slices[1], query_slices[2] + len(liver - spleen)]
    assert sum(calls) == sum(query_slices) + len(spleen | liver)


@pytest.mark.slow
def test_batch_output_equals_a_separate_segment_run(cohort, local_run, tmp_path, capsys, monkeypatch, engine64):
    """Reused support features change nothing: the third case alone, by `segment`, gives the same labels."""
    out = tmp_path / "spleen.seg.nrrd"
    rc, _, err = _run(["segment", "--query", str(cohort["queries"][2]), "--support", *cohort["support"],
                       "--labels", "1,5", "--out", str(out), *MODEL], capsys, monkeypatch, engine64)
    assert rc == 0, err
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), local_run[3][2])


@pytest.mark.slow
def test_killed_batch_resumes_where_it_stopped(cohort, local_run, tmp_path, capsys, monkeypatch, engine64):
    """SIGKILL once the first output exists (the second case, the 20-slice DICOM, is running); the re-run skips
    the first case, does the others, and gives the same outputs as the uninterrupted run."""
    out_dir = tmp_path / "resumed"
    proc = subprocess.Popen(cli_command("batch", "--manifest", cohort["manifest"], "--out-dir", out_dir, *MODEL),
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out_dir / OUTPUTS[0]
    done = record_path(first)  # written after the output's rename: the case is complete (resumable) from then on
    deadline = time.monotonic() + 240
    while not done.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert first.exists() and done.exists(), proc.stderr.read().decode()
    written = sorted(p.name for p in (out_dir / "out").iterdir())
    assert written in (sorted(["mr.nii.gz", done.name]), sorted(["mr.nii.gz", done.name, SUMMARY_NAME])), written
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(first))), local_run[3][0])

    rc, stdout, err = _run(["batch", "--manifest", str(cohort["manifest"]), "--out-dir", str(out_dir), *MODEL],
                           capsys, monkeypatch, engine64)
    assert rc == 0, err
    summary = read_summary(str(out_dir / SUMMARY_NAME))
    assert [r["status"] for r in summary] == ["skipped", "ok", "ok"]
    assert int(summary[0]["encoder_calls"]) == 0
    for output, expected in zip(OUTPUTS, local_run[3]):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out_dir / output))), expected)
    assert sorted(p.name for p in (out_dir / "out").iterdir()) == sorted(
        [Path(o).name for o in OUTPUTS] + [record_path(o).name for o in OUTPUTS])


@pytest.mark.slow
def test_folder_form_and_a_failing_case(cohort, local_run, tmp_path, capsys, monkeypatch, engine64):
    """--queries DIR: one case per scan; an unreadable scan fails alone (exit 1, its error in the summary)."""
    q = tmp_path / "queries"
    q.mkdir()
    for src in cohort["queries"][:2]:
        os.symlink(src, q / src.name)
    (q / "broken.nii.gz").write_bytes(b"not an image\n" * 20)
    (q / "notes.txt").write_text("not a scan, not picked up")
    out_dir = tmp_path / "segs"
    rc, stdout, err = _run(["batch", "--queries", str(q), "--support", *cohort["support"], "--labels", "1",
                            "--out-dir", str(out_dir), *MODEL], capsys, monkeypatch, engine64)
    assert rc == 1, err
    assert "3 cases: 2 ok, 0 skipped, 1 failed" in stdout
    assert "broken" in err and "failed" in err
    summary = {r["case"]: r for r in read_summary(str(out_dir / SUMMARY_NAME))}
    assert set(summary) == {"broken", "ct-b", "mr"}
    assert summary["broken"]["status"] == "failed" and "broken.nii.gz" in summary["broken"]["error"]
    assert summary["broken"]["encoder_calls"] == "0"
    for name, expected in (("mr", local_run[3][0]), ("ct-b", local_run[3][1])):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out_dir / f"{name}.nii.gz"))),
                                      expected)
    assert not (out_dir / "broken.nii.gz").exists()


def test_engine_keeps_chosen_features_across_runs_by_pixel_content(engine64):
    """keep_features: a kept frame's pixels under any key in a later run are not encoded again; other pixels
    are; frames not chosen are forgotten by reset(); None forgets everything kept."""
    import torch

    rng = np.random.default_rng(0)
    support, other, query = (rng.random((40, 50), dtype=np.float32) for _ in range(3))
    engine = engine64
    engine.reset()
    engine.keep_features(lambda key: key[0] == "support")
    try:
        engine.add_frames({("support", 0, 7): support, ("query", 0): query})
        engine.encode([("support", 0, 7), ("query", 0)])
        assert engine.encoder_calls == 2
        first = [f.clone() for f in engine._features[("support", 0, 7)]]
        engine.reset()
        engine.add_frames({("support", 1, 3): support, ("support", 0, 7): other, ("query", 0): query})
        engine.encode([("support", 1, 3)])
        assert engine.encoder_calls == 0  # same pixels, another key: reused
        assert all(torch.equal(a, b) for a, b in zip(first, engine._features[("support", 1, 3)]))
        engine.encode([("support", 0, 7), ("query", 0)])
        assert engine.encoder_calls == 2  # other pixels under the old key, and the query (not kept), encoded
        engine.keep_features(None)
        engine.reset()
        engine.add_frames({("support", 0, 0): support})
        engine.encode([("support", 0, 0)])
        assert engine.encoder_calls == 1
    finally:
        engine.keep_features(None)
        engine.reset()


# ------------------------------------------------------------------------------------------- bad manifests

def _bad_manifests(support, folder):
    img, lab = support
    sp = Path(img).parent.parent.parent / "spleen-ct"  # spleen only
    good = f"queries/mr.nii.gz,{img},{lab},1,out/a.nii.gz"
    return {
        "missing column": ("query,support_image,support_labels,labels\nqueries/mr.nii.gz,a,b,1\n",
                           "header: missing column(s) output"),
        "unknown column": (HEADER + ",notes\n" + good + ",x\n", "header: unknown column(s) notes"),
        "only a header": (HEADER + "\n", "no cases"),
        "cell count": (HEADER + "\n" + good + "\n" + good.replace(",1,", ",1,2,") + "\n", "row 3: 6 cells"),
        "empty query": (HEADER + "\n" + good + "\n" + f",{img},{lab},1,out/b.nii.gz\n", "row 3: the query cell"),
        "missing query": (HEADER + "\n" + good + "\n" + f"queries/nope.nii.gz,{img},{lab},1,out/b.nii.gz\n",
                          "row 3: query"),
        "missing support labels": (HEADER + "\n" + f"queries/mr.nii.gz,{img},{lab}.missing,1,out/a.nii.gz\n",
                                   "row 2: support labels"),
        "unpaired supports": (HEADER + "\n" + f"queries/mr.nii.gz,{img};{img},{lab},1,out/a.nii.gz\n",
                              "row 2: 2 support images for 1"),
        "unknown label": (HEADER + "\n" + good + "\n" + f"queries/mr.nii.gz,{img},{lab},250,out/b.nii.gz\n",
                          "row 3: label '250' is absent"),
        # the one support rule: a support may hold only some labels, but each label needs one support
        "label missing from every support": (
            HEADER + "\n" + f'queries/mr.nii.gz,{img};{sp}/image.nii.gz,{lab};{sp}/labels.nii.gz,"1,250",out/a.nii.gz\n',
            "row 2: label '250' is absent from every support"),
        "empty labels": (HEADER + "\n" + f"queries/mr.nii.gz,{img},{lab},,out/a.nii.gz\n", "row 2: the labels cell"),
        "output format": (HEADER + "\n" + f"queries/mr.nii.gz,{img},{lab},1,out/a.png\n", "row 2: output"),
        "output is an input": (HEADER + "\n" + good + "\n" + f"queries/spleen.nii.gz,{img},{lab},1,{folder}/queries/mr.nii.gz\n",
                               "row 3: output"),
        "same output twice": (HEADER + "\n" + good + "\n" + good + "\n", "row 3: output"),
    }


@pytest.mark.parametrize("problem", list(_bad_manifests(("i", "l"), "d")))
def test_bad_manifest_exits_2_before_any_work(cohort, problem, tmp_path, capsys, monkeypatch):
    text, message = _bad_manifests(cohort["support"], cohort["dir"])[problem]
    manifest = cohort["dir"] / f"bad-{problem.replace(' ', '-')}.csv"
    before = folder_state(cohort["dir"])
    manifest.write_text(text)
    out_dir = tmp_path / "never"
    rc, stdout, err = _run(["batch", "--manifest", str(manifest), "--out-dir", str(out_dir), *MODEL],
                           capsys, monkeypatch)
    manifest.unlink()
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fewshotsam2: error: "), err
    assert message in lines[0] and manifest.name in lines[0], lines[0]
    assert stdout == ""
    assert not out_dir.exists()  # nothing written, not even the output folder
    assert folder_state(cohort["dir"]) == before


@pytest.mark.parametrize("argv, message", [
    (["--queries", "{q}", "--labels", "1", "--out-dir", "{o}"], "--queries needs at least one --support"),
    (["--queries", "{q}", "--support", "{i}", "{l}", "--out-dir", "{o}"], "--queries needs --labels"),
    (["--queries", "{o}", "--support", "{i}", "{l}", "--labels", "1", "--out-dir", "{o}"], "no such folder"),
    (["--manifest", "{m}", "--support", "{i}", "{l}"], "--support belongs to --queries"),
    (["--manifest", "{m}", "--workers", "2"], "--workers needs --ray"),
    (["--manifest", "{m}", "--ray", "local", "--workers", "0"], "--workers must be at least 1"),
])
def test_bad_batch_options_exit_2(cohort, argv, message, tmp_path, capsys, monkeypatch):
    fill = {"q": str(cohort["dir"] / "queries"), "o": str(tmp_path / "none"), "i": cohort["support"][0],
            "l": cohort["support"][1], "m": str(cohort["manifest"])}
    rc, _, err = _run(["batch", *[a.format(**fill) for a in argv], *MODEL], capsys, monkeypatch)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "none").exists()


def test_ray_without_ray_installed_says_how_to_install(cohort, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where Ray is not installed
    rc, _, err = _run(["batch", "--manifest", str(cohort["manifest"]), "--out-dir", str(tmp_path / "o"),
                       "--ray", "local", *MODEL], capsys, monkeypatch)
    assert rc == 2 and "pip install 'fewshotsam2[ray]'" in err, err
    assert not (tmp_path / "o").exists()


def test_overlap_allow_needs_seg_nrrd_outputs_before_any_work(cohort, tmp_path, capsys, monkeypatch):
    # the cohort writes .nii.gz and .nrrd too: --overlap allow (layers) refuses the batch, nothing is written
    out_dir = tmp_path / "never"
    rc, stdout, err = _run(["batch", "--manifest", str(cohort["manifest"]), "--out-dir", str(out_dir), *MODEL,
                            "--overlap", "allow"], capsys, monkeypatch)
    assert rc == 2 and stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fewshotsam2: error: --overlap allow"), err
    assert "row 2: output" in lines[0] and "mr.nii.gz" in lines[0] and ".seg.nrrd" in lines[0]
    assert not out_dir.exists()
