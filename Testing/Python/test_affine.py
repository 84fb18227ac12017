"""Affine pre-alignment and its transform files (issue 5).

SimpleITK is the outside client: transform files written by ``write_affine`` must be read by
``sitk.ReadTransform`` as the same mapping, and the moving image of the recovery test is made by
``sitk.Resample`` with a known affine. Images are small synthetic phantoms (smooth ellipsoids) on
anisotropic, oblique grids, so the test runs in seconds on a CPU and needs no data.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from InverseRegLib.affine import affine_align, read_affine, write_affine
from InverseRegLib.errors import InverseRegError
from InverseRegLib.grid import Geometry

torch.set_num_threads(1)


def rotation_matrix(axis, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    transform = sitk.VersorTransform(tuple(axis), float(np.deg2rad(degrees)))
    return np.asarray(transform.GetMatrix()).reshape(3, 3)


def make_phantom(size=(48, 44, 40), spacing=(2.2, 2.5, 3.0), tilt=20.0) -> sitk.Image:
    """A smooth "head": a large ellipsoid holding smaller ones of other intensities, placed
    asymmetrically so that no rotation or flip maps it onto itself; defined in physical space on a
    grid whose direction is tilted by ``tilt`` degrees about an oblique axis."""
    direction = rotation_matrix((1.0, 2.0, 0.5), tilt)
    matrix = direction @ np.diag(spacing)
    center = np.array([12.0, -30.0, 40.0])  # arbitrary LPS position
    origin = center - matrix @ ((np.asarray(size) - 1) / 2.0)
    geometry = Geometry(tuple(size), tuple(spacing), tuple(origin), tuple(direction.ravel()))
    offsets = geometry.physical_points() - center
    blobs = [  # (centre offset mm, radii mm, rotation (axis, deg), intensity)
        ((0.0, 0.0, 0.0), (42.0, 36.0, 30.0), ((0, 0, 1), 0.0), 0.5),
        ((12.0, 8.0, 5.0), (14.0, 8.0, 9.0), ((1, 0, 0), 30.0), 0.5),
        ((-15.0, 10.0, -6.0), (7.0, 12.0, 6.0), ((0, 1, 1), 45.0), -0.3),
        ((-5.0, -18.0, 10.0), (9.0, 6.0, 10.0), ((1, 1, 0), 20.0), 0.35),
        ((20.0, -10.0, -12.0), (5.0, 5.0, 5.0), ((0, 0, 1), 0.0), 0.4),
    ]
    image = np.zeros(offsets.shape[:3])
    for shift, radii, (axis, degrees), value in blobs:
        local = (offsets - np.asarray(shift)) @ rotation_matrix(axis, degrees)
        distance = np.sqrt(((local / np.asarray(radii)) ** 2).sum(axis=-1))
        image += value / (1.0 + np.exp(8.0 * (distance - 1.0)))  # smooth edge ~ radius/8
    out = sitk.GetImageFromArray((100.0 * image).astype(np.float32))
    return geometry.apply_to(out)


def known_affine(center) -> sitk.AffineTransform:
    """Rotation 10 degrees about an oblique axis, 5 % scaling (anisotropic), ~10 mm shift."""
    transform = sitk.AffineTransform(3)
    transform.SetCenter(tuple(float(c) for c in center))
    transform.SetMatrix(tuple((rotation_matrix((0.3, -1.0, 0.6), 10.0) @ np.diag([1.05, 0.97, 1.03])).ravel()))
    transform.SetTranslation((6.0, -7.0, 4.5))
    return transform


def transform_points(transform: sitk.Transform, points: np.ndarray) -> np.ndarray:
    return np.asarray([transform.TransformPoint(tuple(float(c) for c in p)) for p in points])


@pytest.fixture(scope="module")
def phantom() -> sitk.Image:
    return make_phantom()


# ----------------------------------------------------------------------------------------------
# transform files, SimpleITK as the oracle


@pytest.mark.parametrize("suffix", [".tfm", ".mat", ".txt"])
def test_write_affine_is_read_by_simpleitk_as_the_same_mapping(tmp_path, suffix):
    truth = known_affine(center=(10.0, -20.0, 30.0))
    path = tmp_path / f"affine{suffix}"
    write_affine(truth, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left
    points = np.random.default_rng(0).uniform(-100, 100, size=(20, 3))
    expected = transform_points(truth, points)
    np.testing.assert_allclose(transform_points(sitk.ReadTransform(str(path)), points), expected, atol=1e-6)
    ours = read_affine(path)
    assert isinstance(ours, sitk.AffineTransform)
    np.testing.assert_allclose(transform_points(ours, points), expected, atol=1e-6)


def test_read_affine_accepts_a_rigid_file_written_by_simpleitk(tmp_path):
    rigid = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, -0.2, 0.3, (5.0, 6.0, -7.0))
    path = tmp_path / "rigid.tfm"
    sitk.WriteTransform(rigid, str(path))
    points = np.random.default_rng(1).uniform(-80, 80, size=(10, 3))
    np.testing.assert_allclose(transform_points(read_affine(path), points), transform_points(rigid, points), atol=1e-6)


def test_write_affine_replaces_an_existing_file(tmp_path):
    path = tmp_path / "affine.tfm"
    write_affine(sitk.AffineTransform(3), path)
    shifted = sitk.AffineTransform(3)
    shifted.SetTranslation((1.0, 2.0, 3.0))
    write_affine(shifted, path)
    assert read_affine(path).TransformPoint((0.0, 0.0, 0.0)) == pytest.approx((1.0, 2.0, 3.0))


def test_transform_file_errors(tmp_path):
    with pytest.raises(InverseRegError, match="not found"):
        read_affine(tmp_path / "missing.tfm")
    corrupt = tmp_path / "corrupt.tfm"
    corrupt.write_text("#Insight Transform File V1.0\nthis is not a transform\n")
    with pytest.raises(InverseRegError, match="cannot read transform"):
        read_affine(corrupt)
    garbage = tmp_path / "garbage.mat"
    garbage.write_bytes(os.urandom(64))
    with pytest.raises(InverseRegError):
        read_affine(garbage)
    bspline = tmp_path / "bspline.tfm"
    sitk.WriteTransform(sitk.BSplineTransform(3), str(bspline))
    with pytest.raises(InverseRegError, match="not an affine"):
        read_affine(bspline)
    with pytest.raises(InverseRegError, match="file type"):
        write_affine(sitk.AffineTransform(3), tmp_path / "affine.nii.gz")
    with pytest.raises(InverseRegError, match="does not exist"):
        write_affine(sitk.AffineTransform(3), tmp_path / "no" / "such" / "affine.tfm")
    with pytest.raises(InverseRegError, match="SimpleITK transform"):
        write_affine(np.eye(4), tmp_path / "affine.tfm")


# ----------------------------------------------------------------------------------------------
# recovering a known affine


def foreground_points(image: sitk.Image) -> np.ndarray:
    array = sitk.GetArrayViewFromImage(image)
    return Geometry.of(image).physical_points()[array > 0.2 * array.max()]


def moving_grid(fixed: sitk.Image) -> sitk.Image:
    """Another grid for the moving image: other spacing and direction, and room around the
    anatomy so that the known affine does not push it out of the field of view."""
    geometry = Geometry.of(fixed)
    direction = rotation_matrix((-0.5, 0.2, 1.0), 35.0)
    extent = np.asarray(geometry.size) * np.asarray(geometry.spacing)
    spacing = (2.0, 2.0, 2.4)
    size = tuple(int(np.ceil(1.3 * extent.max() / s)) for s in spacing)
    matrix = direction @ np.diag(spacing)
    origin = geometry.center() - matrix @ ((np.asarray(size) - 1) / 2.0)
    return Geometry(size, spacing, tuple(origin), tuple(direction.ravel())).reference_image()


def test_known_affine_is_recovered_and_its_inverse_is_exact(phantom):
    # moving(y) = fixed(Q(y)), so the transform that maps fixed points into moving space is Q^-1
    q = known_affine(center=Geometry.of(phantom).center())
    moving = sitk.Resample(phantom, moving_grid(phantom), q, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    truth = q.GetInverse()
    progress = []
    recovered = affine_align(phantom, moving, mode="affine", progress=lambda f, m: progress.append(f))

    points = foreground_points(phantom)
    error = np.linalg.norm(transform_points(recovered, points) - transform_points(truth, points), axis=1)
    initial = np.linalg.norm(points - transform_points(truth, points), axis=1)
    assert initial.mean() > 8.0  # the test is not trivial: ~1 cm of misalignment to undo
    # tolerance: well under the smallest voxel (2 mm) on average, one voxel at worst
    assert error.mean() < 0.5, f"mean point error {error.mean():.3f} mm"
    assert error.max() < 2.0, f"max point error {error.max():.3f} mm"

    backward = recovered.GetInverse()
    round_trip = transform_points(backward, transform_points(recovered, points))
    np.testing.assert_allclose(round_trip, points, atol=1e-6)

    assert progress and progress[-1] == 1.0
    assert all(0.0 <= f <= 1.0 for f in progress) and progress == sorted(progress)

    # the resampled moving image matches the fixed one where both are defined
    aligned = sitk.GetArrayFromImage(sitk.Resample(moving, phantom, recovered, sitk.sitkLinear, 0.0))
    fixed_array = sitk.GetArrayFromImage(phantom)
    assert np.corrcoef(aligned.ravel(), fixed_array.ravel())[0, 1] > 0.98


def test_rigid_mode_recovers_a_rigid_motion_and_stays_rigid(phantom):
    q = sitk.Euler3DTransform(tuple(Geometry.of(phantom).center()), 0.12, -0.08, 0.15, (-8.0, 5.0, 6.0))
    moving = sitk.Resample(phantom, moving_grid(phantom), q, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    recovered = affine_align(phantom, moving, mode="rigid")
    matrix = np.asarray(recovered.GetMatrix()).reshape(3, 3)
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(3), atol=1e-6)
    assert np.linalg.det(matrix) == pytest.approx(1.0, abs=1e-6)
    points = foreground_points(phantom)
    error = np.linalg.norm(transform_points(recovered, points) - transform_points(q.GetInverse(), points), axis=1)
    assert error.mean() < 0.5, f"mean point error {error.mean():.3f} mm"


def test_affine_align_rejects_bad_arguments(phantom):
    with pytest.raises(InverseRegError, match="mode"):
        affine_align(phantom, phantom, mode="bspline")
    with pytest.raises(InverseRegError, match="2D"):
        affine_align(phantom, sitk.Image([32, 32], sitk.sitkFloat32))
    with pytest.raises(InverseRegError, match="SimpleITK image"):
        affine_align(phantom, np.zeros((8, 8, 8)))
    with pytest.raises(InverseRegError, match="device"):
        affine_align(phantom, phantom, device="tpu:7")
    if not torch.cuda.is_available():
        with pytest.raises(InverseRegError, match="CUDA"):
            affine_align(phantom, phantom, device="cuda")
    with pytest.raises(InverseRegError, match="constant|foreground"):
        affine_align(phantom, sitk.Image([16, 16, 16], sitk.sitkFloat32))
