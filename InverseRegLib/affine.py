"""Affine and rigid pre-alignment in PyTorch, and the ITK affine transform files.

:func:`affine_align` removes the global misalignment of two scans (position, orientation, size)
before the deformable network, which only handles local differences. It returns the ITK
*resampling* transform ``T`` (physical LPS points of the fixed image -> points of the moving
image), so ``sitk.Resample(moving, fixed, T)`` puts the moving scan onto the fixed one and
``T.GetInverse()`` is the exact backward affine.

How (each choice measured with ``benchmarks/affine_robustness.py`` on the brain pairs):

* both images are resampled in physical space onto their own isotropic grids (the fixed one with
  the fixed direction, the moving one with the moving direction), normalised with
  :func:`InverseRegLib.intensity.normalize`, cropped to their foreground plus a margin, and
  box-filtered into a pyramid (8 -> 4 -> 2 mm for brains; coarser for very large fields of view);
* the start is the intensity centres of mass (translation) and, in ``affine`` mode, the ratio of
  the radii of gyration (isotropic scale). Principal axes are *not* used: each axis is only known
  up to its sign, and for heads they depend on how much neck the field of view holds, while the
  centre-of-mass start already converges from rotations of 30 degrees about each axis (measured),
  twice what the pre-alignment has to handle;
* the transform is ``x -> c_m + R(w) P(s) (x - c_f) + t`` about the fixed centre of mass ``c_f``,
  with ``R = expm(skew(w))`` and ``P = expm(sym(s))`` (polar decomposition: every affine with a
  positive determinant, never a reflection). Rotation, log-stretch and shear are multiplied by the
  radius of gyration so that every parameter is "millimetres of motion at the surface": Adam's
  per-parameter step is then one length, set per level relative to the voxel size;
* the similarity is global NCC on a fixed random subset of at most :data:`MAX_POINTS` voxels per
  image and level, evaluated symmetrically: moving resampled at fixed voxels through ``T`` and
  fixed resampled at moving voxels through ``T^-1``. The cost is then the same function of the
  mapping whichever image is called fixed, and swapping the inputs gives the inverse transform
  (0.01 mm apart on a brain pair, against ~1 mm one-sided).
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .errors import InverseRegError
from .grid import Geometry, centered_grid
from .imageio import validate_image
from .intensity import normalize

#: spacings (mm) of the pyramid levels for ~1 mm brains, coarse to fine
LEVEL_SPACINGS = (8.0, 4.0, 2.0)
#: Adam iterations per level (same order); the coarse levels are cheap, so they get the most
LEVEL_ITERATIONS = (120, 60, 30)
#: Adam step (fraction of the level's voxel size) on the first level and on the later ones
LR_FIRST = 0.25
LR_LATER = 0.05
#: cap on the voxels of the finest resampled grid (before cropping to the foreground); larger
#: fields of view get a coarser pyramid
MAX_FINEST_VOXELS = 4_000_000
#: a level is skipped when the fixed grid would have fewer voxels than this along its shortest axis
MIN_LEVEL_VOXELS = 8

#: a level stops early once its loss has improved by less than EARLY_STOP_TOLERANCE (NCC units)
#: over the last EARLY_STOP_WINDOW iterations: already-aligned scans converge long before the
#: iteration budget, misaligned ones use all of it (measured in docs/benchmark.md)
EARLY_STOP_WINDOW = 10
EARLY_STOP_TOLERANCE = 1e-4

#: voxels per image and level where the similarity is evaluated (a fixed random subset beyond)
MAX_POINTS = 65_536
LNCC_WINDOW = 5
#: normalised intensity above which a voxel counts as foreground when cropping the grids
FOREGROUND_LEVEL = 0.1
#: background kept around the foreground box (mm)
CROP_MARGIN_MM = 16.0

MODES = ("rigid", "affine")
TRANSFORM_SUFFIXES = (".tfm", ".txt", ".mat", ".h5", ".hdf5")

ProgressFn = Callable[[float, str], None]


# ----------------------------------------------------------------------------------------------
# transform files


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def write_affine(transform: sitk.Transform, path) -> None:
    """Write ``transform`` as an ITK transform file, atomically.

    ``.tfm``/``.txt`` (ITK text, what Slicer writes), ``.mat`` (ITK MATLAB, what ANTs writes) and
    ``.h5`` are accepted; every one is read by SimpleITK, Slicer and ANTs. The file is written to a
    temporary sibling with the same extension (SimpleITK picks the format from it) and renamed into
    place, so a reader never sees a half-written file.
    """
    if not isinstance(transform, sitk.Transform):
        raise InverseRegError(f"cannot write {type(transform).__name__} as a transform: a SimpleITK transform is needed")
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in TRANSFORM_SUFFIXES:
        raise InverseRegError(
            f"unknown transform file type '{path.suffix}' for {path}; use one of {', '.join(TRANSFORM_SUFFIXES)}"
        )
    if path.is_dir():
        raise InverseRegError(f"transform output path is a folder: {path}")
    if not path.parent.is_dir():
        raise InverseRegError(f"folder for the transform file does not exist: {path.parent}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        from .imageio import _permissions
        _permissions(tmp)  # the usual mode of a new file, not mkstemp's private 0600
        sitk.WriteTransform(transform, tmp)
        os.replace(tmp, path)
    except RuntimeError as exc:
        Path(tmp).unlink(missing_ok=True)
        reason = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else "unknown error"
        raise InverseRegError(f"cannot write transform {path}: {reason}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _as_affine(transform: sitk.Transform, path) -> sitk.AffineTransform:
    """Any linear 3D SimpleITK transform as an :class:`sitk.AffineTransform` (same mapping)."""
    if transform.GetDimension() != 3:
        raise InverseRegError(f"transform in {path} is {transform.GetDimension()}D; a 3D transform is needed")
    if isinstance(transform, sitk.CompositeTransform) or transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        if composite.GetNumberOfTransforms() == 1:
            return _as_affine(composite.GetNthTransform(0), path)
    concrete = transform.Downcast() if hasattr(transform, "Downcast") else transform
    if all(hasattr(concrete, name) for name in ("GetMatrix", "GetCenter", "GetTranslation")):
        affine = sitk.AffineTransform(3)
        affine.SetMatrix(concrete.GetMatrix())
        affine.SetCenter(concrete.GetCenter())
        affine.SetTranslation(concrete.GetTranslation())
        return affine
    if transform.IsLinear():
        # e.g. a translation, or a composite of linear transforms: probe the mapping (exact for
        # an affine map; double precision) and keep the rotation centre at the origin
        origin = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)))
        columns = [np.asarray(transform.TransformPoint(tuple(100.0 * e))) - origin for e in np.eye(3)]
        affine = sitk.AffineTransform(3)
        affine.SetMatrix(tuple((np.stack(columns, axis=1) / 100.0).ravel()))
        affine.SetTranslation(tuple(origin))
        return affine
    raise InverseRegError(
        f"transform in {path} is a {transform.GetName()}, not an affine transform; "
        "give an affine/rigid ITK transform file"
    )


def read_affine(path) -> sitk.AffineTransform:
    """Read an ITK transform file holding one linear 3D transform (affine, rigid, similarity,
    translation, or a composite of exactly one of those) as an :class:`sitk.AffineTransform`.

    The transform keeps ITK's meaning: it maps points of the fixed (reference) space to the moving
    space. Missing, unreadable and non-affine files raise :class:`InverseRegError`.
    """
    path = Path(path)
    if not path.exists():
        raise InverseRegError(f"transform file not found: {path}")
    if path.is_dir():
        raise InverseRegError(f"transform path is a folder, not a file: {path}")
    try:
        transform = sitk.ReadTransform(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else "unknown format"
        raise InverseRegError(f"cannot read transform {path}: {reason}") from None
    affine = _as_affine(transform, path)
    values = np.asarray(affine.GetMatrix() + affine.GetTranslation() + affine.GetCenter())
    if not np.isfinite(values).all():
        raise InverseRegError(f"transform in {path} contains NaN or infinite values")
    if abs(np.linalg.det(np.asarray(affine.GetMatrix()).reshape(3, 3))) < 1e-12:
        raise InverseRegError(f"transform in {path} is singular (not invertible)")
    return affine


# ----------------------------------------------------------------------------------------------
# building blocks of the optimisation


def _check_image(image, name: str) -> sitk.Image:
    """A 3D scalar, finite, non-constant image (see :func:`imageio.validate_image`), as float32."""
    if not isinstance(image, sitk.Image):
        raise InverseRegError(f"{name} must be a SimpleITK image, got {type(image).__name__}")
    return sitk.Cast(validate_image(image, name), sitk.sitkFloat32)


def _resolve_device(device) -> torch.device:
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise InverseRegError(f"unknown device {device!r}; use 'cpu' or 'cuda'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InverseRegError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
    return resolved


def _extent(geometry: Geometry) -> np.ndarray:
    return np.asarray(geometry.size, dtype=np.float64) * np.asarray(geometry.spacing)


def level_spacings(fixed: Geometry, moving: Geometry) -> list[float]:
    """Pyramid spacings (mm, coarse to fine) for a pair: :data:`LEVEL_SPACINGS`, scaled up when
    the finest fixed or moving grid would exceed :data:`MAX_FINEST_VOXELS` (large fields of view),
    without the levels that would leave the fixed grid under :data:`MIN_LEVEL_VOXELS` voxels thick."""
    scale = 1.0
    for geometry in (fixed, moving):
        voxels = float(np.prod(_extent(geometry) / LEVEL_SPACINGS[-1]))
        scale = max(scale, (voxels / MAX_FINEST_VOXELS) ** (1.0 / 3.0))
    spacings = [s * scale for s in LEVEL_SPACINGS]
    shortest = float(_extent(fixed).min())
    kept = [s for s in spacings if shortest / s >= MIN_LEVEL_VOXELS]
    return kept or [min(spacings[-1], shortest / MIN_LEVEL_VOXELS)]


def _image_pyramid(image: sitk.Image, spacings: list[float]) -> list[tuple[torch.Tensor, Geometry]]:
    """Normalised ``(1, 1, D, H, W)`` tensors of ``image`` on isotropic grids, coarse to fine.

    The finest grid covers the image's field of view with its own direction; each coarser one is
    the 2x2x2 box average of the next finer (its voxel centres move by half a fine voxel, which the
    returned geometry accounts for). Spacings are assumed to double from level to level.
    """
    geometry = Geometry.of(image)
    finest = spacings[-1]
    # anti-aliasing: an input much finer than the finest level is resampled on a grid ``factor``
    # times finer and box-averaged down (cheaper than a Gaussian on the full image); up to a
    # ratio of ~3 the linear interpolation's own averaging is enough (measured on 1 mm brains)
    factor = int(min(4, max(1, math.floor(finest / min(geometry.spacing) / 1.5))))
    size = tuple(int(max(4, math.ceil(e / finest))) for e in _extent(geometry))
    grid = centered_grid(size, (finest,) * 3, geometry.direction, geometry.center())
    fine = centered_grid(tuple(factor * n for n in size), (finest / factor,) * 3, geometry.direction,
                         geometry.center())
    background = float(sitk.GetArrayViewFromImage(image).min())
    resampled = sitk.Resample(image, fine.reference_image(), sitk.Transform(), sitk.sitkLinear,
                              background, sitk.sitkFloat32)
    array = sitk.GetArrayViewFromImage(resampled)
    if factor > 1:
        array = F.avg_pool3d(torch.from_numpy(np.array(array))[None, None], factor)[0, 0].numpy()
    array = normalize(array)
    array, grid = _crop_to_foreground(array, grid)
    tensor = torch.from_numpy(np.ascontiguousarray(array))[None, None]
    levels = [(tensor, grid)]
    for _ in spacings[:-1]:
        tensor, grid = levels[0]
        if min(tensor.shape[2:]) < 4:
            break
        coarse = F.avg_pool3d(tensor, 2)
        origin = np.asarray(grid.origin) + grid.index_to_physical @ np.full(3, 0.5)
        coarse_grid = Geometry(tuple(int(s) for s in coarse.shape[2:][::-1]),
                               tuple(2.0 * s for s in grid.spacing), tuple(float(o) for o in origin),
                               grid.direction)
        levels.insert(0, (coarse, coarse_grid))
    while len(levels) < len(spacings):  # tiny images: repeat the coarsest level
        levels.insert(0, levels[0])
    return levels


def _crop_to_foreground(array: np.ndarray, grid: Geometry) -> tuple[np.ndarray, Geometry]:
    """Crop a normalised (z, y, x) array to the box of its foreground plus :data:`CROP_MARGIN_MM`.

    Empty space costs as much as anatomy in every iteration (padded scans, large fields of view)
    but tells little; a margin of background is kept because the outline of the head or brain
    against it is what the coarse levels align first. Foreground is ``> FOREGROUND_LEVEL``, above
    the noise floor of unmasked MRI after normalisation.
    """
    mask = array > FOREGROUND_LEVEL
    if not mask.any():
        return array, grid
    margin = int(math.ceil(CROP_MARGIN_MM / grid.spacing[0]))
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        lo.append(max(int(present[0]) - margin, 0))
        hi.append(min(int(present[-1]) + margin + 1, array.shape[axis]))
    cropped = array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    start_xyz = np.asarray(lo[::-1], dtype=np.float64)
    origin = np.asarray(grid.origin) + grid.index_to_physical @ start_xyz
    size = tuple(int(n) for n in cropped.shape[::-1])
    return cropped, Geometry(size, grid.spacing, tuple(float(o) for o in origin), grid.direction)


def _moments(tensor: torch.Tensor, geometry: Geometry) -> tuple[np.ndarray, float]:
    """Intensity centre of mass (LPS) and radius of gyration (mm) of a normalised level."""
    weights = tensor[0, 0].double().numpy()
    total = float(weights.sum())
    if total <= 0:
        raise InverseRegError("image has no foreground after normalisation (constant image?)")
    points = geometry.physical_points()
    center = np.einsum("zyx,zyxc->c", weights, points) / total
    offsets = points - center
    radius = math.sqrt(float(np.einsum("zyx,zyxc->", weights, offsets**2)) / total)
    return center, max(radius, 1e-3)


def _normalized_from_physical(geometry: Geometry, device, dtype) -> torch.Tensor:
    """4x4 matrix: physical LPS point -> ``grid_sample`` coordinates (align_corners=True) of
    ``geometry`` (x, y, z order = W, H, D)."""
    size = np.asarray(geometry.size, dtype=np.float64)
    to_index = np.eye(4)
    inverse = np.linalg.inv(geometry.index_to_physical)
    to_index[:3, :3] = inverse
    to_index[:3, 3] = -inverse @ np.asarray(geometry.origin)
    to_norm = np.eye(4)
    to_norm[:3, :3] = np.diag(2.0 / np.maximum(size - 1.0, 1.0))
    to_norm[:3, 3] = -1.0
    return torch.as_tensor(to_norm @ to_index, device=device, dtype=dtype)


def _physical_from_normalized(geometry: Geometry, device, dtype) -> torch.Tensor:
    return torch.linalg.inv(_normalized_from_physical(geometry, device, torch.float64)).to(dtype)


def _skew(w: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    return torch.stack([
        torch.stack([zero, -w[2], w[1]]),
        torch.stack([w[2], zero, -w[0]]),
        torch.stack([-w[1], w[0], zero]),
    ])


def _sym(s: torch.Tensor) -> torch.Tensor:
    """Symmetric 3x3 from 6 values: 3 log-stretches then shears (xy, xz, yz)."""
    return torch.stack([
        torch.stack([s[0], s[3], s[4]]),
        torch.stack([s[3], s[1], s[5]]),
        torch.stack([s[4], s[5], s[2]]),
    ])


def _linear_part(params: torch.Tensor, radius: float, log_scale0: float, rigid: bool) -> torch.Tensor:
    """The 3x3 matrix ``R P`` from the parameter vector (all in mm at ``radius``).

    ``params``: [rotation (3), translation (3), log-stretch (3), shear (3)]; rotation vector,
    log-stretch and shear are ``value / radius``. ``log_scale0`` is the initial isotropic
    log-scale, added so that parameters start at zero.
    """
    rotation = torch.linalg.matrix_exp(_skew(params[0:3] / radius))
    if rigid:
        return rotation
    stretch = params[6:12] / radius
    stretch = stretch + torch.tensor([log_scale0] * 3 + [0.0] * 3, dtype=params.dtype, device=params.device)
    return rotation @ torch.linalg.matrix_exp(_sym(stretch))


def _affine_4x4(params, radius, log_scale0, rigid, c_f, c_m) -> torch.Tensor:
    """Homogeneous 4x4 of ``x -> c_m + L (x - c_f) + t`` (physical fixed -> physical moving)."""
    linear = _linear_part(params, radius, log_scale0, rigid)
    translation = c_m + params[3:6] - linear @ c_f
    top = torch.cat([linear, translation[:, None]], dim=1)
    bottom = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=params.dtype, device=params.device)
    return torch.cat([top, bottom], dim=0)


def _global_ncc(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    a = a.flatten() - a.mean()
    b = b.flatten() - b.mean()
    return (a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum() + eps)


def _box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over ``window``^3 boxes of (B, C, D, H, W), counting only voxels inside the grid.

    Running sums (cumsum) instead of convolutions: the cost does not grow with the window, and it
    is ~2x faster than ``conv3d`` for single-channel volumes on a CPU (measured).
    """
    radius = window // 2

    def box_sum(t: torch.Tensor) -> torch.Tensor:
        for dim in (2, 3, 4):
            n = t.shape[dim]
            pad = [0] * 6
            pad[2 * (4 - dim)], pad[2 * (4 - dim) + 1] = radius + 1, radius
            running = F.pad(t, pad).cumsum(dim)
            t = running.narrow(dim, window, n) - running.narrow(dim, 0, n)
        return t

    count = box_sum(torch.ones(1, 1, *x.shape[2:], dtype=x.dtype, device=x.device))
    return box_sum(x) / count


