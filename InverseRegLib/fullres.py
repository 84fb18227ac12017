"""``--quality best``: greedy-like optimisation at the input's full resolution, warm-started by the network.

The network's forward field (on the fixed grid, affine included), after the model-grid NCC
iterations of :mod:`InverseRegLib.polish`, replaces the coarse levels of a classic
multi-resolution optimiser; what is left is the part a 2 mm grid cannot see. Each
iteration, as greedy (Yushkevich et al.) and ANTs SyN do it:

1. warp the moving image by the current field ``f`` (trilinear);
2. local NCC between the fixed image and the warped one in a ``(2 r + 1)^3`` window (box sums,
   separable) and its pointwise gradient with respect to the warped intensity, times the warped
   image's gradient: the force ``g(x)``, in LPS mm;
3. ``g`` smoothed by a Gaussian of ``sigma_update`` voxels, scaled so that its 99.9th percentile
   displacement is ``step`` voxels (and clipped there), composed with ``f``; then ``f`` smoothed
   by a Gaussian of ``sigma_field`` voxels (greedy's ``-s 1.5vox 0.5vox``: fluid and elastic
   regularisation; the defaults keep the fluid part only, chosen on the choice pairs of the model
   card: Dice rewards the sharper field, and :mod:`~.unfold` removes the rare folds).

Levels (the default runs one, the full resolution; the first of several run on grids ``2^k`` times coarser (images Gaussian-smoothed and
resampled, the field resampled) and hand their *update* upsampled to the next); the last runs on
the fixed image's own grid. The backward field is then the exact inverse of the result
(:mod:`InverseRegLib.inverse`).

Arrays: images (z, y, x) float32; fields (z, y, x, 3) LPS mm, components (x, y, z).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from .errors import InverseRegError
from .fields import _is_diagonal, _times_transpose, _to_normalized, index_affine, resample_field
from .grid import Geometry
from .intensity import normalize
from .sampling import grid_sample


@dataclass(frozen=True)
class FullResSettings:
    """What ``--quality best`` runs; chosen on training pairs (see the model card)."""
    # per level, coarsest first; the last level is full resolution. The default: 10 at full
    # resolution only, after the model-grid stage (InverseRegLib.polish), which takes the coarse
    # level's place (second round: 20 at 2 mm + 10 at 1 mm without that stage was 0.004 Dice
    # better on the six choice pairs, within the 0.005 margin, and slower). Fourth round: 8 were
    # 0.002 Dice worse there (a tie) and ~2.5 s faster in the whole command; 10 kept for the
    # Dice goal (model card)
    iterations: tuple[int, ...] = (10,)
    # NCC window (2 r + 1)^3 voxels: 7^3 since the fourth round (greedy's -m NCC 2x2x2 is 5^3;
    # with the update smoothing of 1.0 below, +0.0064 Dice on the choice pairs, beyond the 0.005
    # margin; a window of 9^3 or smoothing 0.75 tied; the cost does not depend on the window)
    radius: int = 3
    sigma_update: float = 1.0  # Gaussian on each update, voxels of the level's grid
    # Gaussian on the whole field after each update; 0 since the model card's third round (+0.009
    # Dice over greedy's 0.5 on the choice pairs, a tie with the variants around it)
    sigma_field: float = 0.0
    step: float = 0.5  # largest displacement of one update, voxels of the level's grid

    def __post_init__(self):
        if not self.iterations or any(not isinstance(n, int) or n < 0 for n in self.iterations):
            raise InverseRegError(f"iterations per level must be whole numbers >= 0, got {self.iterations!r}")
        if self.radius < 1 or self.sigma_update < 0 or self.sigma_field < 0 or not self.step > 0:
            raise InverseRegError(f"invalid full-resolution settings: {self}")


DEFAULT_SETTINGS = FullResSettings()

Progress = Callable[[float, str], None]


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(3.0 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-t ** 2 / (2.0 * sigma ** 2))
    return kernel / kernel.sum()


@lru_cache(maxsize=64)
def _axis_matrix(n: int, kind: str, parameter: float) -> torch.Tensor:
    """(n, n) float32 matrix of a 1D filter along an axis of n voxels: ``gauss`` (sigma
    ``parameter``, edges replicated) or ``box`` (radius ``parameter``, a mean over the taps inside
    the axis, as ``avg_pool3d(count_include_pad=False)``)."""
    matrix = np.zeros((n, n), dtype=np.float64)
    rows = np.arange(n)
    if kind == "gauss":
        kernel = _gaussian_kernel(parameter)
        radius = len(kernel) // 2
        for tap, weight in zip(range(-radius, radius + 1), kernel):
            np.add.at(matrix, (rows, np.clip(rows + tap, 0, n - 1)), weight)
    else:
        radius = int(parameter)
        for tap in range(-radius, radius + 1):
            inside = (rows + tap >= 0) & (rows + tap < n)
            matrix[rows[inside], rows[inside] + tap] = 1.0
        matrix /= matrix.sum(axis=1, keepdims=True)
    return torch.from_numpy(matrix.astype(np.float32))


#: output rows per block of an axis product: each block multiplies only the (rows + 2 radius)
#: input rows its band reaches, not the whole axis (about 4x fewer operations on a 1 mm brain)
_BAND_BLOCK = 32


def _band_blocks(n: int, radius: int) -> list[tuple[int, int, int, int]]:
    """(first row, row stop, first column, column stop) of each block of a banded (n, n) matrix."""
    return [(a, min(n, a + _BAND_BLOCK), max(0, a - radius), min(n, a + _BAND_BLOCK + radius))
            for a in range(0, n, _BAND_BLOCK)]


def _separable(volume: torch.Tensor, kind: str, parameter: float) -> torch.Tensor:
    """A 1D filter (:func:`_axis_matrix`) along each of D, H, W of (1, C, D, H, W).

    Each axis is a few dense matrix products, one per block of :data:`_BAND_BLOCK` output rows
    with the input rows its band reaches: BLAS does these 5-13 taps several times faster than
    shifted multiply-adds or ``avg_pool3d`` on a CPU, and the blocks skip most of the band's zeros
    (measured 1.9x faster than one product over the whole axis on a 1 mm brain's 3 channels)."""
    channels, depth, height, width = volume.shape[1:]
    radius = int(parameter) if kind == "box" else len(_gaussian_kernel(parameter)) // 2
    rows = volume.reshape(channels * depth * height, width)
    along_x = torch.empty_like(rows)
    matrix = _axis_matrix(width, kind, parameter).T
    for a, b, c0, c1 in _band_blocks(width, radius):
        along_x[:, a:b] = torch.mm(rows[:, c0:c1], matrix[c0:c1, a:b])
    planes = along_x.view(channels * depth, height, width)
    along_y = torch.empty_like(planes)
    matrix = _axis_matrix(height, kind, parameter)
    for a, b, c0, c1 in _band_blocks(height, radius):
        along_y[:, a:b] = torch.matmul(matrix[a:b, c0:c1], planes[:, c0:c1])
    slabs = along_y.view(channels, depth, height * width)
    along_z = torch.empty_like(slabs)
    matrix = _axis_matrix(depth, kind, parameter)
    for channel in range(channels):
        for a, b, c0, c1 in _band_blocks(depth, radius):
            torch.mm(matrix[a:b, c0:c1], slabs[channel, c0:c1], out=along_z[channel, a:b])
    return along_z.view(1, channels, depth, height, width)


def gaussian_smooth(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian (``sigma`` voxels, 3 sigma radius, edges replicated) of (1, C, D, H, W)."""
    if sigma <= 0:
        return volume
    return _separable(volume.float().contiguous(), "gauss", float(sigma))


def _box_mean(volume: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the (2 r + 1)^3 window around each voxel (separable; shrinks at the faces)."""
    return _separable(volume.contiguous(), "box", int(radius))


def _index_gradient(volume: torch.Tensor) -> torch.Tensor:
    """Central differences of (1, 1, D, H, W) along index x, y, z (one-sided at the faces, as
    ``torch.gradient``); -> (1, 3, D, H, W). Written into one buffer: several times faster."""
    out = torch.empty((1, 3, *volume.shape[2:]), dtype=volume.dtype, device=volume.device)
    for channel, dim in enumerate((4, 3, 2)):
        target = out[:, channel:channel + 1]
        n = volume.shape[dim]
        if n < 2:
            target.zero_()
            continue
        if n > 2:
            inner = target.narrow(dim, 1, n - 2)
            torch.sub(volume.narrow(dim, 2, n - 2), volume.narrow(dim, 0, n - 2), out=inner)
            inner.mul_(0.5)
        torch.sub(volume.narrow(dim, 1, 1), volume.narrow(dim, 0, 1), out=target.narrow(dim, 0, 1))
        torch.sub(volume.narrow(dim, n - 1, 1), volume.narrow(dim, n - 2, 1), out=target.narrow(dim, n - 1, 1))
    return out


def _channels_times(volume: torch.Tensor, matrix: np.ndarray) -> torch.Tensor:
    """``matrix @ v`` for the 3-vectors v along dim 1 of (1, 3, D, H, W); a per-channel scale
    (in place) when ``matrix`` is diagonal."""
    if _is_diagonal(matrix):
        return volume.mul_(torch.as_tensor(np.diag(matrix).copy(), dtype=volume.dtype).view(1, 3, 1, 1, 1))
    return torch.einsum("ab,nbzyx->nazyx", torch.as_tensor(matrix, dtype=volume.dtype), volume).contiguous()


def _coarse_geometry(geometry: Geometry, factor: int) -> Geometry:
    """The grid ``factor`` times coarser covering the same box (voxel centres re-centred)."""
    size = tuple(max(1, int(round(n / factor))) for n in geometry.size)
    spacing = tuple(s * n / m for s, n, m in zip(geometry.spacing, geometry.size, size))
    matrix = geometry.direction_matrix
    # keep the physical extent's corner: origin shifts by half a fine voxel minus half a coarse one
    shift = matrix @ ((np.asarray(spacing) - np.asarray(geometry.spacing)) / 2.0)
    return Geometry(size, spacing, tuple(np.asarray(geometry.origin) + shift), geometry.direction)


def _downsample(image: sitk.Image, factor: int) -> sitk.Image:
    if factor == 1:
        return image
    geometry = _coarse_geometry(Geometry.of(image), factor)
    smoothed = sitk.SmoothingRecursiveGaussian(image, [0.5 * factor * s for s in image.GetSpacing()])
    return sitk.Resample(smoothed, geometry.reference_image(), sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def _optimise_level(fixed: sitk.Image, moving: sitk.Image, field: torch.Tensor, iterations: int,
                    settings: FullResSettings, report: Callable[[int], None], cancel) -> torch.Tensor:
    """``iterations`` greedy updates of ``field`` (z, y, x, 3) on ``fixed``'s grid; returns it.

    Each update is composed, not added: ``φ ← φ ∘ (id + u)``, i.e. ``f(x) ← u(x) + f(x + u(x))``.
    Its Jacobian is ``Jφ(x + u) (I + ∇u)``, positive wherever φ's is, since ``u`` is a smoothed
    step of at most ``step`` voxels: the network's fold-free field stays fold-free (an additive
    update folds where the network's field compresses strongly)."""
    i = torch.from_numpy(normalize(sitk.GetArrayFromImage(fixed)).astype(np.float32))[None, None]
    m = torch.from_numpy(normalize(sitk.GetArrayFromImage(moving)).astype(np.float32))[None, None]
    return iterate_ncc(i, m, field, Geometry.of(fixed), Geometry.of(moving), iterations, settings, report, cancel)


def iterate_ncc(i: torch.Tensor, m: torch.Tensor, field: torch.Tensor, fixed_geometry: Geometry,
                moving_geometry: Geometry, iterations: int, settings: FullResSettings,
                report: Callable[[int], None] | None = None, cancel=None,
                on_update: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """The iterations of :func:`_optimise_level` on normalised images ``i`` (fixed, on
    ``fixed_geometry``) and ``m`` (moving, on ``moving_geometry``), both (1, 1, D, H, W) float32 in
    [0, 1]; ``field`` (z, y, x, 3) LPS mm on the fixed grid. ``on_update(u)``, if given, hears each
    composed update ``u`` (1, 3, D, H, W, mm) before the field's smoothing (e.g. to track the inverse)."""
    k_moving = _to_normalized(moving_geometry)
    base_moving = index_affine(fixed_geometry, k_moving @ fixed_geometry.index_to_physical,
                               k_moving @ (np.asarray(fixed_geometry.origin) - np.asarray(moving_geometry.origin)) - 1.0)
    k_fixed = _to_normalized(fixed_geometry)
    # the fixed grid's own voxels in its grid_sample coordinates: K M i - 1
    base_fixed = index_affine(fixed_geometry, k_fixed @ fixed_geometry.index_to_physical, -np.ones(3))
    to_physical = np.linalg.inv(fixed_geometry.index_to_physical).T  # ∇_p = M^-T ∇_index
    r = settings.radius
    i_mean = _box_mean(i, r)
    i_centred = i - i_mean
    i_var = (_box_mean(i * i, r) - i_mean * i_mean).clamp_(min=0.0)
    step_mm = settings.step * min(fixed_geometry.spacing)
    eps = 1e-4  # variances of [0, 1] images are ~1e-2 in the brain; keeps the background quiet
    # the field is kept in both layouts: (z, y, x, 3) for grid_sample's grids, (1, 3, D, H, W) for
    # smoothing and sampling; elementwise work on permuted views is ~10x slower on a CPU
    field = field.contiguous()
    field_cf = field.permute(3, 0, 1, 2)[None].contiguous()
    for it in range(iterations):
        if cancel is not None and cancel():
            from .pipeline import Cancelled
            raise Cancelled(f"registration cancelled during full-resolution iteration {it + 1}")
        grid = base_moving + _times_transpose(field, k_moving)
        j = grid_sample(m, grid[None], padding_mode="zeros")
        del grid
        means = _box_mean(torch.cat([j, j * j, i * j], dim=1), r)
        j_mean = means[:, :1]
        j_var = means[:, 1:2].sub_(j_mean * j_mean).clamp_(min=0.0)
        cross = means[:, 2:3].sub_(i_mean * j_mean)
        # d(local NCC)/dJ, pointwise (the approximation ANTs' and greedy's CC metrics use), times
        # the warped image's gradient on the fixed grid: the force on x in x -> x + u:
        # 2 cross / (i_var j_var + eps) * (i_centred - cross / (j_var + eps) * (j - j_mean)),
        # in place (a 1 mm brain's temporaries cost more than the arithmetic)
        d_j = cross / (j_var + eps)
        d_j.mul_(j - j_mean).neg_().add_(i_centred)
        d_j.mul_(cross.mul_(2.0).div_(j_var.mul_(i_var).add_(eps)))
        force = _index_gradient(j).mul_(d_j)
        del d_j, j, cross, j_var, j_mean, means
        force = _channels_times(gaussian_smooth(force, settings.sigma_update), to_physical)  # -> LPS mm
        norm = (force[:, :1] * force[:, :1]).addcmul_(force[:, 1:2], force[:, 1:2]).addcmul_(force[:, 2:], force[:, 2:]).sqrt_()
        # scale by a high percentile, not the maximum, then clip: a few spikes (image edges) would
        # otherwise set the step for the whole brain
        sample = norm.reshape(-1)[::7]
        largest = float(torch.kthvalue(sample, max(1, int(0.999 * sample.numel()))).values)
        if largest > 0:
            scale = torch.clamp(largest / norm.clamp_(min=1e-12), max=1.0).mul_(step_mm / largest)
            update_cf = force.mul_(scale)
            update = update_cf[0].permute(1, 2, 3, 0).contiguous()
            # f(x) <- u(x) + f(x + u(x))
            moved = grid_sample(field_cf, (base_fixed + _times_transpose(update, k_fixed))[None],
                                padding_mode="border")
            field_cf = moved.add_(update_cf)
            if on_update is not None:
                on_update(update_cf)
            del update, update_cf, moved
        del force, norm
        field_cf = gaussian_smooth(field_cf, settings.sigma_field)
        field = field_cf[0].permute(1, 2, 3, 0).contiguous()
        if report is not None:
            report(it + 1)
    return field


def optimise_fullres(fixed: sitk.Image, moving: sitk.Image, forward: np.ndarray,
                     settings: FullResSettings = DEFAULT_SETTINGS, progress: Progress | None = None,
                     cancel=None) -> np.ndarray:
    """Improve the forward field (z, y, x, 3, LPS mm, on ``fixed``'s grid, fixed point -> moving
    point, affine included) by greedy-like NCC iterations; returns the new field (float32)."""
    full = torch.as_tensor(forward, dtype=torch.float32).clone()
    # work on the fixed image's foreground box (+ margin): the background's force is zero anyway
    (z0, z1), (y0, y1), (x0, x1) = _foreground_box(fixed, margin=6)
    fixed = fixed[x0:x1, y0:y1, z0:z1]
    fixed_geometry = Geometry.of(fixed)
    field = full[z0:z1, y0:y1, x0:x1].contiguous()
    levels = len(settings.iterations)
    total = max(1, sum(settings.iterations))
    done = [0]

    def report(_: int) -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0] / total, f"full-resolution iteration {done[0]} of {total}")

    for level, iterations in enumerate(settings.iterations):
        if iterations == 0:
            continue
        factor = 2 ** (levels - 1 - level)
        if factor == 1:
            field = _optimise_level(fixed, moving, field, iterations, settings, report, cancel)
            continue
        coarse_fixed, coarse_moving = _downsample(fixed, factor), _downsample(moving, factor)
        coarse_geometry = Geometry.of(coarse_fixed)
        volume = field.permute(3, 0, 1, 2)[None]
        start = torch.from_numpy(resample_field(volume, fixed_geometry, coarse_geometry).astype(np.float32))
        result = _optimise_level(coarse_fixed, coarse_moving, start.clone(), iterations, settings, report, cancel)
        update = (result - start).permute(3, 0, 1, 2)[None].contiguous()
        field = field + torch.from_numpy(resample_field(update, coarse_geometry, fixed_geometry).astype(np.float32))
    full[z0:z1, y0:y1, x0:x1] = field
    return full.numpy()


def _foreground_box(image: sitk.Image, margin: int, threshold: float = 0.05) -> tuple[tuple[int, int], ...]:
    """(start, stop) per array axis (z, y, x) of the voxels above ``threshold`` of the normalised
    range, grown by ``margin`` voxels; the whole grid when nothing is above it."""
    mask = normalize(sitk.GetArrayViewFromImage(image)) > threshold
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        n = mask.shape[axis]
        box.append((0, n) if hit.size == 0 else (max(0, int(hit[0]) - margin), min(n, int(hit[-1]) + 1 + margin)))
    return tuple(box)
