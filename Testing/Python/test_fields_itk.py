"""The transform-file contract, judged by SimpleITK as the outside client.

Known fields (translation, rotation about an off-centre point, a smooth sinusoid) are written
on a grid with anisotropic spacing and oblique direction cosines through the library's writer
(``fields.field_to_image`` + ``imageio.write_image_atomic``) as .nii.gz, .nrrd and .mha, read
back with ``sitk.ReadImage`` and used as ``sitk.DisplacementFieldTransform``. Then

* ``TransformPoint(p) == p + d(p)`` at grid points, d evaluated analytically at SimpleITK's own
  physical points (tolerance 1e-4 mm; NIfTI stores the grid in float32);
* ``sitk.Resample(moving, fixed, DisplacementFieldTransform(field))`` equals the library's own
  ``fields.warp_image`` (the moving image lives on another oblique anisotropic grid; max
  difference below 0.05 % of the image's peak: the library samples in float32), and for the
  linear maps also equals resampling through the exact ITK transform (TranslationTransform,
  Euler3DTransform with its centre);
* Jacobian determinants and the inverse-consistency error match analytic values.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from InverseRegLib.fields import (field_to_image, folding_percent, image_to_field, inverse_consistency_error,
                                  jacobian_determinant, warp_image)
from InverseRegLib.grid import Geometry, centered_grid
from InverseRegLib.imageio import write_image_atomic
from inversereg_testlib import blob_image, oblique_geometry, rotation_matrix

CENTER = np.array([8.0, -12.0, 20.0])
FIXED = oblique_geometry((40, 36, 30), (2.2, 2.9, 3.6), axis=(1.0, 2.0, 0.5), degrees=20.0, center=CENTER)
MOVING = oblique_geometry((44, 38, 34), (2.6, 2.4, 3.1), axis=(-0.5, 1.0, 2.0), degrees=15.0,
                          center=CENTER + np.array([3.0, -2.0, 4.0]))
PEAK = 100.0

# the known maps p -> p + d(p) (fixed-space point to moving-space point)
TRANSLATION = np.array([6.5, -4.2, 3.1])
ROTATION = rotation_matrix((0.3, -1.0, 0.6), 12.0)
ROTATION_CENTER = CENTER + np.array([15.0, -10.0, 5.0])  # off the grid's centre
WAVE_K = np.array([0.6, -0.3, 0.75]) / np.linalg.norm([0.6, -0.3, 0.75]) * 2 * np.pi / 60.0
WAVE_AMPLITUDE = np.array([3.0, -2.5, 4.0])
WAVE_PHASE = np.array([0.3, 1.4, 2.2])


def displacement(kind: str, points: np.ndarray) -> np.ndarray:
    if kind == "translation":
        return np.broadcast_to(TRANSLATION, points.shape).copy()
    if kind == "rotation":
        return (points - ROTATION_CENTER) @ ROTATION.T + ROTATION_CENTER - points
    if kind == "sinusoid":
        return WAVE_AMPLITUDE * np.sin((points @ WAVE_K)[..., None] + WAVE_PHASE)
    raise ValueError(kind)


def exact_transform(kind: str) -> sitk.Transform | None:
    if kind == "translation":
        return sitk.TranslationTransform(3, tuple(TRANSLATION))
    if kind == "rotation":
        transform = sitk.AffineTransform(3)
        transform.SetCenter(tuple(ROTATION_CENTER))
        transform.SetMatrix(tuple(ROTATION.ravel()))
        return transform
    return None


@pytest.fixture(scope="module")
def moving_image():
    return blob_image(MOVING, CENTER + np.array([2.0, 1.0, -1.0]), PEAK)


def write_and_read(kind: str, suffix: str, folder) -> tuple[np.ndarray, sitk.Image]:
    field = displacement(kind, FIXED.physical_points())
    path = folder / f"field_{kind}{suffix}"
    write_image_atomic(field_to_image(field, FIXED), path)
    assert sorted(p.name for p in folder.iterdir()) == [path.name]  # no temporary left behind
    return field, sitk.ReadImage(str(path))


def test_test_grids_are_oblique_and_anisotropic():
    for geometry in (FIXED, MOVING):
        direction = geometry.direction_matrix
        assert np.allclose(direction @ direction.T, np.eye(3), atol=1e-12)
        assert np.min(np.abs(direction)) > 0.04  # every axis tilted against every LPS axis
        assert len(set(geometry.spacing)) == 3
    assert Geometry.of(FIXED.reference_image()) == FIXED


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("kind", ["translation", "rotation", "sinusoid"])
def test_sitk_reads_the_field_as_written(kind, suffix, tmp_path):
    field, image = write_and_read(kind, suffix, tmp_path)
    assert image.GetPixelID() == sitk.sitkVectorFloat64
    assert image.GetNumberOfComponentsPerPixel() == 3 and image.GetDimension() == 3
    assert image.GetSize() == FIXED.size
    assert np.allclose(image.GetSpacing(), FIXED.spacing, atol=1e-5)
    assert np.allclose(image.GetOrigin(), FIXED.origin, atol=1e-4)
    assert np.allclose(image.GetDirection(), FIXED.direction, atol=1e-5)
    array, geometry = image_to_field(image)
    assert np.array_equal(array, field)  # float64 components, (z, y, x, 3) layout, unchanged
    assert geometry.size == FIXED.size


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("kind", ["translation", "rotation", "sinusoid"])
def test_transform_point_is_p_plus_d_of_p(kind, suffix, tmp_path):
    _, image = write_and_read(kind, suffix, tmp_path)
    transform = sitk.DisplacementFieldTransform(image)  # takes the image over
    rng = np.random.default_rng(0)
    nx, ny, nz = FIXED.size
    indices = [(0, 0, 0), (nx - 1, ny - 1, nz - 1), (nx - 1, 0, nz - 1)]
    indices += [tuple(int(v) for v in rng.integers(0, FIXED.size)) for _ in range(60)]
    reference = FIXED.reference_image()
    for index in indices:
        p = np.asarray(reference.TransformIndexToPhysicalPoint(index))
        mapped = np.asarray(transform.TransformPoint(tuple(p)))
        assert np.allclose(mapped, p + displacement(kind, p), atol=1e-4), (kind, index)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("kind", ["translation", "rotation", "sinusoid"])
def test_sitk_resample_matches_the_library_warp(kind, suffix, moving_image, tmp_path):
    field, image = write_and_read(kind, suffix, tmp_path)
    reference = FIXED.reference_image()
    by_sitk = sitk.GetArrayFromImage(
        sitk.Resample(moving_image, reference, sitk.DisplacementFieldTransform(image), sitk.sitkLinear, 0.0))
    ours_image = warp_image(moving_image, field, FIXED)
    assert Geometry.of(ours_image) == FIXED
    ours = sitk.GetArrayFromImage(ours_image)
    assert by_sitk.max() > 0.5 * PEAK  # the moving content lands inside the fixed grid
    assert np.abs(ours - by_sitk).max() < 5e-4 * PEAK
    exact = exact_transform(kind)
    if exact is not None:  # the field file is the same map as the exact ITK transform
        by_exact = sitk.GetArrayFromImage(sitk.Resample(moving_image, reference, exact, sitk.sitkLinear, 0.0))
        assert np.abs(by_exact - by_sitk).max() < 5e-4 * PEAK


@pytest.mark.parametrize("nearest", [False, True])
def test_warp_matches_sitk_at_the_moving_image_border(nearest):
    """Content up to the moving image's edge: ITK takes the edge value up to half a voxel beyond
    the outer voxel centres and 0 further out; the library does the same (fading to 0 across
    that half voxel instead differed by up to half the edge value)."""
    rng = np.random.default_rng(5)
    array = rng.integers(1, 9, MOVING.array_shape).astype(np.float32)  # no zero anywhere
    moving = MOVING.apply_to(sitk.GetImageFromArray(array))
    field = displacement("sinusoid", FIXED.physical_points()) * 3.0
    by_sitk = sitk.GetArrayFromImage(sitk.Resample(
        moving, FIXED.reference_image(), sitk.DisplacementFieldTransform(field_to_image(field, FIXED)),
        sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear, 0.0))
    ours = sitk.GetArrayFromImage(warp_image(moving, field, FIXED, nearest=nearest))
    inside = by_sitk != 0
    assert 0.1 < inside.mean() < 0.95  # the moving image's border runs through the fixed grid
    assert np.array_equal(ours != 0, inside) or np.count_nonzero((ours != 0) != inside) <= 2e-4 * ours.size
    if nearest:
        assert np.count_nonzero(ours != by_sitk) <= 2e-4 * ours.size  # ties at exactly half a voxel
    else:
        assert np.abs(ours - by_sitk).max() < 1e-3 * 8


def test_field_direction_is_fixed_to_moving(moving_image):
    """A translation t in the file moves the content by -t: Resample pulls moving(p + t)."""
    reference = FIXED.reference_image()
    plain = sitk.Resample(moving_image, reference, sitk.Transform(), sitk.sitkLinear, 0.0)
    shifted = warp_image(moving_image, displacement("translation", FIXED.physical_points()), FIXED)

    def centroid(image):
        array = sitk.GetArrayFromImage(image).astype(np.float64)
        weights = np.clip(array, 0, None)
        points = FIXED.physical_points()
        return (points * weights[..., None]).sum((0, 1, 2)) / weights.sum()

    assert np.allclose(centroid(shifted) - centroid(plain), -TRANSLATION, atol=0.3)


def test_nearest_neighbour_warp_matches_sitk_for_labels():
    labels_array = np.zeros(MOVING.array_shape, dtype=np.int32)
    labels_array[8:20, 10:25, 12:30] = 3
    labels_array[14:26, 18:30, 20:36] = 7
    labels = MOVING.apply_to(sitk.GetImageFromArray(labels_array))
    field = displacement("rotation", FIXED.physical_points())
    ours = warp_image(labels, field, FIXED, nearest=True)
    assert ours.GetPixelID() == sitk.sitkInt32
    by_sitk = sitk.Resample(labels, FIXED.reference_image(), sitk.DisplacementFieldTransform(field_to_image(field, FIXED)),
                            sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
    a, b = sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(by_sitk)
    assert set(np.unique(a)) == {0, 3, 7}
    assert np.count_nonzero(a != b) <= 1e-3 * a.size  # ties at exactly half a voxel may differ


def test_field_to_image_refuses_a_wrong_shape():
    with pytest.raises(ValueError, match="does not match the grid"):
        field_to_image(np.zeros((*FIXED.size, 3)), FIXED)  # (x, y, z) instead of (z, y, x)


# --- Jacobian determinant -------------------------------------------------------------------------

def linear_field(matrix: np.ndarray, center: np.ndarray, geometry: Geometry = FIXED) -> np.ndarray:
    points = geometry.physical_points()
    return (points - center) @ matrix.T + center - points


def test_jacobian_of_a_rotation_is_one():
    det = jacobian_determinant(displacement("rotation", FIXED.physical_points()), FIXED)
    assert det.shape == FIXED.array_shape
    assert np.allclose(det, 1.0, atol=1e-4)


@pytest.mark.parametrize("scale", [0.8, 1.1, 1.3])
def test_jacobian_of_a_scaling_is_s_cubed(scale):
    det = jacobian_determinant(linear_field(scale * np.eye(3), ROTATION_CENTER), FIXED)
    assert np.allclose(det, scale**3, atol=1e-4)


def test_jacobian_of_a_general_affine_is_its_determinant():
    """A non-symmetric matrix: a transposed or wrongly inverted voxel-to-mm conversion on this
    oblique anisotropic grid would give another value."""
    matrix = np.array([[1.1, 0.2, -0.1], [0.05, 0.9, 0.3], [-0.2, 0.1, 1.2]])
    det = jacobian_determinant(linear_field(matrix, CENTER), FIXED)
    assert np.allclose(det, np.linalg.det(matrix), atol=1e-4)
    assert folding_percent(det) == 0.0


def test_jacobian_of_a_folding_field_is_negative_where_it_folds():
    """d(p) = a sin(k·p) k̂ has det J = 1 + a|k| cos(k·p): with a|k| = 2 it folds where
    cos(k·p) < -1/2, a third of the space."""
    k = np.array([0.5, 0.7, -0.4])
    k = k / np.linalg.norm(k) * 2 * np.pi / 80.0
    amplitude = 2.0 / np.linalg.norm(k)
    points = FIXED.physical_points()
    phase = points @ k
    field = amplitude * np.sin(phase)[..., None] * (k / np.linalg.norm(k))
    det = jacobian_determinant(field, FIXED)
    analytic = 1.0 + amplitude * np.linalg.norm(k) * np.cos(phase)
    inner = (slice(1, -1),) * 3  # central differences are one-sided at the border
    assert np.abs(det[inner] - analytic[inner]).max() < 0.06
    assert det.min() < -0.5
    assert 25.0 < folding_percent(det) < 42.0
    mask = analytic > 0.2
    assert folding_percent(det, mask) == 0.0


def test_jacobian_of_identity_and_of_a_smooth_field():
    assert np.allclose(jacobian_determinant(np.zeros((*FIXED.array_shape, 3)), FIXED), 1.0)
    det = jacobian_determinant(displacement("sinusoid", FIXED.physical_points()), FIXED)
    assert folding_percent(det) == 0.0 and det.std() > 0.05


#: axis-aligned grids (x and y flipped as for a RAS-stored NIfTI; and the plain axes) take the
#: one-term-per-entry path of jacobian_determinant
FLIPPED = centered_grid((30, 34, 26), (1.3, 0.9, 2.1), (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0), CENTER)
PLAIN = centered_grid((30, 34, 26), (1.3, 0.9, 2.1), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), CENTER)
#: the plain axes off by float32 rounding (~3e-7), as directions read from NIfTI quaternions are
NOISY = oblique_geometry((30, 34, 26), (1.3, 0.9, 2.1), degrees=2e-5, center=CENTER, noisy_ok=True)


@pytest.mark.parametrize("geometry", [FLIPPED, PLAIN, NOISY], ids=["flipped", "plain", "noisy"])
def test_jacobian_of_a_general_affine_on_axis_aligned_grids(geometry):
    matrix = np.array([[1.1, 0.2, -0.1], [0.05, 0.9, 0.3], [-0.2, 0.1, 1.2]])
    det = jacobian_determinant(linear_field(matrix, CENTER, geometry), geometry)
    assert np.allclose(det, np.linalg.det(matrix), atol=1e-4)


def test_jacobian_matches_itk_displacement_field_jacobian_determinant():
    """ITK's filter differentiates along index axes scaled by spacing (no direction cosines), so
    it is an oracle on a plain-axes grid; compared away from the border, where ITK's boundary
    condition differs from one-sided differences."""
    field = displacement("sinusoid", PLAIN.physical_points()) * 1.5
    itk = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field_to_image(field, PLAIN)))
    ours = jacobian_determinant(field, PLAIN)
    inner = (slice(1, -1),) * 3
    assert ours[inner].std() > 0.05
    assert np.abs(ours[inner] - itk[inner]).max() < 1e-4


@pytest.mark.parametrize("nearest", [False, True])
def test_warp_onto_and_from_axis_aligned_grids_matches_sitk(nearest):
    """The diagonal shortcut for K d (moving grid on the coordinate axes, flipped) against ITK,
    with the moving image's border running through the output grid."""
    moving_grid = centered_grid((26, 30, 22), (1.4, 1.1, 1.9), FLIPPED.direction, CENTER + np.array([2.0, -1.5, 1.0]))
    rng = np.random.default_rng(6)
    moving = moving_grid.apply_to(sitk.GetImageFromArray(rng.integers(1, 9, moving_grid.array_shape).astype(np.float32)))
    field = displacement("sinusoid", PLAIN.physical_points()) * 2.0
    by_sitk = sitk.GetArrayFromImage(sitk.Resample(
        moving, PLAIN.reference_image(), sitk.DisplacementFieldTransform(field_to_image(field, PLAIN)),
        sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear, 0.0))
    ours = sitk.GetArrayFromImage(warp_image(moving, field, PLAIN, nearest=nearest))
    assert 0.1 < (by_sitk != 0).mean() < 0.95
    if nearest:
        assert np.count_nonzero(ours != by_sitk) <= 2e-4 * ours.size
    else:
        assert np.count_nonzero((ours != 0) != (by_sitk != 0)) <= 2e-4 * ours.size
        assert np.abs(ours - by_sitk).max() < 1e-3 * 8


