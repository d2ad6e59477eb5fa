"""slices.py: canonical slice stacks are exact, orientation-independent and anatomically oriented."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from fewshotsam2.errors import InputError
from fewshotsam2.slicing.slices import AXES, SlicePlan
from fewshotsam2.io.volume import Volume, read_labels, read_volume

IMAGES = [
    "abdomen-ct/ct-a/image.nii.gz",
    "abdomen-ct/ct-b/dicom",
    "abdomen-mr/image.nii.gz",
    "spleen-ct/image.nii.gz",
    "brain-mr/ibsr-01/image.nii.gz",
    "brain-mr/ibsr-03/image.nii.gz",
    "brain-mr/ibsr-04/image.nii.gz",
    "brain-mr/ibsr-05/image.nii.gz",
]
# the four IBSR brains share one geometry (256 x 128 x 256 voxels, 8 M each): one in the fast tier, all in the slow
PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n.startswith("brain-mr/ibsr-0") and "ibsr-01" not in n else n
          for n in IMAGES]
PLANES = ("axial", "coronal", "sagittal")

# plane -> LPS direction (unit vector) along which the slice index, the row and the column increase
CANONICAL_LPS = {
    "axial": ((0, 0, 1), (0, 1, 0), (1, 0, 0)),  # inferior->superior, anterior->posterior, right->left
    "coronal": ((0, -1, 0), (0, 0, -1), (1, 0, 0)),  # posterior->anterior, superior->inferior, right->left
    "sagittal": ((-1, 0, 0), (0, 0, -1), (0, 1, 0)),  # left->right, superior->inferior, anterior->posterior
}


class _Volumes(dict):
    """name -> Volume, read on first use (each test reads only the volumes it runs on)."""

    def __init__(self, folder):
        super().__init__()
        self.folder = folder

    def __missing__(self, name):
        self[name] = read_volume(self.folder / name)
        return self[name]


@pytest.fixture(scope="module")
def volumes(shared_dir):
    return _Volumes(shared_dir / "data")


def flipped(vol: Volume, array_axis: int) -> Volume:
    """The same physical image stored with one array axis running the other way."""
    ijk = 2 - array_axis
    n = vol.shape[array_axis]
    direction = vol.direction.copy()
    origin = np.array(vol.origin) + direction[:, ijk] * vol.spacing[ijk] * (n - 1)
    direction[:, ijk] *= -1
    return Volume(np.flip(vol.array, axis=array_axis).copy(), vol.spacing, tuple(origin), direction)


def swapped_ij(vol: Volume) -> Volume:
    """The same physical image stored with the i and j axes exchanged (a transposed array)."""
    direction = vol.direction[:, [1, 0, 2]]
    spacing = (vol.spacing[1], vol.spacing[0], vol.spacing[2])
    return Volume(np.ascontiguousarray(vol.array.transpose(0, 2, 1)), spacing, vol.origin, direction)


def index_grids(shape):
    """Arrays holding, at each voxel, its own i, j and k index."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return i, j, k


@pytest.mark.parametrize("name", PARAMS)
def test_unstack_inverts_stack_for_every_volume_and_axis(name, volumes):
    vol = volumes[name]
    for axis in AXES:
        plan = SlicePlan.for_volume(vol, axis)
        stack = plan.stack(vol.array)
        assert stack.shape[0] == plan.n_slices == vol.shape[plan.array_axis]
        assert stack.flags["C_CONTIGUOUS"]
        back = plan.unstack(stack)
        assert back.shape == vol.shape and np.array_equal(back, vol.array)


@pytest.mark.parametrize("name", PARAMS)
def test_stacks_do_not_depend_on_array_orientation(name, volumes):
    vol = volumes[name]
    variants = [flipped(vol, 1), flipped(vol, 0), flipped(flipped(vol, 2), 1), swapped_ij(vol)]
    for axis in PLANES:
        reference = SlicePlan.for_volume(vol, axis).stack(vol.array)
        for other in variants:
            assert np.array_equal(SlicePlan.for_volume(other, axis).stack(other.array), reference), axis
    auto = SlicePlan.for_volume(vol).stack(vol.array)
    for other in variants:
        assert np.array_equal(SlicePlan.for_volume(other).stack(other.array), auto)


def test_ct_b_labels_and_dicom_give_the_same_label_stack(shared_dir):
    data = shared_dir / "data" / "abdomen-ct/ct-b"
    image = read_volume(data / "dicom")
    aligned, _ = read_labels(data / "labels.nii.gz", image)
    raw = read_volume(data / "labels.nii.gz")  # on its own, y-flipped grid
    for axis in PLANES:
        a = SlicePlan.for_volume(image, axis).stack(aligned.array)
        b = SlicePlan.for_volume(raw, axis).stack(raw.array)
        assert np.array_equal(a, b)
        assert a.any()


