"""Spatial transformation of tensors: warping, field composition, scaling and squaring.

Conventions used throughout the library (voxelmorph-like, made explicit):

* images are ``(B, C, D, H, W)`` tensors whose spatial axes are the SimpleITK array axes
  ``(z, y, x)``;
* a displacement field is ``(B, 3, D, H, W)`` in **voxels of the grid it lives on**, and channel
  ``c`` moves along ITK index axis ``c``: channel 0 along x (W), 1 along y (H), 2 along z (D);
* ``warp(image, u)`` samples ``image`` at ``x + u(x)``: with ``u = u_ST`` defined on the target grid,
  ``warp(S, u_ST)`` is ``S∘φST``, the source brought onto the target. This is the "pull" or
  resampling convention ITK uses, so a field maps fixed-space points to moving-space points.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .sampling import grid_sample


def identity_grid(shape: tuple[int, int, int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel index coordinates ``(1, 3, D, H, W)``, channels in (x, y, z) order."""
    d, h, w = shape
    zz, yy, xx = torch.meshgrid(
        torch.arange(d, device=device, dtype=dtype),
        torch.arange(h, device=device, dtype=dtype),
        torch.arange(w, device=device, dtype=dtype),
        indexing="ij",
    )
    return torch.stack([xx, yy, zz]).unsqueeze(0)


def voxel_to_normalized(coords: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Voxel coordinates ``(B, 3, ...)`` (x, y, z channels) to ``grid_sample``'s ``(B, ..., 3)``.

    ``align_corners=True`` semantics: index 0 maps to -1 and index n-1 to +1.
    """
    d, h, w = shape
    scale = torch.tensor([w - 1, h - 1, d - 1], device=coords.device, dtype=coords.dtype)
    scale = torch.clamp(scale, min=1.0).view(1, 3, *([1] * (coords.dim() - 2)))
    normalized = 2.0 * coords / scale - 1.0
    return normalized.movedim(1, -1)


def warp(
    image: torch.Tensor,
    displacement: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Sample ``image`` (B, C, D, H, W) at ``x + displacement(x)``; returns (B, C, D, H, W).

    ``displacement`` is (B, 3, D, H, W) in voxels; ``mode`` is ``bilinear`` (trilinear in 3D) or
    ``nearest`` (for label maps).
    """
    if displacement.shape[1] != 3 or displacement.dim() != 5:
        raise ValueError(f"displacement must be (B, 3, D, H, W), got {tuple(displacement.shape)}")
    shape = tuple(displacement.shape[2:])
    coords = identity_grid(shape, displacement.device, displacement.dtype) + displacement
    grid = voxel_to_normalized(coords, shape)
    return grid_sample(image.to(displacement.dtype), grid, mode=mode, padding_mode=padding_mode)


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Displacement of ``outer ∘ inner``: ``x -> x + inner(x) + outer(x + inner(x))``.

    Both are (B, 3, D, H, W) on the same grid. Border padding extends the outer field beyond the
    grid with its edge values instead of snapping to zero displacement.
    """
    return inner + warp(outer, inner, padding_mode="border")


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring: displacement of ``exp(velocity)`` for a stationary velocity field.

    ``velocity`` (B, 3, D, H, W) in voxels; ``steps`` squarings, so the field is first divided by
    ``2**steps``. With a smooth velocity the result is a diffeomorphism up to interpolation error.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    displacement = velocity / (2.0**steps)
    for _ in range(steps):
        displacement = compose(displacement, displacement)
    return displacement


def resize_displacement(displacement: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Trilinearly resample a displacement field to ``shape`` and rescale its voxel units."""
    old = displacement.shape[2:]
    if tuple(old) == tuple(shape):
        return displacement
    resized = F.interpolate(displacement, size=shape, mode="trilinear", align_corners=True)
    # channel c is along W, H, D for c = 0, 1, 2
    factors = [
        (shape[2] - 1) / max(old[2] - 1, 1),
        (shape[1] - 1) / max(old[1] - 1, 1),
        (shape[0] - 1) / max(old[0] - 1, 1),
    ]
    return resized * torch.tensor(factors, dtype=resized.dtype, device=resized.device).view(1, 3, 1, 1, 1)