# --- inverse consistency ----------------------------------------------------------------------------

def field_image(kind_or_array, geometry: Geometry) -> sitk.Image:
    return field_to_image(np.ascontiguousarray(kind_or_array, dtype=np.float64), geometry)


def constant(vector, geometry: Geometry) -> np.ndarray:
    return np.broadcast_to(np.asarray(vector, dtype=np.float64), (*geometry.array_shape, 3))


def landing_inside(forward: np.ndarray) -> np.ndarray:
    """Fixed voxels whose image through ``forward`` lies where ITK reads the moving grid."""
    index = MOVING.physical_to_index(FIXED.physical_points() + forward)
    return np.all((index >= -0.5) & (index < np.asarray(MOVING.size) - 0.5), axis=-1)


def composed_by_sitk(forward: sitk.Image, backward: sitk.Image) -> np.ndarray:
    """|backward(forward(x)) - x| at every voxel of the forward grid, composed by SimpleITK."""
    composite = sitk.CompositeTransform([sitk.DisplacementFieldTransform(sitk.Image(image)) for image in (backward, forward)])
    field = sitk.TransformToDisplacementField(composite, sitk.sitkVectorFloat64, forward.GetSize(), forward.GetOrigin(),
                                              forward.GetSpacing(), forward.GetDirection())
    return np.linalg.norm(sitk.GetArrayFromImage(field), axis=-1)


