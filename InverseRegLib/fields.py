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

from .grid import Geometry
from .sampling import grid_sample

#: points are sampled in slabs of this many to bound peak memory on large grids
_CHUNK = 2_000_000


def voxel_field_to_physical(u: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """(1, 3, D, H, W) displacement in voxels of ``geometry`` -> the same in LPS mm."""
    matrix = torch.as_tensor(geometry.index_to_physical, dtype=u.dtype, device=u.device)
    return torch.einsum("ab,nbzyx->nazyx", matrix, u)


def index_affine(geometry: Geometry, matrix, offset, device="cpu", z_range: tuple[int, int] | None = None):
    """``matrix @ (i, j, k) + offset`` at every voxel index of ``geometry`` (rows ``z_range`` of
    it, default all): a float32 tensor (z, y, x, 3). A sum of three broadcast outer products, so
    no index array is built."""
    nx, ny, nz = geometry.size
    z0, z1 = z_range if z_range is not None else (0, nz)
    matrix = torch.as_tensor(np.asarray(matrix, dtype=np.float64), dtype=torch.float32, device=device)
    offset = torch.as_tensor(np.asarray(offset, dtype=np.float64), dtype=torch.float32, device=device)
    k = torch.arange(z0, z1, dtype=torch.float32, device=device)
    j = torch.arange(ny, dtype=torch.float32, device=device)
    i = torch.arange(nx, dtype=torch.float32, device=device)
    return (offset + k.view(-1, 1, 1, 1) * matrix[:, 2] + j.view(1, ny, 1, 1) * matrix[:, 1]
            + i.view(1, 1, nx, 1) * matrix[:, 0])


def physical_points(geometry: Geometry, device="cpu") -> torch.Tensor:
    """Voxel centres of ``geometry`` as a float32 tensor (z, y, x, 3) of LPS mm (torch's threads
    make this several times faster than the float64 numpy version for full-size grids)."""
    return index_affine(geometry, geometry.index_to_physical, geometry.origin, device)


def _z_slabs(geometry: Geometry):
    """``(z0, z1)`` ranges of whole z-slices holding about ``_CHUNK`` voxels each (at least one
    slice): the unit of work that bounds peak memory on large grids."""
    nx, ny, nz = geometry.size
    rows = max(1, _CHUNK // max(nx * ny, 1))
    for z0 in range(0, nz, rows):
        yield z0, min(nz, z0 + rows)


def resample_field(field: torch.Tensor, field_geometry: Geometry, output_geometry: Geometry,
                   pre: tuple[np.ndarray, np.ndarray] | None = None,
                   post: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``B @ field(A p + b) + C p + c`` at every voxel centre p of ``output_geometry``; -> (z, y, x, C) float32
    (the precision it is computed in; half the memory of float64 on large grids).

    ``field`` is (1, C, D, H, W) on ``field_geometry``, sampled trilinearly with border extension.
    ``pre = (A, b)`` maps output points into the field's space (default identity); ``post = (B, C, c)``
    adds a linear map of the sampled value and an affine term in p (default: the value alone).
    Both are folded into affine functions of the voxel index, so each z-slab costs one broadcast
    grid and one ``grid_sample``: no point array, no per-point matrix product for the grid. When
    that index map is axis-aligned (same axes up to flips and scale: the pre-aligned case, and
    the forward field whenever the model grid shares the image's axes) the sampling is separable
    and done as three 1D interpolations instead (:func:`_sample_axis_aligned`), same values.
    """
    nx, ny, nz = output_geometry.size
    index_to_point = np.asarray(output_geometry.index_to_physical, dtype=np.float64)
    origin = np.asarray(output_geometry.origin, dtype=np.float64)
    a, b = pre if pre is not None else (np.eye(3), np.zeros(3))
    # field-space point q(i) = A (M i + o) + b; grid_sample coordinate g = K (q - o_f) - 1
    k = _to_normalized(field_geometry)
    grid_matrix = k @ a @ index_to_point
    grid_offset = k @ (a @ origin + b - np.asarray(field_geometry.origin, dtype=np.float64)) - 1.0
    out = np.empty((nz, ny, nx, field.shape[1]), dtype=np.float32)
    out_t = torch.from_numpy(out)
    volume = field.float()
    separable = _is_diagonal(grid_matrix)
    for z0, z1 in _z_slabs(output_geometry):
        if separable:
            values = _sample_axis_aligned(volume, field_geometry.size, np.diag(grid_matrix), grid_offset,
                                          (nx, ny), (z0, z1))
        else:
            grid = index_affine(output_geometry, grid_matrix, grid_offset, field.device, (z0, z1))
            values = grid_sample(volume, grid[None], padding_mode="border")
        values = values[0].permute(1, 2, 3, 0)
        if post is not None:
            matrix, linear, constant = (np.asarray(x, dtype=np.float64) for x in post)
            values = _times_transpose(values, matrix)
            values = values + index_affine(output_geometry, linear @ index_to_point, linear @ origin + constant,
                                           field.device, (z0, z1))
        out_t[z0:z1].copy_(values)
    return out


#: off-diagonal entries up to this fraction of the largest entry count as zero: ITK's own direction
#: tolerance (ImageToImageFilter::DirectionTolerance), so directions read from float32 headers
#: (NIfTI quaternions) still take the axis-aligned paths. On a 256-voxel grid it moves a sampling
#: point by at most ~1e-4 voxel.
DIAGONAL_TOLERANCE = 1e-6


def _is_diagonal(matrix: np.ndarray, tolerance: float = DIAGONAL_TOLERANCE) -> bool:
    off_diagonal = matrix - np.diag(np.diag(matrix))
    return float(np.abs(off_diagonal).max()) <= tolerance * float(np.abs(matrix).max())


def _times_transpose(vectors: torch.Tensor, matrix: np.ndarray) -> torch.Tensor:
    """``vectors @ matrix.T`` for (..., 3) vectors; a per-component scale when ``matrix`` is
    diagonal (grids whose axes are the coordinate axes up to flips), several times faster."""
    if _is_diagonal(matrix):
        return vectors * torch.as_tensor(np.diag(matrix).copy(), dtype=vectors.dtype, device=vectors.device)
    return vectors @ torch.as_tensor(matrix.T, dtype=vectors.dtype, device=vectors.device)


def _sample_axis_aligned(volume: torch.Tensor, field_size, scale: np.ndarray, offset: np.ndarray,
                         xy_size: tuple[int, int], z_range: tuple[int, int]) -> torch.Tensor:
    """What ``grid_sample(volume, grid, 'bilinear', 'border', align_corners=True)`` returns when
    every grid coordinate depends on its own output index only (``g_a = scale_a * i_a + offset_a``):
    trilinear interpolation is then a product of three 1D interpolations, each a matrix product
    along one axis (two non-zeros per row). Dense BLAS products beat ``grid_sample``'s eight
    scattered reads per voxel several times over on a 1 mm brain grid.

    ``volume`` (1, C, D, H, W); -> (1, C, z1 - z0, ny, nx) for output rows ``z_range``.
    """
    nx, ny = xy_size
    z0, z1 = z_range

    def weights(axis: int, indices: np.ndarray) -> torch.Tensor:
        n = int(field_size[axis])
        # grid_sample's unnormalisation for align_corners=True, then 'border' clamping
        position = np.clip((scale[axis] * indices + offset[axis] + 1.0) * 0.5 * (n - 1), 0.0, n - 1)
        lower = np.minimum(np.floor(position).astype(np.int64), n - 1)
        upper = np.minimum(lower + 1, n - 1)
        fraction = position - lower
        matrix = np.zeros((len(indices), n), dtype=np.float32)
        rows = np.arange(len(indices))
        np.add.at(matrix, (rows, lower), 1.0 - fraction)
        np.add.at(matrix, (rows, upper), fraction)
        return torch.from_numpy(matrix).to(volume.device)

    channels, depth, height, width = volume.shape[1:]
    # each product contracts one axis in place (batched matmul), so no permuted copies are made
    values = torch.matmul(weights(2, np.arange(z0, z1)), volume[0].reshape(channels, depth, height * width))
    values = torch.matmul(values.view(channels, z1 - z0, height, width), weights(0, np.arange(nx)).T)
    values = torch.matmul(weights(1, np.arange(ny)), values.view(channels * (z1 - z0), height, nx))
    return values.view(1, channels, z1 - z0, ny, nx)


def _to_normalized(geometry: Geometry) -> np.ndarray:
    """K with grid_sample coordinate = K (p - origin) - 1 for physical points p of ``geometry``
    (align_corners=True): K = diag(2 / (n - 1)) M^-1."""
    size = np.asarray(geometry.size, dtype=np.float64)
    return np.diag(2.0 / np.maximum(size - 1.0, 1.0)) @ np.linalg.inv(geometry.index_to_physical)


def _normalized_grid(points, geometry: Geometry, device) -> torch.Tensor:
    """Physical points (..., 3) -> grid_sample coordinates of ``geometry`` (align_corners=True)."""
    origin = torch.as_tensor(geometry.origin, dtype=torch.float32, device=device)
    points = torch.as_tensor(points, dtype=torch.float32, device=device)
    return _times_transpose(points - origin, _to_normalized(geometry)) - 1.0


def sample_grid(volume: torch.Tensor, geometry: Geometry, points,
                mode: str = "bilinear", padding_mode: str = "border"):
    """Sample a (1, C, D, H, W) volume on ``geometry`` at physical points (..., 3); -> (..., C).

    ``points`` may be a numpy array (the result is then float64 numpy) or a tensor (the result is
    a float32 tensor on the volume's device). ``padding_mode='border'`` extends fields beyond
    their grid with edge values; ``'itk'`` is what ITK's resampling does for images: points up
    to half a voxel beyond the outer voxel centres take the edge value, points further out are 0
    (``'zeros'`` instead fades to 0 across that half voxel).
    """
    as_numpy = isinstance(points, np.ndarray)
    points_t = torch.as_tensor(points, dtype=torch.float32, device=volume.device)
    flat = points_t.reshape(-1, 3)
    out = torch.empty((flat.shape[0], volume.shape[1]), dtype=torch.float32, device=volume.device)
    for start in range(0, flat.shape[0], _CHUNK):
        grid = _normalized_grid(flat[start:start + _CHUNK], geometry, volume.device)
        out[start:start + _CHUNK] = _sample_normalized(volume, grid, geometry, mode, padding_mode)
    out = out.reshape(*points_t.shape[:-1], volume.shape[1])
    return out.double().cpu().numpy() if as_numpy else out


def _sample_normalized(volume: torch.Tensor, grid: torch.Tensor, geometry: Geometry, mode: str,
                       padding_mode: str) -> torch.Tensor:
    """``grid_sample`` at (..., 3) normalised coordinates of ``geometry``; -> (N, C) float32,
    with the 'itk' padding rule of :func:`sample_grid`."""
    itk = padding_mode == "itk"
    values = grid_sample(volume.float(), grid.reshape(1, 1, 1, -1, 3), mode=mode,
                         padding_mode="border" if itk else padding_mode)
    values = values[0, :, 0, 0].T
    if itk:
        values = values * inside_itk_buffer(grid.reshape(-1, 3), geometry.size)[:, None]
    return values


def inside_itk_buffer(grid: torch.Tensor, size) -> torch.Tensor:
    """(N,) bool: which of the (N, 3) normalised grid_sample coordinates (align_corners=True) of
    a grid of ``size`` (x, y, z voxels) ITK reads the grid at. That is its ``IsInsideBuffer``:
    a continuous index in [-0.5, n - 0.5) on every axis, the outer half voxel taking the edge
    value. Beyond it ITK's resampling gives 0 and a ``DisplacementFieldTransform`` moves the point
    by nothing, which is how SimpleITK, ANTs and Slicer's ITK readers compose the written fields."""
    # normalised index 2i/(n-1) - 1
    size = torch.as_tensor(size, dtype=grid.dtype, device=grid.device)
    bound = 1.0 + 1.0 / torch.clamp(size - 1.0, min=1.0)
    return ((grid >= -bound) & (grid < bound)).all(dim=1)


def field_to_image(displacement: np.ndarray, geometry: Geometry, float64: bool = True) -> sitk.Image:
    """(z, y, x, 3) LPS mm on ``geometry`` -> ITK displacement field image (VectorFloat64).

    A float32 array goes through a float32 image and ITK's cast, which needs 1.5x the final
    image's memory at its peak instead of 2x for a float64 copy first (large grids).
    ``float64=False`` keeps a float32 array's image float32 (a caller that frees the array before
    casting saves its memory too)."""
    expected = (*geometry.array_shape, 3)
    if displacement.shape != expected:
        raise ValueError(f"displacement shape {displacement.shape} does not match the grid {expected}")
    if np.asarray(displacement).dtype == np.float32:
        image = sitk.GetImageFromArray(np.ascontiguousarray(displacement), isVector=True)
        if float64:
            image = sitk.Cast(image, sitk.sitkVectorFloat64)
    else:
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


def warp_image(moving: sitk.Image, displacement, geometry: Geometry,
               nearest: bool = False, device="cpu") -> sitk.Image:
    """Resample ``moving`` onto ``geometry`` through a displacement field on that grid.

    ``displacement`` is (z, y, x, 3) LPS mm (numpy or tensor). Equivalent to
    ``sitk.Resample(moving, reference, DisplacementFieldTransform(field))`` with linear (or
    nearest-neighbour) interpolation and 0 outside the moving image, including ITK's border rule
    (edge value up to half a voxel beyond the outer voxel centres). The sampling coordinates
    ``K (p + d(p) - o) - 1`` are built per z-slab as an index-affine grid plus ``K d``, so no
    array of physical points is made.
    """
    moving_geometry = Geometry.of(moving)
    k = _to_normalized(moving_geometry)
    grid_matrix = k @ geometry.index_to_physical
    grid_offset = k @ (np.asarray(geometry.origin) - np.asarray(moving_geometry.origin)) - 1.0
    array = sitk.GetArrayFromImage(moving)
    volume = torch.from_numpy(array.astype(np.float32, copy=False))[None, None].to(device)
    nx, ny, nz = geometry.size
    values = np.empty(geometry.array_shape, dtype=np.float32)
    for z0, z1 in _z_slabs(geometry):
        grid = index_affine(geometry, grid_matrix, grid_offset, device, (z0, z1))
        grid += _times_transpose(_float32_slab(displacement, z0, z1, device), k)
        sampled = _sample_normalized(volume, grid, moving_geometry, "nearest" if nearest else "bilinear", "itk")
        values[z0:z1] = sampled[:, 0].reshape(z1 - z0, ny, nx).cpu().numpy()
    result = sitk.GetImageFromArray(np.rint(values).astype(array.dtype) if nearest else values)
    return geometry.apply_to(result)


def _float32_slab(displacement, z0: int, z1: int, device) -> torch.Tensor:
    """Rows ``z0:z1`` of a (z, y, x, 3) numpy array or tensor as a float32 tensor: converted a
    slab at a time, so a large float64 field (or a read-only view of an ITK image) is never
    copied whole."""
    part = displacement[z0:z1]
    if isinstance(part, np.ndarray):
        part = np.array(part, dtype=np.float32)
    return torch.as_tensor(part, dtype=torch.float32, device=device)


def jacobian_determinant(displacement, geometry: Geometry) -> np.ndarray:
    """det(I + ∂d/∂p) of a (z, y, x, 3) physical field, by central differences; -> (z, y, x).

    Non-positive values mark folding (the map is not locally invertible there). Computed on a
    component-first copy with in-place arithmetic, and with one term per entry instead of three
    when the grid's axes are the coordinate axes (up to flips): a 1 mm brain field in ~0.3 s.
    """
    # (3, z, y, x): component a of the displacement along dim 0
    if isinstance(displacement, np.ndarray) and not displacement.flags.writeable:
        # a read-only view of a written image: torch warns on those; float32 is a copy anyway
        displacement = displacement.astype(np.float32)
    d = torch.as_tensor(displacement, dtype=torch.float32).permute(3, 0, 1, 2).contiguous()
    inverse = np.linalg.inv(geometry.index_to_physical)
    # g[b][a] = ∂d_a / ∂index_b; index order (x, y, z) = dims (3, 2, 1)
    g = [torch.gradient(d, dim=dim)[0] if d.shape[dim] > 1 else torch.zeros_like(d) for dim in (3, 2, 1)]
    diagonal = _is_diagonal(inverse)
    # J[a][c] = δ_ac + Σ_b g[b][a] inverse[b][c]
    j = [[None] * 3 for _ in range(3)]
    for a in range(3):
        for c in range(3):
            if diagonal:
                entry = g[c][a] * float(inverse[c, c])
            else:
                entry = g[0][a] * float(inverse[0, c])
                for b in (1, 2):
                    entry.add_(g[b][a], alpha=float(inverse[b, c]))
            j[a][c] = entry.add_(1.0) if a == c else entry
    det = j[1][1] * j[2][2]
    det.sub_(j[1][2] * j[2][1]).mul_(j[0][0])
    term = j[1][0] * j[2][2]
    det.sub_(term.sub_(j[1][2] * j[2][0]).mul_(j[0][1]))
    term = j[1][0] * j[2][1]
    det.add_(term.sub_(j[1][1] * j[2][0]).mul_(j[0][2]))
    return det.numpy()


def folding_percent(determinant: np.ndarray, mask: np.ndarray | None = None) -> float:
    values = determinant if mask is None else determinant[mask]
    return float(100.0 * np.count_nonzero(values <= 0) / max(values.size, 1))


def inverse_consistency_error(forward: sitk.Image, backward: sitk.Image,
                              mask: np.ndarray | None = None) -> tuple[float, float]:
    """Mean and 95th percentile of |φTS(φST(x)) - x| (mm) over the forward grid's ``mask``, at every
    voxel (:func:`InverseRegLib.quality.inverse_consistency` on the images' arrays, stride 1).

    ``forward`` lives on the fixed grid (fixed -> moving points), ``backward`` on the moving grid
    (moving -> fixed points).
    """
    from .quality import inverse_consistency  # quality builds on this module
    forward_field, forward_geometry = image_to_field(forward)
    backward_field, backward_geometry = image_to_field(backward)
    return inverse_consistency(forward_field, forward_geometry, backward_field, backward_geometry, mask, stride=1)
