"""`evaluate`: case discovery and manifests, the protocols' support selection, the output files (with a fake
`segment` whose answers are known), resuming an interrupted run, and one real end-to-end run with random weights."""

import argparse
import csv
import math

import numpy as np
import pytest
import SimpleITK as sitk

from fewshotsam2.research import evaluate as E
from fewshotsam2.research import metrics as M
from fewshotsam2.run import pipeline
from fewshotsam2.errors import InputError
from fewshotsam2.io.volume import Structure, Volume

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_csv(path):
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    return lines[0], [r for r in csv.DictReader(ln for ln in lines if not ln.startswith("#"))]


# ------------------------------------------------------------------ synthetic cases


def write_case(folder, labels_kji, spacing_ijk=(0.8, 1.0, 2.5), flip_k=False, image_name="image.nii.gz"):
    """Image = labels * 100 (so a fake segmenter can read the truth off the image), geometry kept."""
    folder.mkdir(parents=True, exist_ok=True)
    direction = np.eye(3)
    if flip_k:
        direction[2, 2] = -1.0
    for name, arr in ((image_name, labels_kji.astype(np.int16) * 100), ("labels.nii.gz", labels_kji.astype(np.uint8))):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(spacing_ijk)
        img.SetDirection(tuple(direction.reshape(-1)))
        img.SetOrigin((10.0, -5.0, 3.0))
        sitk.WriteImage(img, str(folder / name))
    return folder


def synthetic_labels(shift_k=0):
    lab = np.zeros((10, 12, 14), np.uint8)
    lab[2 + shift_k: 8 + shift_k, 3:9, 4:10] = 1  # 6 slices along k, 6 voxels along i
    lab[4:6, 1:3, 1:3] = 2
    return lab


def fake_segment_factory(calls, fail_on_call=None):
    """A stand-in for pipeline.segment: the truth (read off the image) shifted one voxel along i, so every
    structure's Dice is (a - 1) / a for a box a voxels wide along i; within-volume (support image is the query)
    it predicts nothing on the support slices, which the evaluation must exclude."""

    def fake(query, supports, structures, options, progress=None, engine=None):
        calls.append((options.method, [s.value for s in structures]))
        if fail_on_call is not None and len(calls) == fail_on_call:
            raise KeyboardInterrupt
        if progress:
            progress("fake", 1, 1)
        from fewshotsam2.slicing.slices import SlicePlan
        from fewshotsam2.slicing.support import select_support_slices

        plan = SlicePlan.for_volume(query, options.axis)
        s_plan = SlicePlan.for_volume(supports[0].image, options.axis)
        axis = plan.array_axis
        truth = query.array // 100
        out = np.zeros(query.array.shape, np.uint8)
        scores, forward, used = [], {}, []
        for s in structures:
            pred = np.roll(truth == s.value, 1, axis=2)
            # the support slices "used": as the core picks them; within-volume nothing is predicted on them
            for i in select_support_slices(s_plan.stack(supports[0].labels.array), s.value, options.shots):
                used.append(pipeline.UsedSupportSlice(s.value, 0, i, s_plan.slice_index_to_array_index(i)))
                if supports[0].image is query:
                    np.moveaxis(pred, axis, 0)[used[-1].array_index] = False
            out[pred & (out == 0)] = s.value
            forward[s.value] = pred
            for k in range(query.array.shape[axis]):
                match = pipeline.LpipsMatch(0, k % 4, s_plan.slice_index_to_array_index(k % 4), 0)
                scores.append(pipeline.SliceScore(s.name, s.value, k, plan.array_index_to_slice_index(k),
                                                  0.1 * (k % 10), True, k % 3 == 0, match))
        return pipeline.SegmentationResult(query.with_array(out), list(structures), scores, 7,
                                           {"encode": 0.0}, axis, forward if options.method == "reverse" else {},
                                           used, plan, [s_plan])

    return fake


