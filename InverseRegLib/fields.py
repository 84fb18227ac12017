"""Displacement fields in physical space: sampling, ITK files, Jacobians, inverse consistency.

Physical fields here are numpy arrays ``(z, y, x, 3)`` (the SimpleITK array layout) holding LPS
displacements in mm, vector components in (x, y, z) order, on a :class:`~.grid.Geometry`. An ITK
displacement field image is the same data as a ``sitkVectorFloat64`` image: read as a
``sitk.DisplacementFieldTransform`` it maps a point ``p`` of its grid to ``p + d(p)``
(the resampling convention: fixed-space point to moving-space point).
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .grid import Geometry

#: points are sampled in slabs of this many to bound peak memory on large grids
_CHUNK = 2_000_000


def voxel_field_to_physical(u: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """(1, 3, D, H, W) displacement in voxels of ``geometry`` -> the same in LPS mm."""
    matrix = torch.as_tensor(geometry.index_to_physical, dtype=u.dtype, device=u.device)
    return torch.einsum("ab,nbzyx->nazyx", matrix, u)


def _normalized_grid(points: np.ndarray, geometry: Geometry, device) -> torch.Tensor:
    index = geometry.physical_to_index(points)
    size = np.asarray(geometry.size, dtype=np.float64)
    normalized = 2.0 * index / np.maximum(size - 1.0, 1.0) - 1.0
    return torch.as_tensor(normalized, dtype=torch.float32, device=device)


def sample_grid(volume: torch.Tensor, geometry: Geometry, points: np.ndarray,
                mode: str = "bilinear", padding_mode: str = "border") -> np.ndarray:
    """Sample a (1, C, D, H, W) volume on ``geometry`` at physical points (..., 3); -> (..., C).

    ``padding_mode='border'`` extends fields beyond their grid with edge values; use ``zeros``
    for images so that outside the field of view is background.
    """
    flat = points.reshape(-1, 3)
    out = np.empty((flat.shape[0], volume.shape[1]), dtype=np.float64)
    for start in range(0, flat.shape[0], _CHUNK):
        chunk = flat[start:start + _CHUNK]
        grid = _normalized_grid(chunk, geometry, volume.device).view(1, 1, 1, -1, 3)
        values = F.grid_sample(volume.float(), grid, mode=mode, padding_mode=padding_mode, align_corners=True)
        out[start:start + _CHUNK] = values[0, :, 0, 0].T.double().cpu().numpy()
    return out.reshape(*points.shape[:-1], volume.shape[1])


def field_to_image(displacement: np.ndarray, geometry: Geometry) -> sitk.Image:
    """(z, y, x, 3) LPS mm on ``geometry`` -> ITK displacement field image (VectorFloat64)."""
    expected = (*geometry.array_shape, 3)
    if displacement.shape != expected:
        raise ValueError(f"displacement shape {displacement.shape} does not match the grid {expected}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(displacement, dtype=np.float64), isVector=True)
    return geometry.apply_to(image)


def image_to_field(image: sitk.Image) -> tuple[np.ndarray, Geometry]:
    """ITK displacement field image -> ((z, y, x, 3) float64 array, geometry)."""
    if image.GetNumberOfComponentsPerPixel() != 3 or image.GetDimension() != 3:
        raise ValueError("a 3D displacement field with 3 components per voxel is needed")
    return sitk.GetArrayFromImage(image).astype(np.float64), Geometry.of(image)


def affine_matrix(transform: sitk.Transform) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with ``transform(p) = A @ p + b`` for any linear ITK transform (affine, rigid, ...).

    Read off by transforming the origin and the unit vectors, which is exact for every linear
    kind and avoids depending on which SimpleITK subclass a transform read from file comes back as.
    """
    origin = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)), dtype=np.float64)
    columns = [np.asarray(transform.TransformPoint(tuple(np.eye(3)[i] * 1.0)), dtype=np.float64) - origin
               for i in range(3)]
    return np.stack(columns, axis=1), origin


def apply_affine(transform: sitk.Transform | None, points: np.ndarray) -> np.ndarray:
    """Apply a linear ITK transform (or None = identity) to physical points (..., 3)."""
    if transform is None:
        return points
    matrix, offset = affine_matrix(transform)
    return points @ matrix.T + offset


def warp_image(moving: sitk.Image, displacement: np.ndarray, geometry: Geometry,
               nearest: bool = False, device="cpu") -> sitk.Image:
    """Resample ``moving`` onto ``geometry`` through a displacement field on that grid.

    Equivalent to ``sitk.Resample(moving, reference, DisplacementFieldTransform(field))`` with
    linear (or nearest-neighbour) interpolation and 0 outside the moving image.
    """
    points = geometry.physical_points() + displacement
    array = sitk.GetArrayFromImage(moving).astype(np.float32)
    volume = torch.from_numpy(array)[None, None].to(device)
    values = sample_grid(volume, Geometry.of(moving), points, "nearest" if nearest else "bilinear", "zeros")[..., 0]
    result = sitk.GetImageFromArray(values.astype(array.dtype if not nearest else np.int32))
    geometry.apply_to(result)
    if nearest:
        return sitk.Cast(result, moving.GetPixelID())
    return result


def jacobian_determinant(displacement: np.ndarray, geometry: Geometry) -> np.ndarray:
    """det(I + ∂d/∂p) of a (z, y, x, 3) physical field, by central differences; -> (z, y, x).

    Non-positive values mark folding (the map is not locally invertible there).
    """
    d = displacement.astype(np.float32)
    # gradient[..., a, b] = ∂d_a / ∂index_b with index order (x, y, z) = array axes (2, 1, 0)
    gradient = np.empty((*d.shape[:3], 3, 3), dtype=np.float32)
    for b, axis in enumerate((2, 1, 0)):
        if d.shape[axis] > 1:
            gradient[..., :, b] = np.gradient(d, axis=axis)
        else:
            gradient[..., :, b] = 0.0
    inverse = np.linalg.inv(geometry.index_to_physical).astype(np.float32)
    jacobian = gradient @ inverse + np.eye(3, dtype=np.float32)
    return np.linalg.det(jacobian)


def folding_percent(determinant: np.ndarray, mask: np.ndarray | None = None) -> float:
    values = determinant if mask is None else determinant[mask]
    return float(100.0 * np.count_nonzero(values <= 0) / max(values.size, 1))


def inverse_consistency_error(forward: sitk.Image, backward: sitk.Image,
                              mask: np.ndarray | None = None) -> tuple[float, float]:
    """Mean and 95th percentile of |φTS(φST(x)) - x| (mm) over the forward grid's ``mask``.

    ``forward`` lives on the fixed grid (fixed -> moving points), ``backward`` on the moving grid
    (moving -> fixed points).
    """
    forward_field, forward_geometry = image_to_field(forward)
    backward_field, backward_geometry = image_to_field(backward)
    points = forward_geometry.physical_points()
    if mask is not None:
        points, forward_field = points[mask], forward_field[mask]
    else:
        points, forward_field = points.reshape(-1, 3), forward_field.reshape(-1, 3)
    mapped = points + forward_field
    volume = torch.from_numpy(np.moveaxis(backward_field, -1, 0).astype(np.float32))[None]
    back = mapped + sample_grid(volume, backward_geometry, mapped)
    error = np.linalg.norm(back - points, axis=-1)
    if error.size == 0:
        return 0.0, 0.0
    return float(error.mean()), float(np.percentile(error, 95))