def _local_ncc(a: torch.Tensor, b: torch.Tensor, window: int, eps: float = 1e-5) -> torch.Tensor:
    """Mean windowed NCC of two (1, 1, D, H, W) images (as :func:`losses.local_ncc`, same border
    rule), the five box means in one pass."""
    means = _box_mean(torch.cat([a, b, a * a, b * b, a * b], dim=1), window)
    mean_a, mean_b, mean_aa, mean_bb, mean_ab = means.unbind(1)
    cov = mean_ab - mean_a * mean_b
    var_a = (mean_aa - mean_a**2).clamp(min=0.0)
    var_b = (mean_bb - mean_b**2).clamp(min=0.0)
    return (cov / torch.sqrt(var_a * var_b + eps)).mean()


def _highpass(image: torch.Tensor, window: int) -> torch.Tensor:
    """``image`` minus its local mean: removes smooth intensity trends (bias fields)."""
    return image - _box_mean(image, window)


def _sample_points(image: torch.Tensor, max_points: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the similarity is evaluated on one side: ``grid_sample`` coordinates (N, 3) (x, y, z;
    align_corners=True) of the voxels of ``image`` (1, 1, D, H, W) and their values (N,).

    All voxels when there are at most ``max_points``, else a fixed random subset (seeded, drawn on
    the CPU so every device gets the same one): global NCC is a sum over voxels, so a large random
    subset estimates it with little noise at a fraction of the cost of the finest level.
    """
    shape = image.shape[2:]
    axes = [torch.linspace(-1.0, 1.0, n, dtype=image.dtype) if n > 1 else torch.zeros(1, dtype=image.dtype)
            for n in shape]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    coords = torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3)
    values = image.detach().cpu().reshape(-1)
    if coords.shape[0] > max_points:
        generator = torch.Generator().manual_seed(seed)
        # sorted: neighbouring samples stay neighbours in memory, which keeps the interpolation
        # cache-friendly (measured 2-3x faster than random order on a 2 mm brain grid)
        keep = torch.randperm(coords.shape[0], generator=generator)[:max_points].sort().values
        coords, values = coords[keep], values[keep]
    return coords.to(image.device), values.to(image.device)


def _sample(image: torch.Tensor, coords: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Values (N,) of ``image`` (1, 1, d, h, w) at ``theta`` (3x4, output grid_sample coordinates
    -> input ones) applied to ``coords`` (N, 3)."""
    grid = (coords @ theta[:, :3].T + theta[:, 3]).view(1, 1, 1, -1, 3)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True).view(-1)