@pytest.fixture
def synthetic_cases(tmp_path):
    root = tmp_path / "data"
    write_case(root / "group" / "a", synthetic_labels(0))
    write_case(root / "group" / "b", synthetic_labels(1))
    write_case(root / "c", synthetic_labels(2), image_name="image.nrrd")
    return root


# ------------------------------------------------------------------ cases and manifests


def test_discover_cases_on_shared_data(shared_dir):
    cases = E.resolve_cases([str(shared_dir / "data")])
    names = [c.name for c in cases]
    for expected in ("abdomen-ct/ct-a", "abdomen-ct/ct-b", "abdomen-mr", "spleen-ct", "brain-mr/ibsr-01"):
        assert expected in names
    ctb = next(c for c in cases if c.name == "abdomen-ct/ct-b")
    assert ctb.image.name == "dicom" and ctb.image.is_dir()
    single = E.resolve_cases([str(shared_dir / "data" / "abdomen-mr")])
    assert [c.name for c in single] == ["abdomen-mr"]


def test_manifest_parsing(tmp_path, synthetic_cases):
    m = tmp_path / "cases.csv"
    m.write_text("# my cases\nname,image,labels\n\n"
                 "first,data/group/a/image.nii.gz,data/group/a/labels.nii.gz\n"
                 ",data/c/image.nrrd,data/c/labels.nii.gz\n", encoding="utf-8")
    cases = E.resolve_cases([str(m)])
    assert [c.name for c in cases] == ["first", "c"]  # empty name -> the image's folder name
    assert cases[0].image == (synthetic_cases / "group" / "a" / "image.nii.gz").resolve()
    t = tmp_path / "cases.tsv"
    t.write_text("image\tlabels\ndata/group/b/image.nii.gz\tdata/group/b/labels.nii.gz\n", encoding="utf-8")
    assert [c.name for c in E.resolve_cases([str(t)])] == ["b"]


@pytest.mark.parametrize("text, message", [
    ("name,image\nx,data/c/image.nrrd\n", "header"),
    ("image,labels\ndata/c/image.nrrd,data/c/nope.nii.gz\n", "does not exist"),
    ("image,labels\ndata/c/image.nrrd,\n", "lacks"),
    ("# only a comment\n", "empty"),
])
def test_manifest_errors(tmp_path, synthetic_cases, text, message):
    m = tmp_path / "bad.csv"
    m.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        E.resolve_cases([str(m)])


