"""`fewshotsam2 refine`: end to end after `segment` (the feature cache makes it encode nothing), --progress json,
and bad input (exit 2, one line, nothing written; no changed slice: exit 0, a message, nothing written)."""

from __future__ import annotations

import json
import subprocess
import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import cli_command, cli_env, crop_slices
from fewshotsam2 import cli
from fewshotsam2.io.volume import Structure, read_labels, read_volume, write_labels

MODEL = ["--untrained", "--image-size", "64", "--device", "cpu", "--method", "propagate", "--slice-range", "off"]
NAMED = [Structure(5, "liver", (0.8, 0.4, 0.3)), Structure(1, "spleen", (0.6, 0.2, 0.2))]


@pytest.fixture(scope="module")
def files(tmp_path_factory, ct_a):
    """ct-a slices 10-19 as the query, ct-a as the support; the first run's result and edited copies of it."""
    d = tmp_path_factory.mktemp("refine")
    image, labels, _ = ct_a
    query = crop_slices(image, 10, 20)
    sitk.WriteImage(query.to_sitk(), str(d / "query.nii.gz"))
    support_labels = labels.with_array(np.where(np.isin(labels.array, (1, 5)), labels.array, 0).astype(np.uint8))
    write_labels(d / "support.seg.nrrd", support_labels, NAMED)
    sitk.WriteImage(image.to_sitk(), str(d / "support.nii.gz"))
    return d, query, crop_slices(labels, 10, 20)


def _main(argv, capsys, engine64):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = cli.main([str(a) for a in argv], engine_factory=lambda options: engine64)
    out, err = capsys.readouterr()
    return rc, out, err


def _segment(files, capsys, engine64, cache):
    d, query, _ = files
    out = d / "first.seg.nrrd"
    if not out.exists():
        rc, _, err = _main(["segment", "--query", d / "query.nii.gz", "--support", d / "support.nii.gz",
                            d / "support.seg.nrrd", "--labels", "liver,spleen", "--out", out, "--quiet",
                            "--feature-cache", cache, *MODEL], capsys, engine64)
        assert rc == 0, err
    return out


def _edited(files, first, name, edit):
    d, query, truth = files
    labels, structures = read_labels(first, query)
    array = labels.array.copy()
    edit(array, truth.array)
    path = d / name
    write_labels(path, labels.with_array(array), structures)
    return path


def _refine(files, first, corrected, out, *extra):
    d, _, _ = files
    return ["refine", "--query", d / "query.nii.gz", "--support", d / "support.nii.gz", d / "support.seg.nrrd",
            "--previous", first, "--corrected", corrected, "--out", out, *MODEL, *extra]


def _set_liver(array, truth, k=5):
    # the true liver, drawn only where no other structure is (a stroke over another segment changes that one too)
    array[k][array[k] == 5] = 0
    array[k][(truth[k] == 5) & (array[k] == 0)] = 5


def test_refine_after_segment_reads_every_slice_from_the_cache(files, capsys, engine64, tmp_path):
    cache = tmp_path / "features"
    first = _segment(files, capsys, engine64, cache)
    corrected = _edited(files, first, "edited.seg.nrrd", _set_liver)
    out = tmp_path / "refined.seg.nrrd"
    rc, stdout, err = _main(_refine(files, first, corrected, out, "--feature-cache", cache, "--progress", "json"),
                            capsys, engine64)
    assert rc == 0, err
    events = [json.loads(line) for line in stdout.splitlines()]
    done = events[-1]
    assert done["event"] == "done" and done["changed"] is True
    assert done["encoder_calls"] == 0 and done["cache_hits"] > 0
    assert done["corrected_slices"] == {"liver": [5]}
    assert done["predicted_slices"] == {"liver": 9}  # by default every other slice (the approximation is opt-in)
    assert any(e["event"] == "progress" and "liver: Refining slice" in e["stage"] for e in events)
    query = files[1]
    refined, structures = read_labels(out, query)
    edited, _ = read_labels(corrected, query)
    assert sorted(s.name for s in structures) == ["liver", "spleen"]
    assert refined.array[5].tobytes() == edited.array[5].tobytes()  # the corrected slice, as drawn
    previous, _ = read_labels(first, query)
    np.testing.assert_array_equal(refined.array == 1, previous.array == 1)  # spleen was not corrected