# ----------------------------------------------------------------------------------------------
# the registration


def affine_align(
    fixed: sitk.Image,
    moving: sitk.Image,
    mode: str = "affine",
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
    *,
    symmetric: bool = True,
    iterations: tuple[int, ...] | None = None,
    similarity: str = "ncc",
    early_stop: bool = True,
) -> sitk.AffineTransform:
    """Rigid or affine alignment of ``moving`` onto ``fixed``; returns the ITK resampling transform.

    ``fixed``, ``moving``: 3D scalar images of any size, spacing and orientation (same modality;
    the similarity is NCC). ``mode``: ``"rigid"`` (rotation + translation) or ``"affine"`` (also
    scaling and shear; never a reflection). ``device``: where the optimisation runs.
    ``progress(fraction, message)`` is called as the levels advance. Keyword-only knobs for
    experiments: ``symmetric`` (similarity evaluated both ways, default), ``iterations`` per
    pyramid level, and ``early_stop`` (a level ends once its loss stops improving, see
    :data:`EARLY_STOP_TOLERANCE`; False runs every iteration).

    The result ``T`` maps fixed-space physical (LPS, mm) points to moving-space points, so
    ``sitk.Resample(moving, fixed, T)`` gives the moving image aligned onto the fixed one and
    ``T.GetInverse()`` (exact) aligns the fixed onto the moving. Its centre is the fixed image's
    intensity centre of mass.
    """
    fixed = _check_image(fixed, "fixed image")
    moving = _check_image(moving, "moving image")
    threads = torch.get_num_threads()
    if _resolve_device(device).type == "cpu" and threads > 1:
        # each iteration is a few small kernels (~10^5 points): extra threads only add
        # synchronisation, which on a busy CPU costs 5-15x the work (measured: 3.4 s with one
        # thread, 26-67 s with two, on a 1 mm brain pair on a shared 2-core machine)
        torch.set_num_threads(1)
    try:
        return _affine_align(fixed, moving, mode, device, progress, symmetric, iterations, similarity, early_stop)
    finally:
        torch.set_num_threads(threads)