def test_duplicate_case_names_and_missing_paths(tmp_path, synthetic_cases):
    with pytest.raises(InputError, match="unique"):
        E.resolve_cases([str(synthetic_cases / "c"), str(synthetic_cases / "c")])
    with pytest.raises(InputError, match="no such"):
        E.resolve_cases([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no case folders"):
        E.resolve_cases([str(tmp_path / "empty")])


def test_parse_structures_and_methods():
    available = [Structure(1, "Label 1", (1.0, 0.0, 0.0))]
    s = E.parse_structures("spleen=1,5", available)
    assert [(x.value, x.name) for x in s] == [(1, "spleen"), (5, "Label 5")]
    assert E.parse_structures(None, available) == available
    for bad in ("x", "a=0", "1,1"):
        with pytest.raises(InputError):
            E.parse_structures(bad, available)
    assert E.parse_methods("reverse, lpips") == ["reverse", "lpips"]
    with pytest.raises(InputError):
        E.parse_methods("reverse,magic")


# ------------------------------------------------------------------ protocols' support selection


def test_cross_subject_pairs():
    assert E.cross_subject_pairs(["a", "b", "c"]) == [("a", "b"), ("a", "c"), ("b", "a"), ("b", "c"),
                                                      ("c", "a"), ("c", "b")]
    assert E.cross_subject_pairs(["a", "b", "c"], "b") == [("a", "b"), ("c", "b")]
    with pytest.raises(InputError):
        E.cross_subject_pairs(["a", "b"], "z")
    with pytest.raises(InputError):
        E.cross_subject_pairs(["a"])


def volume_of(labels, flip_k=False):
    direction = np.eye(3)
    if flip_k:
        direction[2, 2] = -1.0
    return Volume(labels, (0.8, 1.0, 2.5), (0.0, 0.0, 0.0), direction)


@pytest.mark.parametrize("shots, flip_k, expected", [
    (1, False, [5]),  # label 1 on k = 2..7: labeled slices [2..7], the middle one present[6 // 2] = 5
    (3, False, [2, 4, 7]),  # positions round(linspace(0, 5, 3)) = 0, 2, 5 -> k = 2, 4, 7
    (1, True, [4]),  # k points inferior: stack order is reversed, stack [2..7] -> middle stack 5 -> k = 9 - 5
])
def test_within_volume_support_selection(shots, flip_k, expected):
    labels = volume_of(synthetic_labels(0), flip_k)
    image = labels.with_array(labels.array.astype(np.int16) * 100)
    support = E.within_volume_support(image, labels, [1, 2], shots)
    kept = support.labels.array  # the coarsest spacing (2.5 mm) is k: slices are k planes
    chosen = {v: [k for k in range(kept.shape[0]) if (kept[k] == v).any()] for v in (1, 2)}
    assert chosen[1] == expected
    for k in range(kept.shape[0]):
        on = k in chosen[1]
        assert np.array_equal(kept[k] == 1, (labels.array[k] == 1) if on else np.zeros_like(kept[k], bool))
    assert set(np.unique(kept[kept != 0])) <= {1, 2}
    assert np.count_nonzero(kept == 2) == sum(np.count_nonzero(labels.array[k] == 2) for k in chosen[2])
    assert support.image is image


def test_evaluate_result_excludes_slices_and_restricts_to_extent():
    truth = np.zeros((10, 8, 8), np.uint8)
    truth[3:6, 2:6, 2:6] = 1
    pred = truth.copy()
    pred[8, 2:6, 2:6] = 1  # a false positive outside the labeled extent
    pred[4] = 0  # a missed slice inside it
    tv = volume_of(truth)
    result = pipeline.SegmentationResult(tv.with_array(pred), [], slice_axis=0)
    keep = np.ones(10, bool)
    keep[4] = False  # as if slice 4 were a within-volume support slice
    row = E.evaluate_result(result, tv, 1, keep)
    assert row["n_eval_slices"] == 9 and row["n_extent_slices"] == 2
    assert (row["tp"], row["fp"], row["fn"]) == (32, 16, 0)
    assert row["dice"] == pytest.approx(64 / 80)
    assert (row["tp_extent"], row["fp_extent"], row["fn_extent"]) == (32, 0, 0)
    assert row["dice_extent"] == 1.0 and row["hd95_extent_mm"] == 0.0
    row_all = E.evaluate_result(result, tv, 1)
    assert (row_all["tp"], row_all["fp"], row_all["fn"]) == (32, 16, 16)
    assert row_all["vol_true_ml"] == pytest.approx(48 * 0.8 * 1.0 * 2.5 / 1000)


# ------------------------------------------------------------------ the whole evaluation with a fake segment


def run_fake(monkeypatch, cases, out, calls, fail_on_call=None, **kw):
    cfg = E.EvaluationConfig(cases=E.resolve_cases([str(cases)]), output=out, show_progress=False,
                             options={"image_size": 256, "untrained": kw.pop("untrained", False)}, **kw)
    return E.run_evaluation(cfg, engine=object(), segment=fake_segment_factory(calls, fail_on_call))


def test_cross_subject_outputs_with_known_answers(monkeypatch, tmp_path, synthetic_cases):
    calls = []
    out = run_fake(monkeypatch, synthetic_cases, tmp_path / "out", calls, structures="box=1,2")
    first, rows = read_csv(out.cases_csv)
    assert first.startswith("protocol,")  # trained run: no banner
    assert len(rows) == 3 * 2 * 3 * 2  # 3 queries x 2 supports x 3 methods x 2 structures
    assert len(calls) == 36 and all(len(v) == 1 for _, v in calls)  # one call per structure (1-way)
    for r in rows:
        a = 6 if r["value"] == "1" else 2  # box width along i
        assert float(r["dice"]) == pytest.approx((a - 1) / a)
        assert float(r["vol_err_pct"]) == pytest.approx(0.0)  # np.roll keeps the volume
        assert r["structure"] == ("box" if r["value"] == "1" else "Label 2")
    _, summary = read_csv(out.summary_csv)
    assert [(r["structure"], r["method"]) for r in summary] == [
        (s, m) for s in ("box", "Label 2", E.MEAN_ROW) for m in E.METHOD_NAMES]
    box_rows = [r for r in rows if r["value"] == "1" and r["method"] == "reverse"]
    tp, fp, fn = (sum(int(r[k]) for r in box_rows) for k in ("tp", "fp", "fn"))
    s_box = next(r for r in summary if r["structure"] == "box" and r["method"] == "reverse")
    assert float(s_box["dice_global"]) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert int(s_box["n"]) == 6
    s_mean = next(r for r in summary if r["structure"] == E.MEAN_ROW and r["method"] == "reverse")
    assert float(s_mean["dice_mean"]) == pytest.approx((5 / 6 + 1 / 2) / 2)
    md = out.summary_md.read_text(encoding="utf-8")
    assert "global" in md and "labeled extent" in md and "per-case mean" in md
    _, slices = read_csv(out.slices_csv)
    assert len(slices) == len(rows) * 10  # every slice of every query
    rev = [r for r in slices if r["method"] == "reverse"]
    assert all(r["forward_dice"] not in ("", "nan") and r["score"] != "" for r in rev)
    lp = [r for r in slices if r["method"] == "lpips"]
    assert all(r["matched_slice"] != "" for r in lp)
    for name in ("dice.png", "reverse_pi_vs_dice.png", "lpips_matching.png"):
        assert (out.folder / "plots" / name).read_bytes()[:8] == PNG_MAGIC


def test_within_volume_excludes_support_slices(monkeypatch, tmp_path, synthetic_cases):
    calls = []
    out = run_fake(monkeypatch, synthetic_cases, tmp_path / "out", calls, structures="1", protocol="within-volume",
                   methods=["propagate"], shots=1)
    _, rows = read_csv(out.cases_csv)
    assert [r["support"] for r in rows] == ["self"] * 3
    for r in rows:
        # the fake predicts nothing on the support slice: excluded, so the Dice is that of the shift alone
        assert r["n_eval_slices"] == "9" and len(r["support_slices"].split(";")) == 1
        assert float(r["dice"]) == pytest.approx(5 / 6)
        assert int(r["n_extent_slices"]) == 5
    _, slices = read_csv(out.slices_csv)
    assert sum(r["in_eval"] == "0" for r in slices) == 3


def test_untrained_banner_on_every_output(monkeypatch, tmp_path, synthetic_cases):
    out = run_fake(monkeypatch, synthetic_cases, tmp_path / "out", [], structures="1", methods=["propagate"],
                   untrained=True)
    for name in ("cases.csv", "slices.csv", "skipped.csv", "summary.csv", "summary.md", "run.json"):
        first = (out.folder / name).read_text(encoding="utf-8").splitlines()[0]
        assert "UNTRAINED" in first and "random weights" in first, name


def test_interrupted_run_keeps_rows_and_resumes(monkeypatch, tmp_path, synthetic_cases):
    calls = []
    out_dir = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_fake(monkeypatch, synthetic_cases, out_dir, calls, fail_on_call=4, structures="1",
                 methods=["propagate", "reverse"])
    _, rows = read_csv(out_dir / "cases.csv")
    assert len(rows) == 3  # three units finished before the interruption
    assert (out_dir / "summary.md").exists() and (out_dir / "plots" / "dice.png").exists()
    _, summary = read_csv(out_dir / "summary.csv")
    assert sum(int(r["n"]) for r in summary if r["structure"] != E.MEAN_ROW) == 3
    with pytest.raises(InputError, match="--resume"):
        run_fake(monkeypatch, synthetic_cases, out_dir, [], structures="1", methods=["propagate", "reverse"])
    with pytest.raises(InputError, match="settings differ"):
        run_fake(monkeypatch, synthetic_cases, out_dir, [], structures="1", methods=["propagate", "reverse"],
                 resume=True, shots=2)
    calls2 = []
    run_fake(monkeypatch, synthetic_cases, out_dir, calls2, structures="1", methods=["propagate", "reverse"],
             resume=True)
    assert len(calls2) == 12 - 3
    _, rows = read_csv(out_dir / "cases.csv")
    keys = [(r["query"], r["support"], r["method"], r["value"]) for r in rows]
    assert len(keys) == 12 and len(set(keys)) == 12
    _, slices = read_csv(out_dir / "slices.csv")
    skeys = [(r["query"], r["support"], r["method"], r["slice_index"]) for r in slices]
    assert len(skeys) == 12 * 10 and len(set(skeys)) == len(skeys)


# ------------------------------------------------------------------ real end-to-end run (random weights)


def crop_case(src, dst, k0, k1):
    """A few slices of a shared case, geometry kept (SimpleITK slicing keeps physical positions)."""
    dst.mkdir(parents=True)
    for name in ("image.nii.gz", "labels.nii.gz"):
        img = sitk.ReadImage(str(src / name))
        sitk.WriteImage(img[:, :, k0:k1], str(dst / name))


@pytest.mark.slow  # a real-data evaluation at 256 px
def test_end_to_end_random_weights(tmp_path, shared_dir):
    data = shared_dir / "data"
    crop_case(data / "abdomen-ct" / "ct-a", tmp_path / "ct", 13, 17)
    crop_case(data / "abdomen-mr", tmp_path / "mr", 6, 10)  # spleen on k = 8, 9 of these
    manifest = tmp_path / "cases.csv"
    manifest.write_text("name,image,labels\nct,ct/image.nii.gz,ct/labels.nii.gz\nmr,mr/image.nii.gz,mr/labels.nii.gz\n")
    parser = argparse.ArgumentParser()
    E.add_arguments(parser)
    out = tmp_path / "eval"
    args = parser.parse_args([str(manifest), "-o", str(out), "--structures", "spleen=1", "--support", "ct",
                              "--untrained",
                              "--image-size", "256", "--device", "cpu", "--no-progress",
                              "--lpips-weights", str(shared_dir / "weights" / "lpips" / "alexnet_features.pth")])
    assert E.run(args) == 0
    first, rows = read_csv(out / "cases.csv")
    assert "UNTRAINED" in first
    # fixed support case: it is never a query, so one pair (query mr, support ct) x 3 methods
    assert len(rows) == 3 and {r["method"] for r in rows} == set(E.METHOD_NAMES)
    assert {(r["query"], r["support"]) for r in rows} == {("mr", "ct")}
    assert list(rows[0].keys()) == E.CASE_COLUMNS
    for r in rows:
        assert 0.0 <= float(r["dice"]) <= 1.0 and int(r["encoder_calls"]) >= 4
        tp, fp, fn = int(r["tp"]), int(r["fp"]), int(r["fn"])
        assert float(r["dice"]) == pytest.approx(M.dice_from_counts(tp, fp, fn), rel=1e-5)
        h = float(r["hd95_mm"])
        assert math.isinf(h) if tp + fp == 0 else h >= 0.0
    assert {r["n_extent_slices"] for r in rows} == {"2"} and {r["n_slices"] for r in rows} == {"4"}
    s_first, summary = read_csv(out / "summary.csv")
    assert "UNTRAINED" in s_first
    assert [(r["structure"], r["method"]) for r in summary] == [
        (s, m) for s in ("spleen", E.MEAN_ROW) for m in E.METHOD_NAMES]
    assert (out / "summary.md").read_text(encoding="utf-8").splitlines()[0].count("UNTRAINED") == 1
    for name in ("dice.png", "reverse_pi_vs_dice.png", "lpips_matching.png"):
        assert (out / "plots" / name).read_bytes()[:8] == PNG_MAGIC
    _, slices = read_csv(out / "slices.csv")
    assert len(slices) == 3 * 4


# ------------------------------------------------------------------ bench (fake segment: the tables, not the speed)


def test_crop_slices_keeps_physical_positions():
    from fewshotsam2.research.bench import crop_slices

    direction = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    vol = Volume(np.arange(10 * 4 * 5).reshape(10, 4, 5), (0.7, 1.1, 3.0), (5.0, -2.0, 40.0), direction)
    lab = vol.with_array((np.arange(10)[:, None, None] >= 6) * np.ones((10, 4, 5), int))  # value 1 on k = 6..9
    img2, lab2 = crop_slices(vol, lab, 0, 4, value=1)
    assert img2.array.shape == (4, 4, 5) and lab2.array.shape == (4, 4, 5)
    start = 5  # centre of the extent (6 + 9) // 2 = 7, minus 4 // 2
    assert np.array_equal(img2.array, vol.array[start:start + 4])
    for ijk in ((0, 0, 0), (4, 3, 3), (2, 1, 1)):
        before = vol.ijk_to_lps() @ np.array([ijk[0], ijk[1], ijk[2] + start, 1.0])
        after = img2.ijk_to_lps() @ np.array([*ijk, 1.0])
        assert np.allclose(before, after)
    edge = lab.with_array((np.arange(10)[:, None, None] == 9) * np.ones((10, 4, 5), int))
    img3, _ = crop_slices(vol, edge, 0, 4, value=1)
    assert np.array_equal(img3.array, vol.array[6:10])  # 9 - 2 = 7, clipped to the last 4 slices
    same, _ = crop_slices(vol, lab, 0, 0)
    assert same is vol


def bench_args(extra):
    from fewshotsam2.research import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return bench, parser.parse_args(extra)


def test_bench_markdown_with_fake_segment(monkeypatch, tmp_path, synthetic_cases):
    calls = []

    class FakeEngine:
        device = type("D", (), {"type": "cpu"})()

    out = tmp_path / "bench.md"
    bench, args = bench_args(["--query", str(synthetic_cases / "c"), "--support", str(synthetic_cases / "group" / "a"),
                              "--structures", "1", "--max-slices", "5", "--untrained", "--image-size", "256",
                              "--device", "cpu", "-o", str(out)])
    assert bench.run(args, segment=fake_segment_factory(calls), engine_factory=lambda options: FakeEngine()) == 0
    assert [m for m, _ in calls] == ["propagate", "reverse", "lpips"]  # the baseline first: ratios are to it
    lines = out.read_text(encoding="utf-8").splitlines()
    assert "UNTRAINED" in lines[0]
    assert any("(5, 12, 14)" in ln for ln in lines)  # cropped to 5 slices
    rows = [ln for ln in lines if ln.startswith("| propagate |") or ln.startswith("| reverse |")
            or ln.startswith("| lpips |")]
    assert len(rows) == 6  # the stage table and the resources table
    assert "| 7 |" in rows[3] and rows[3].count("1.00x") == 3  # encoder calls, ratios of propagate to itself


def test_bench_matching_mode_runs_the_matching_benchmark(tmp_path, shared_dir):
    """--matching on a tiny problem with the real AlexNet weights: batched and per-pair LPIPS agree."""
    out = tmp_path / "m.md"
    weights = shared_dir / "weights" / "lpips" / "alexnet_features.pth"
    bench, args = bench_args(["--matching", "--n-support", "3", "--n-query", "4", "--matching-size", "64",
                              "--lpips-weights", str(weights), "--device", "cpu", "-o", str(out)])
    assert bench.run(args) == 0
    rows = dict(line.strip("|").split("|")[:2] for line in out.read_text(encoding="utf-8").splitlines()
                if line.startswith("| ") and line.count("|") >= 3)
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    assert rows["pairs"] == "12" and rows["size"] == "64" and rows["argmin_agrees"] in ("True", "yes")
    assert float(rows["max_abs_diff"]) < 1e-4
