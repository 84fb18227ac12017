"""The RAS grid handed to Slicer, judged by real VTK and SimpleITK.

pip's VTK has ``vtkGridTransform`` but not Slicer's ``vtkOrientedGridTransform``. The oriented one
evaluates its axis-aligned grid at the point rotated into the grid frame about the grid origin,
and adds the (world, RAS) vector found there; the test does the same around a plain
``vtkGridTransform``. The oracle is SimpleITK's ``DisplacementFieldTransform`` on the ITK file.
"""
import numpy as np
import pytest
import SimpleITK as sitk

from InverseRegLib.fields import field_to_image
from InverseRegLib.grid import Geometry, centered_grid
from InverseRegLib.slicer_grid import itk_field_to_slicer_grid, slicer_grid_to_itk_field, to_vtk_image

vtk = pytest.importorskip("vtk")


def _rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def _oblique_field():
    direction = _rotation((1, 2, 0.5), 25) @ np.diag([-1, 1, 1])  # oblique and left-handed flip
    geometry = centered_grid((14, 11, 9), (1.5, 2.0, 3.25), direction.ravel(), (12.0, -7.0, 30.0))
    points = geometry.physical_points()
    field = np.stack([3.0 * np.sin(points[..., 1] / 9.0), -2.0 * np.cos(points[..., 2] / 11.0),
                      1.5 * np.sin(points[..., 0] / 7.0 + 0.3)], axis=-1)
    return field_to_image(field, geometry), geometry


def _inside_points(geometry: Geometry, count=60, seed=0):
    rng = np.random.default_rng(seed)
    index = rng.uniform(1.0, np.asarray(geometry.size) - 2.0, size=(count, 3))
    return np.asarray(geometry.origin) + index @ geometry.index_to_physical.T


def test_vtk_grid_transform_maps_points_like_simpleitk_on_an_oblique_anisotropic_grid():
    image, geometry = _oblique_field()
    grid = itk_field_to_slicer_grid(image)
    vtk_image, direction = to_vtk_image(grid)
    transform = vtk.vtkGridTransform()
    transform.SetDisplacementGridData(vtk_image)
    transform.SetInterpolationModeToLinear()
    itk_transform = sitk.DisplacementFieldTransform(sitk.Cast(image, sitk.sitkVectorFloat64))
    flip = np.array([-1.0, -1.0, 1.0])
    rotation = np.array([[direction.GetElement(r, c) for c in range(3)] for r in range(3)])
    errors = []
    for lps in _inside_points(geometry):
        ras = lps * flip
        local = rotation.T @ (ras - grid.origin_ras) + grid.origin_ras  # into the grid's own axes
        mapped_local = np.asarray(transform.TransformPoint(*local))
        ras_mapped = ras + (mapped_local - local)
        expected_ras = np.asarray(itk_transform.TransformPoint(tuple(lps))) * flip
        errors.append(np.abs(ras_mapped - expected_ras).max())
    assert max(errors) < 1e-4  # VTK interpolates in single precision


def test_a_sign_or_axis_mistake_would_be_caught():
    # the same check with LPS vectors left unconverted must fail: the test above can fail
    image, geometry = _oblique_field()
    grid = itk_field_to_slicer_grid(image)
    grid.displacement_ras = grid.displacement_ras * np.array([-1.0, -1.0, 1.0])
    vtk_image, _ = to_vtk_image(grid)
    transform = vtk.vtkGridTransform()
    transform.SetDisplacementGridData(vtk_image)
    itk_transform = sitk.DisplacementFieldTransform(sitk.Cast(image, sitk.sitkVectorFloat64))
    lps = _inside_points(geometry, 1)[0]
    ras = lps * np.array([-1.0, -1.0, 1.0])
    rotation = grid.direction_ras
    local = rotation.T @ (ras - grid.origin_ras) + grid.origin_ras
    moved = ras + (np.asarray(transform.TransformPoint(*local)) - local)
    expected = np.asarray(itk_transform.TransformPoint(tuple(lps))) * np.array([-1.0, -1.0, 1.0])
    assert np.abs(moved - expected).max() > 0.1


def test_ijk_to_ras_matches_the_itk_geometry_and_round_trips():
    image, geometry = _oblique_field()
    grid = itk_field_to_slicer_grid(image)
    ijk = np.array([3.0, 5.0, 7.0])
    lps = np.asarray(image.TransformContinuousIndexToPhysicalPoint(tuple(ijk)))
    ras = (grid.ijk_to_ras() @ np.append(ijk, 1.0))[:3]
    np.testing.assert_allclose(ras, lps * np.array([-1, -1, 1]), atol=1e-9)
    back = slicer_grid_to_itk_field(grid)
    np.testing.assert_allclose(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image), atol=1e-12)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-12)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-9)