def test_ice_of_an_exact_inverse_pair_on_two_grids_is_zero():
    forward = field_image(constant(TRANSLATION, FIXED), FIXED)
    backward = field_image(constant(-TRANSLATION, MOVING), MOVING)
    inside = landing_inside(constant(TRANSLATION, FIXED))
    assert 0.3 < inside.mean() < 1.0
    mean, p95 = inverse_consistency_error(forward, backward, inside)
    assert mean < 1e-4 and p95 < 1e-4


def test_ice_of_a_mismatched_pair_is_the_known_residual():
    forward = field_image(constant(TRANSLATION, FIXED), FIXED)
    inside = landing_inside(constant(TRANSLATION, FIXED))
    error = np.array([0.6, -0.8, 0.0])  # |error| = 1 mm
    backward = field_image(constant(-TRANSLATION + error, MOVING), MOVING)
    mean, p95 = inverse_consistency_error(forward, backward, inside)
    assert mean == pytest.approx(1.0, abs=1e-4) and p95 == pytest.approx(1.0, abs=1e-4)
    backward_none = field_image(constant([0.0, 0.0, 0.0], MOVING), MOVING)
    mean, _ = inverse_consistency_error(forward, backward_none, inside)
    assert mean == pytest.approx(np.linalg.norm(TRANSLATION), abs=1e-4)