@pytest.mark.parametrize("name", ["abdomen-ct/ct-a/image.nii.gz", "abdomen-mr/image.nii.gz", "brain-mr/ibsr-01/image.nii.gz"])
def test_stack_axes_point_the_canonical_anatomical_way(name, volumes):
    vol = volumes[name]
    i, j, k = index_grids(vol.shape)
    m = vol.ijk_to_lps()
    for plane in PLANES:
        plan = SlicePlan.for_volume(vol, plane)
        si, sj, sk = plan.stack(i), plan.stack(j), plan.stack(k)

        def lps(s, r, c):
            return (m @ [si[s, r, c], sj[s, r, c], sk[s, r, c], 1.0])[:3]

        origin = lps(0, 0, 0)
        steps = (lps(1, 0, 0) - origin, lps(0, 1, 0) - origin, lps(0, 0, 1) - origin)
        for step, expected in zip(steps, CANONICAL_LPS[plane]):
            unit = step / np.linalg.norm(step)
            np.testing.assert_allclose(unit, expected, atol=1e-6, err_msg=f"{name} {plane}")
        # row/column spacing reported = the physical step between neighbouring pixels
        np.testing.assert_allclose(plan.in_plane_spacing, (np.linalg.norm(steps[1]), np.linalg.norm(steps[2])))
        np.testing.assert_allclose(plan.slice_spacing, np.linalg.norm(steps[0]))


@pytest.mark.parametrize("name", PARAMS)
def test_auto_axis_is_the_acquisition_axis(volumes, name):
    plan = SlicePlan.for_volume(volumes[name])
    if name.startswith("brain-mr"):
        # IBSR was acquired coronal: 0.94 x 1.5 x 0.94 mm, the 1.5 mm axis is j (array axis 1), pointing A/P
        assert plan.plane == "coronal" and plan.array_axis == 1 and plan.n_slices == 128, name
        np.testing.assert_allclose(plan.in_plane_spacing, (0.9375, 0.9375), atol=1e-3)
    else:
        # abdomen volumes: axial (ct-a and the MR are 3 mm isotropic: a tie goes to axial)
        assert plan.plane == "axial" and plan.array_axis == 0, name


def test_named_axes_on_ct_b(volumes):
    vol = volumes["abdomen-ct/ct-b/dicom"]
    expected = {"axial": (0, 20, (0.977, 0.977)), "coronal": (1, 512, (2.0, 0.977)), "sagittal": (2, 512, (2.0, 0.977))}
    for plane, (array_axis, n, spacing) in expected.items():
        plan = SlicePlan.for_volume(vol, plane)
        assert (plan.plane, plan.array_axis, plan.n_slices) == (plane, array_axis, n)
        np.testing.assert_allclose(plan.in_plane_spacing, spacing, atol=1e-3)


def test_slice_index_maps_to_the_volume_array_index(volumes):
    vol = volumes["abdomen-ct/ct-a/image.nii.gz"]
    grids = dict(zip((2, 1, 0), index_grids(vol.shape)))  # array axis -> index grid along it (i is axis 2)
    for plane in PLANES:
        for v in (vol, flipped(vol, 0), flipped(vol, 1), flipped(vol, 2)):
            plan = SlicePlan.for_volume(v, plane)
            along = plan.stack(grids[plan.array_axis])
            for s in (0, 1, plan.n_slices - 1):
                assert np.all(along[s] == plan.slice_index_to_array_index(s))
                assert plan.array_index_to_slice_index(plan.slice_index_to_array_index(s)) == s
    # ct-a's i axis points to LPS -x (toward the patient's right), so the sagittal order left->right follows i
    plan = SlicePlan.for_volume(vol, "sagittal")
    assert plan.slice_index_to_array_index(0) == 0
    plan = SlicePlan.for_volume(vol, "coronal")  # j points to -y (anterior); posterior->anterior follows j
    assert plan.slice_index_to_array_index(0) == 0
    with pytest.raises(IndexError):
        plan.slice_index_to_array_index(plan.n_slices)


def rotated(vol: Volume, degrees: float) -> Volume:
    t = math.radians(degrees)
    rot = np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])
    return Volume(vol.array, vol.spacing, vol.origin, rot @ vol.direction)


def test_oblique_volumes_use_the_nearest_axes_and_warn(volumes):
    vol = volumes["spleen-ct/image.nii.gz"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slight = SlicePlan.for_volume(rotated(vol, 0.5), "axial")  # below 1 degree: silent
    with pytest.warns(UserWarning, match="oblique"):
        oblique = SlicePlan.for_volume(rotated(vol, 20.0), "axial")
    straight = SlicePlan.for_volume(vol, "axial")
    assert np.array_equal(oblique.stack(vol.array), straight.stack(vol.array))
    assert np.array_equal(slight.stack(vol.array), straight.stack(vol.array))
    with pytest.warns(UserWarning, match="oblique"):
        plan = SlicePlan.for_volume(rotated(vol, 30.0), "coronal")
    assert np.array_equal(plan.unstack(plan.stack(vol.array)), vol.array)


def test_bad_axis_and_shape():
    vol = Volume(np.zeros((3, 4, 5)), (1, 1, 1), (0, 0, 0), np.eye(3))
    with pytest.raises(InputError, match="axial"):
        SlicePlan.for_volume(vol, "transverse")
    plan = SlicePlan.for_volume(vol)
    with pytest.raises(ValueError):
        plan.stack(np.zeros((5, 4, 3)))
    with pytest.raises(ValueError):
        plan.unstack(np.zeros((3, 4, 4)))