def test_no_changed_slice_writes_nothing(files, capsys, engine64, tmp_path):
    first = _segment(files, capsys, engine64, tmp_path / "features")
    out = tmp_path / "refined.nii.gz"
    rc, stdout, err = _main(_refine(files, first, first, out, "--feature-cache", "off"), capsys, engine64)
    assert rc == 0 and "nothing to refine" in stdout and not out.exists()
    corrected = _edited(files, first, "edited-elsewhere.seg.nrrd", _set_liver)
    rc, stdout, _ = _main(_refine(files, first, corrected, out, "--slices", "3", "--feature-cache", "off"), capsys,
                          engine64)
    assert rc == 0 and "nothing to refine" in stdout and not out.exists()


def _bad(files, capsys, engine64, argv, match, out):
    rc, stdout, err = _main(argv, capsys, engine64)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fewshotsam2: error:") and match in lines[0], err
    assert not out.exists()


def test_bad_input(files, capsys, engine64, tmp_path):
    d, query, truth = files
    first = _segment(files, capsys, engine64, tmp_path / "features")
    out = tmp_path / "refined.nii.gz"
    # corrections on another grid than the query
    labels, structures = read_labels(first, query)
    other = crop_slices(labels, 0, 9)
    write_labels(tmp_path / "other.nii.gz", other, structures)
    _bad(files, capsys, engine64, _refine(files, first, tmp_path / "other.nii.gz", out), "not on the query's grid",
         out)
    _bad(files, capsys, engine64, _refine(files, tmp_path / "other.nii.gz", first, out),
         "previous result", out)
    # a corrected segment that is not in the previous result
    extra = labels.array.copy()
    extra[4, :5, :5] = 7
    write_labels(tmp_path / "extra.seg.nrrd", labels.with_array(extra), structures + [Structure(7, "kidney", (0.1, 0.9, 0.1))])
    _bad(files, capsys, engine64, _refine(files, first, tmp_path / "extra.seg.nrrd", out), "'kidney'", out)
    # an edit that removes a whole structure
    gone = _edited(files, first, "gone.seg.nrrd", lambda a, t: a.__setitem__(a == 5, 0))
    _bad(files, capsys, engine64, _refine(files, first, gone, out), "remove the whole of 'liver'", out)
    # reverse needs the first run's conditional slices
    corrected = _edited(files, first, "edited2.seg.nrrd", _set_liver)
    argv = _refine(files, first, corrected, out)
    argv[argv.index("propagate")] = "reverse"
    _bad(files, capsys, engine64, argv, "--previous-scores", out)
    _bad(files, capsys, engine64, _refine(files, first, corrected, out, "--slices", "5,x"), "--slices", out)
    _bad(files, capsys, engine64, _refine(files, first, corrected, out, "--slices", "99"), "outside", out)
    _bad(files, capsys, engine64, _refine(files, first, corrected, out, "--stop-after-agreeing", "-1"),
         "--stop-after-agreeing", out)
    _bad(files, capsys, engine64, _refine(files, first, corrected, out, "--agreement", "1.5"), "--agreement", out)


@pytest.mark.slow  # subprocesses
def test_two_processes_sharing_the_cache_give_the_result_of_one(files, tmp_path):
    d, _, _ = files

    def start(out, cache):
        return subprocess.Popen(
            cli_command("segment", "--query", d / "query.nii.gz", "--support", d / "support.nii.gz",
                        d / "support.seg.nrrd", "--labels", "liver", "--out", out, "--quiet", "--feature-cache", cache,
                        *MODEL),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=tmp_path)

    shared = tmp_path / "shared-cache"
    pair = [start(tmp_path / f"{name}.nii.gz", shared) for name in ("a", "b")]  # at once, one cache
    for p in pair:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    alone = start(tmp_path / "alone.nii.gz", tmp_path / "own-cache")
    again = start(tmp_path / "again.nii.gz", shared)  # every slice from the shared cache
    for p in (alone, again):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    arrays = [sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{n}.nii.gz"))) for n in ("a", "b", "alone",
                                                                                              "again")]
    for a in arrays[1:]:
        np.testing.assert_array_equal(a, arrays[0])
    assert not [p for p in shared.iterdir() if p.name.startswith(".tmp-")]  # no half-written entry left
    # 10 query slices; the support slice (ct-a itself) has the pixels of one of them: one entry
    assert len([p for p in shared.iterdir() if p.suffix == ".pt"]) == 10