def test_ice_counts_points_sent_beyond_the_other_grid_as_itk_composes_them():
    """Over the whole fixed grid, part of it sent beyond the moving grid: ITK moves those points
    back by nothing (the error there is the whole translation), and the measure is SimpleITK's."""
    forward = field_image(constant(TRANSLATION, FIXED), FIXED)
    error = np.array([0.6, -0.8, 0.0])
    backward = field_image(constant(-TRANSLATION + error, MOVING), MOVING)
    inside = landing_inside(constant(TRANSLATION, FIXED))
    by_sitk = composed_by_sitk(forward, backward)
    np.testing.assert_allclose(by_sitk[~inside], np.linalg.norm(TRANSLATION), rtol=1e-6)
    mean, p95 = inverse_consistency_error(forward, backward)
    assert mean == pytest.approx(by_sitk.mean(), rel=1e-4) and p95 == pytest.approx(np.percentile(by_sitk, 95), rel=1e-4)
    assert mean > 1.5  # edge values would have given 1 mm everywhere


def test_ice_of_a_rotation_and_its_inverse_within_the_mask():
    """Linear fields interpolate exactly, so inside the moving grid the round trip closes; the
    mask keeps the fixed points whose image lands well inside the moving grid."""
    forward = linear_field(ROTATION, ROTATION_CENTER, FIXED)
    backward = linear_field(ROTATION.T, ROTATION_CENTER, MOVING)
    mapped = FIXED.physical_points() + forward
    index = MOVING.physical_to_index(mapped)
    inside = np.all((index > 1) & (index < np.asarray(MOVING.size) - 2), axis=-1)
    assert inside.mean() > 0.3
    mean, p95 = inverse_consistency_error(field_image(forward, FIXED), field_image(backward, MOVING), inside)
    assert mean < 2e-3 and p95 < 5e-3
    # a backward rotation that is slightly wrong (13 degrees back instead of 12) is detected
    wrong = linear_field(rotation_matrix((0.3, -1.0, 0.6), -13.0), ROTATION_CENTER, MOVING)
    mean_wrong, _ = inverse_consistency_error(field_image(forward, FIXED), field_image(wrong, MOVING), inside)
    assert mean_wrong > 0.2
    assert inverse_consistency_error(field_image(forward, FIXED), field_image(backward, MOVING),
                                     np.zeros(FIXED.array_shape, dtype=bool)) == (0.0, 0.0)
