"""fields.resample_field, both code paths, against SimpleITK's linear resampling of the same field.

``resample_field`` brings the network's model-grid fields back to the image grids. It samples
with ``grid_sample`` in general and, when the output-index -> field-index map is axis-aligned
(same axes up to flips and scale), with three 1D interpolations. Oracle: ``sitk.Resample`` of
the field as a vector image with ``sitkLinear`` (ITK's trilinear interpolation), compared where
the point lies inside the field grid; outside it ITK returns the default value while the library
extends the edge, which is compared against ``grid_sample``'s 'border' mode instead.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from InverseRegLib import fields
from InverseRegLib.fields import field_to_image, resample_field
from InverseRegLib.grid import Geometry, centered_grid
from inversereg_testlib import oblique_geometry

LPS_FROM_RAS = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

#: a coarse field grid (as the model grid) and finer output grids (as the images)
FIELD_GRID = centered_grid((20, 24, 16), (2.0, 2.0, 2.5), IDENTITY, (1.0, -2.0, 3.0))
OUTPUT_GRIDS = {
    # flipped x and y axes, non-integer scale, reaching past the field grid on every side
    "flipped, anisotropic, wider": centered_grid((43, 52, 37), (1.1, 0.9, 1.3), LPS_FROM_RAS, (2.3, -1.1, 4.0)),
    # the benchmark's case: same axes, exactly twice as fine, shifted by a fraction of a voxel
    "same axes, half spacing": centered_grid((40, 48, 32), (1.0, 1.0, 1.25), IDENTITY, (1.3, -2.4, 3.1)),
    "oblique": oblique_geometry((30, 34, 28), (1.2, 1.0, 1.4), center=(0.5, -1.0, 2.0), degrees=15.0),
    # axes off by float32 rounding (as NIfTI quaternions give): still the axis-aligned path
    "float32 noise on the axes": oblique_geometry((40, 48, 32), (1.0, 1.0, 1.25), center=(1.3, -2.4, 3.1),
                                                  degrees=2e-5, noisy_ok=True),
}


def smooth_field(geometry: Geometry) -> np.ndarray:
    """A smooth (z, y, x, 3) vector field with a few mm of structure, float64."""
    points = geometry.physical_points()
    return np.stack([4.0 * np.sin(points[..., 0] / 7.0 + 0.3) * np.cos(points[..., 2] / 9.0),
                     3.0 * np.cos(points[..., 1] / 6.0 - 0.2) + 0.05 * points[..., 0],
                     2.0 * np.sin((points[..., 0] + points[..., 1] - points[..., 2]) / 8.0)], axis=-1)


def as_volume(field: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.moveaxis(field, -1, 0).astype(np.float32))[None]


def itk_resampled(field: np.ndarray, field_geometry: Geometry, output_geometry: Geometry) -> np.ndarray:
    image = field_to_image(field, field_geometry)
    out = sitk.Resample(image, output_geometry.reference_image(sitk.sitkVectorFloat64), sitk.Transform(),
                        sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    return sitk.GetArrayFromImage(out)


def inside(field_geometry: Geometry, output_geometry: Geometry) -> np.ndarray:
    index = field_geometry.physical_to_index(output_geometry.physical_points())
    return np.all((index >= 0.0) & (index <= np.asarray(field_geometry.size) - 1.0), axis=-1)


@pytest.fixture
def separable_calls(monkeypatch):
    """Counts the calls of the axis-aligned sampler, so each test knows which path ran."""
    calls = []
    original = fields._sample_axis_aligned

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(fields, "_sample_axis_aligned", spy)
    return calls


@pytest.mark.parametrize("name", list(OUTPUT_GRIDS))
def test_resample_field_matches_itk_linear_resampling(name, separable_calls):
    output_geometry = OUTPUT_GRIDS[name]
    field = smooth_field(FIELD_GRID)
    ours = resample_field(as_volume(field), FIELD_GRID, output_geometry)
    assert bool(separable_calls) == (name != "oblique"), "the expected sampling path did not run"
    oracle = itk_resampled(field, FIELD_GRID, output_geometry)
    mask = inside(FIELD_GRID, output_geometry)
    assert mask.sum() > 0.3 * mask.size
    assert np.abs(ours[mask] - oracle[mask]).max() < 1e-4


@pytest.mark.parametrize("name", ["flipped, anisotropic, wider", "same axes, half spacing",
                                  "float32 noise on the axes"])
def test_axis_aligned_path_equals_grid_sample_everywhere_including_beyond_the_grid(name, monkeypatch,
                                                                                   separable_calls):
    output_geometry = OUTPUT_GRIDS[name]
    volume = as_volume(smooth_field(FIELD_GRID))
    fast = resample_field(volume, FIELD_GRID, output_geometry)
    calls_fast = len(separable_calls)
    assert calls_fast > 0
    monkeypatch.setattr(fields, "_is_diagonal", lambda matrix, tolerance=0.0: False)
    general = resample_field(volume, FIELD_GRID, output_geometry)
    assert len(separable_calls) == calls_fast, "the general path must not use the separable sampler"
    assert not inside(FIELD_GRID, output_geometry).all(), "the grid must reach past the field"
    assert np.abs(fast - general).max() < 1e-4


def test_axis_aligned_path_with_a_diagonal_pre_map_and_a_post_map(separable_calls):
    """pre = a scaling (still axis-aligned), post = B d + C p + c: checked point by point."""
    output_geometry = OUTPUT_GRIDS["same axes, half spacing"]
    field = smooth_field(FIELD_GRID)
    a, b = np.diag([0.95, 1.05, 1.0]), np.array([0.4, -0.3, 0.2])
    post_b = np.array([[1.02, 0.03, 0.0], [-0.01, 0.98, 0.02], [0.0, 0.01, 1.01]])
    post_c, post_off = post_b - np.eye(3), np.array([1.5, -0.5, 0.25])
    ours = resample_field(as_volume(field), FIELD_GRID, output_geometry, pre=(a, b), post=(post_b, post_c, post_off))
    assert separable_calls
    transform = sitk.DisplacementFieldTransform(field_to_image(field, FIELD_GRID))
    reference = output_geometry.reference_image()
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(60):
        index = tuple(int(v) for v in rng.integers(0, output_geometry.size))
        p = np.asarray(reference.TransformIndexToPhysicalPoint(index))
        q = a @ p + b
        if not np.all((FIELD_GRID.physical_to_index(q) >= 0) & (FIELD_GRID.physical_to_index(q) <= np.asarray(FIELD_GRID.size) - 1)):
            continue
        d = np.asarray(transform.TransformPoint(tuple(q))) - q
        expected = post_b @ d + post_c @ p + post_off
        assert np.allclose(ours[index[::-1]], expected, atol=1e-4)
        checked += 1
    assert checked > 20
