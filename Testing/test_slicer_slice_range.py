"""Slice ranges in the Slicer Logic on slicer-core's MRML: the estimate equals the core's `extent` on the same
files, a slice index maps to the right RAS position, and a per-structure range reaches the segmentation process."""

import json

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

import FewShotSAM2 as module  # noqa: E402
from test_slicer_logic import load_volume, new_scene, segment_masks, segmentation_from_labelmap  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:SAM2 runs with RANDOM WEIGHTS"), pytest.mark.slow]


@pytest.fixture(scope="module")
def ct(shared_dir, tmp_path_factory):
    """ct-a (liver 5, spleen 1) as support, ct-b (NRRD written by SimpleITK from its DICOM) as query."""
    import SimpleITK as sitk

    data = shared_dir / "data" / "abdomen-ct"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(data / "ct-b" / "dicom")))
    ctb = tmp_path_factory.mktemp("ctb") / "ct-b.nrrd"
    sitk.WriteImage(reader.Execute(), str(ctb))
    scene = new_scene()
    support = load_volume(scene, data / "ct-a" / "image.nii.gz", "ct-a")
    labelmap = load_volume(scene, data / "ct-a" / "labels.nii.gz", "ct-a labels", labelmap=True)
    seg, ids = segmentation_from_labelmap(scene, labelmap, {5: ("liver", (1, 0, 0)), 1: ("spleen", (0, 0, 1))},
                                          "ct-a segmentation", support)
    query = load_volume(scene, ctb, "ct-b")
    weights = str(shared_dir / "weights" / "lpips" / "alexnet_features.pth")
    return dict(data=data, ctb=ctb, support=support, seg=seg, ids=ids, query=query, weights=weights,
                supports=[(support, seg, [ids[5], ids[1]])])


def test_estimate_equals_the_core_command(ct, capsys):
    from fewshotsam2.cli import main

    logic = module.FewShotSAM2Logic()
    got = logic.estimateSliceRanges(ct["query"], ct["supports"], lpips_weights=ct["weights"])
    capsys.readouterr()
    assert main(["extent", "--query", str(ct["ctb"]), "--support", str(ct["data"] / "ct-a" / "image.nii.gz"),
                 str(ct["data"] / "ct-a" / "labels.nii.gz"), "--labels", "5,1", "--json",
                 "--lpips-weights", ct["weights"]]) == 0
    core = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["axis"] == core["axis"]
    assert list(got["ranges"]) == ["liver", "spleen"]
    assert [got["ranges"][n] for n in ("liver", "spleen")] == [(s["first"], s["last"]) for s in core["structures"]]
    n = ct["query"].GetImageData().GetDimensions()[2 - got["axis"]]
    for first, last in got["ranges"].values():
        assert 0 <= first <= last < n


def test_slice_index_to_ras_lands_on_that_slice(ct):
    import vtk

    node = ct["query"]
    dims = node.GetImageData().GetDimensions()
    rasToIJK = vtk.vtkMatrix4x4()
    node.GetRASToIJKMatrix(rasToIJK)
    for axis in (0, 1, 2):
        index = dims[2 - axis] // 3
        ras = module.FewShotSAM2Logic.sliceCenterRAS(node, axis, index)
        ijk = rasToIJK.MultiplyPoint(list(ras) + [1.0])
        assert abs(ijk[2 - axis] - index) < 1e-6


def test_segment_with_a_range_per_structure_leaves_background_outside(ct):
    logic = module.FewShotSAM2Logic()
    output = logic.segment(ct["query"], ct["supports"], "propagate", image_size=64, untrained=True, device="cpu",
                           slice_ranges={"liver": (8, 11)}, slice_range="off")
    masks = segment_masks(output, ct["query"])  # [k, j, i] arrays of the query
    labels = logic.lastResult.labels.array
    from fewshotsam2.slices import SlicePlan

    axis = SlicePlan.for_volume(logic.lastResult.labels).array_axis
    liver = np.moveaxis(masks["liver"], axis, 0)
    assert not np.delete(liver, range(8, 12), axis=0).any()
    assert labels.shape == masks["liver"].shape


def test_a_range_for_an_unselected_segment_is_refused(ct):
    from fewshotsam2.errors import InputError

    with pytest.raises(InputError, match="kidney"):
        module.FewShotSAM2Logic().prepare(ct["query"], ct["supports"], "propagate", untrained=True,
                                          slice_ranges={"kidney": (1, 2)})


def test_estimate_equals_the_core_command_on_a_non_trivial_range(shared_dir, capsys):
    """IBSR 01 -> 03: slices run along numpy axis 1 and CSF's range is a strict part of the volume."""
    from fewshotsam2.cli import main

    data = shared_dir / "data" / "brain-mr"
    weights = str(shared_dir / "weights" / "lpips" / "alexnet_features.pth")
    scene = new_scene()
    support = load_volume(scene, data / "ibsr-01" / "image.nii.gz", "ibsr-01")
    labelmap = load_volume(scene, data / "ibsr-01" / "labels.nii.gz", "ibsr-01 labels", labelmap=True)
    seg, ids = segmentation_from_labelmap(scene, labelmap, {1: ("csf", (0, 0, 1)), 3: ("wm", (1, 1, 1))},
                                          "ibsr-01 segmentation", support)
    query = load_volume(scene, data / "ibsr-03" / "image.nii.gz", "ibsr-03")
    got = module.FewShotSAM2Logic().estimateSliceRanges(query, [(support, seg, [ids[1], ids[3]])],
                                                        lpips_weights=weights)
    capsys.readouterr()
    assert main(["extent", "--query", str(data / "ibsr-03" / "image.nii.gz"), "--support",
                 str(data / "ibsr-01" / "image.nii.gz"), str(data / "ibsr-01" / "labels.nii.gz"), "--labels", "1,3",
                 "--json", "--lpips-weights", weights]) == 0
    core = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["axis"] == core["axis"]
    assert [got["ranges"][n] for n in ("csf", "wm")] == [(s["first"], s["last"]) for s in core["structures"]]
    n = query.GetImageData().GetDimensions()[2 - got["axis"]]
    assert got["ranges"]["csf"][1] - got["ranges"]["csf"][0] + 1 < n  # a real restriction, not the whole volume