def _affine_align(fixed, moving, mode, device, progress, symmetric, iterations, similarity, early_stop):
    if mode not in MODES:
        raise InverseRegError(f"unknown alignment mode {mode!r}; use one of {', '.join(MODES)}")
    if progress is not None and not callable(progress):
        raise InverseRegError("progress must be a callable progress(fraction, message) or None")
    dev = _resolve_device(device)
    rigid = mode == "rigid"

    def report(fraction: float, message: str) -> None:
        if progress is not None:
            progress(float(min(max(fraction, 0.0), 1.0)), message)

    report(0.0, f"{mode} alignment: preparing images")
    fixed_geometry, moving_geometry = Geometry.of(fixed), Geometry.of(moving)
    spacings = level_spacings(fixed_geometry, moving_geometry)
    counts = list(iterations) if iterations is not None else list(LEVEL_ITERATIONS[-len(spacings):])
    if not counts or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in counts):
        raise InverseRegError(f"iterations must be whole numbers >= 0 per level, got {iterations!r}")
    if len(counts) != len(spacings):
        counts = (counts + [counts[-1]] * len(spacings))[: len(spacings)]
    fixed_levels = _image_pyramid(fixed, spacings)
    moving_levels = _image_pyramid(moving, spacings)

    # initialisation from the finest level's moments (intensity-weighted, cropped grids)
    center_f, radius_f = _moments(*fixed_levels[-1])
    center_m, radius_m = _moments(*moving_levels[-1])
    log_scale0 = 0.0 if rigid else math.log(radius_m / radius_f)
    dtype = torch.float32
    c_f = torch.as_tensor(center_f, dtype=dtype, device=dev)
    c_m = torch.as_tensor(center_m, dtype=dtype, device=dev)
    radius = float(radius_f)
    params = torch.zeros(12, dtype=dtype, device=dev, requires_grad=True)
    active = torch.ones(12, dtype=dtype, device=dev)
    if rigid:
        active[6:] = 0.0  # stretch and shear stay at zero

    total_iterations = max(sum(counts), 1)
    done = 0
    # Adam, written out for the 12 parameters: torch.optim's first construction in a process
    # imports torch._dynamo (~3 s on a busy CPU), more than the whole optimisation costs
    moment1 = torch.zeros_like(params)
    moment2 = torch.zeros_like(params)
    beta1, beta2, adam_eps = 0.9, 0.999, 1e-8
    for level, ((f_img, f_geo), (m_img, m_geo), steps) in enumerate(zip(fixed_levels, moving_levels, counts)):
        f_img, m_img = f_img.to(dev), m_img.to(dev)
        # fixed grid normalised coords -> fixed physical, and moving physical -> moving normalised
        kind = similarity[level] if isinstance(similarity, (tuple, list)) else similarity
        local = kind == "lncc"
        if kind == "hpncc":
            f_img, m_img = _highpass(f_img, LNCC_WINDOW), _highpass(m_img, LNCC_WINDOW)
        limit = 1 << 62 if local else MAX_POINTS
        f_points, f_values = _sample_points(f_img, limit, seed=level)
        m_points, m_values = _sample_points(m_img, limit, seed=level) if symmetric else (None, None)

        def sim(sampled, values, image):
            if not local:
                return _global_ncc(sampled, values)
            return _local_ncc(sampled.view_as(image), image, LNCC_WINDOW)
        f_from_norm = _physical_from_normalized(f_geo, dev, dtype)
        f_to_norm = _normalized_from_physical(f_geo, dev, dtype)
        m_from_norm = _physical_from_normalized(m_geo, dev, dtype)
        m_to_norm = _normalized_from_physical(m_geo, dev, dtype)
        # Adam's step is about lr per parameter, and every parameter is in mm: a fraction of a
        # voxel, decayed (cosine) to a tenth of that for a precise end point. The moments restart
        # with each level (the gradient scale changes with the resolution); since Adam's first
        # steps have full length whatever the gradient, finer levels, which start near the
        # optimum, start with shorter steps so as not to be kicked out of it.
        lr0 = (LR_FIRST if level == 0 else LR_LATER) * spacings[level]
        moment1.zero_()
        moment2.zero_()
        spacing_label = f"{spacings[level]:g} mm"
        history: list[float] = []
        for step in range(steps):
            lr = lr0 * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * step / max(steps, 1))))
            matrix = _affine_4x4(params, radius, log_scale0, rigid, c_f, c_m)
            theta = (m_to_norm @ matrix @ f_from_norm)[:3]
            warped_m = _sample(m_img, f_points, theta)
            loss = -sim(warped_m, f_values, f_img)
            if symmetric:
                theta_inv = (f_to_norm @ torch.linalg.inv(matrix) @ m_from_norm)[:3]
                warped_f = _sample(f_img, m_points, theta_inv)
                loss = 0.5 * (loss - sim(warped_f, m_values, m_img))
            (grad,) = torch.autograd.grad(loss, params)
            with torch.no_grad():
                grad = grad * active
                moment1.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                moment2.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                m_hat = moment1 / (1.0 - beta1 ** (step + 1))
                v_hat = moment2 / (1.0 - beta2 ** (step + 1))
                params -= lr * m_hat / (v_hat.sqrt() + adam_eps)
            done += 1
            history.append(float(loss.detach()))
            converged = (len(history) > 2 * EARLY_STOP_WINDOW and early_stop
                         and history[-EARLY_STOP_WINDOW - 1] - min(history[-EARLY_STOP_WINDOW:]) < EARLY_STOP_TOLERANCE)
            if step % 10 == 0 or step == steps - 1 or converged:
                report(done / total_iterations,
                       f"{mode} alignment: level {level + 1}/{len(spacings)} ({spacing_label}), "
                       f"NCC {-float(loss.detach()):.3f}")
            if converged:
                done += steps - step - 1
                break

    with torch.no_grad():
        final = params.detach().double().cpu()
        linear = _linear_part(final, radius, log_scale0, rigid).numpy()
        translation = center_m + final[3:6].numpy()
    transform = sitk.AffineTransform(3)
    transform.SetCenter(tuple(float(c) for c in center_f))
    transform.SetMatrix(tuple(float(v) for v in linear.ravel()))
    # x -> c_m + t + L (x - c_f) = L (x - c_f) + c_f + (c_m + t - c_f)
    transform.SetTranslation(tuple(float(v) for v in translation - center_f))
    report(1.0, f"{mode} alignment: done")
    return transform
