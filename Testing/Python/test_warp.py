"""warp.py: the voxel-space conventions every other module relies on.

Convention under test: images are (B, C, D, H, W) = SimpleITK array axes (z, y, x); a displacement
(B, 3, D, H, W) is in voxels, channel 0 along x (W), 1 along y (H), 2 along z (D); ``warp(I, u)``
samples ``I`` at ``x + u(x)``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from InverseRegLib.warp import compose, identity_grid, integrate_velocity, resize_displacement, warp

SHAPE = (6, 7, 8)  # D, H, W all different so a swapped axis cannot go unnoticed


def random_image(shape=SHAPE, seed=0) -> torch.Tensor:
    return torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(seed))


def constant_field(shape, vector) -> torch.Tensor:
    return torch.tensor(vector, dtype=torch.float32).view(1, 3, 1, 1, 1).expand(1, 3, *shape).clone()


def smooth_field(shape, amplitude, seed=0) -> torch.Tensor:
    coarse = amplitude * torch.randn(1, 3, 3, 3, 3, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def test_identity_grid_channels_are_x_y_z():
    grid = identity_grid(SHAPE)
    assert grid.shape == (1, 3, *SHAPE)
    d, h, w = SHAPE
    assert torch.equal(grid[0, 0, 2, 3, :], torch.arange(w, dtype=torch.float32))  # x runs along W
    assert torch.equal(grid[0, 1, 2, :, 4], torch.arange(h, dtype=torch.float32))  # y along H
    assert torch.equal(grid[0, 2, :, 3, 4], torch.arange(d, dtype=torch.float32))  # z along D


def test_identity_field_returns_the_image():
    image = random_image()
    out = warp(image, torch.zeros(1, 3, *SHAPE))
    assert torch.allclose(out, image, atol=1e-6)


@pytest.mark.parametrize("channel,array_axis", [(0, 4), (1, 3), (2, 2)])
@pytest.mark.parametrize("shift", [1, -2])
def test_integer_shift_moves_the_array_exactly(channel, array_axis, shift):
    """u = +s along channel c samples I[x + s]: the array moves by -s along the matching axis,
    and what comes from outside the image is 0."""
    image = random_image(seed=channel)
    vector = [0.0, 0.0, 0.0]
    vector[channel] = float(shift)
    out = warp(image, constant_field(SHAPE, vector))
    n = image.shape[array_axis]
    expected = torch.zeros_like(image)
    if shift > 0:
        expected.narrow(array_axis, 0, n - shift).copy_(image.narrow(array_axis, shift, n - shift))
    else:
        expected.narrow(array_axis, -shift, n + shift).copy_(image.narrow(array_axis, 0, n + shift))
    assert torch.allclose(out, expected, atol=1e-5)


def test_nearest_mode_keeps_labels():
    labels = torch.randint(0, 5, (1, 1, *SHAPE), generator=torch.Generator().manual_seed(3)).float()
    out = warp(labels, constant_field(SHAPE, [0.4, -0.3, 0.2]), mode="nearest")
    assert torch.equal(out, labels)  # sub-half-voxel shifts round back to the same voxel


def test_warp_rejects_a_wrong_field_shape():
    with pytest.raises(ValueError, match=r"\(B, 3, D, H, W\)"):
        warp(random_image(), torch.zeros(1, 2, *SHAPE))


def test_compose_shift_with_its_negative_is_zero():
    u = constant_field(SHAPE, [1.5, -0.5, 2.0])
    assert torch.allclose(compose(-u, u), torch.zeros_like(u), atol=1e-5)
    assert torch.allclose(compose(u, -u), torch.zeros_like(u), atol=1e-5)


def test_compose_is_the_displacement_of_outer_after_inner():
    """compose(outer, inner)(x) = inner(x) + outer(x + inner(x)), checked on a linear outer field
    (trilinear interpolation of a linear field is exact)."""
    shape = (8, 8, 8)
    grid = identity_grid(shape)
    outer = torch.stack([0.1 * grid[0, 1], -0.05 * grid[0, 2], 0.02 * grid[0, 0]])[None]
    inner = constant_field(shape, [1.0, 0.5, -1.0])
    composed = compose(outer, inner)
    moved = grid + inner
    expected = inner + torch.stack([0.1 * moved[0, 1], -0.05 * moved[0, 2], 0.02 * moved[0, 0]])[None]
    interior = (slice(None), slice(None), slice(1, -1), slice(1, -1), slice(1, -2))  # moved stays inside
    assert torch.allclose(composed[interior], expected[interior], atol=1e-5)


def test_integrate_constant_velocity_is_the_translation():
    v = constant_field(SHAPE, [0.7, -1.3, 2.2])
    assert torch.allclose(integrate_velocity(v, steps=7), v, atol=1e-5)
    assert torch.allclose(integrate_velocity(v, steps=0), v)


def test_integrated_velocity_and_its_negative_are_inverse():
    shape = (16, 16, 16)
    v = smooth_field(shape, 1.5)
    forward, backward = integrate_velocity(v), integrate_velocity(-v)
    round_trip = compose(backward, forward)
    inner = round_trip[:, :, 3:-3, 3:-3, 3:-3]  # away from the border padding
    assert forward.abs().max() > 1.0  # a real deformation, not a near-identity
    assert inner.abs().max() < 0.05 * forward.abs().max()


def test_integrate_velocity_rejects_negative_steps():
    with pytest.raises(ValueError):
        integrate_velocity(torch.zeros(1, 3, 4, 4, 4), steps=-1)


def test_resize_displacement_scales_voxel_units_per_axis():
    u = constant_field((8, 8, 8), [1.0, 1.0, 1.0])
    resized = resize_displacement(u, (15, 8, 4))  # D: 8->15, H: unchanged, W: 8->4
    assert resized.shape == (1, 3, 15, 8, 4)
    assert torch.allclose(resized[0, 0], torch.full((15, 8, 4), 3.0 / 7.0))  # x along W: (4-1)/(8-1)
    assert torch.allclose(resized[0, 1], torch.ones(15, 8, 4))  # y along H: 1
    assert torch.allclose(resized[0, 2], torch.full((15, 8, 4), 2.0))  # z along D: (15-1)/(8-1)
    assert resize_displacement(u, (8, 8, 8)) is u


def test_resize_displacement_preserves_the_physical_map():
    """Warping a linear image by a field, or by the resized field on the resized grid, samples the
    same physical points (the grids span the same extent, align_corners)."""
    coarse_shape, fine_shape = (8, 10, 12), (15, 19, 23)
    u = smooth_field(coarse_shape, 1.0, seed=4)
    fine = resize_displacement(u, fine_shape)
    # a map point x -> x + u(x) in normalised [-1, 1] coordinates must agree at shared grid points
    coarse_points = identity_grid(coarse_shape) + u
    fine_points = identity_grid(fine_shape) + fine
    scale_c = torch.tensor([11.0, 9.0, 7.0]).view(1, 3, 1, 1, 1)
    scale_f = torch.tensor([22.0, 18.0, 14.0]).view(1, 3, 1, 1, 1)
    assert torch.allclose(coarse_points / scale_c, fine_points[:, :, ::2, ::2, ::2] / scale_f, atol=1e-5)
