"""Affine and rigid pre-alignment in PyTorch, and the ITK affine transform files.

:func:`affine_align` removes the global misalignment of two scans (position, orientation, size)
before the deformable network, which only handles local differences. It returns the ITK
*resampling* transform ``T`` (physical LPS points of the fixed image -> points of the moving
image), so ``sitk.Resample(moving, fixed, T)`` puts the moving scan onto the fixed one and
``T.GetInverse()`` is the exact backward affine.

How (each choice measured in ``benchmarks/affine_robustness.py``):

* both images are resampled in physical space onto their own isotropic grids (the fixed one with
  the fixed direction, the moving one with the moving direction), normalised with
  :func:`InverseRegLib.intensity.normalize`, and box-filtered into a pyramid (8 -> 4 -> 2 mm for
  brains; coarser for very large fields of view so the finest level stays below ~1M voxels);
* the start is the intensity centres of mass (translation) and, in ``affine`` mode, the ratio of
  the radii of gyration (isotropic scale). Principal axes are *not* used: the second moments of a
  brain are nearly isotropic in two axes, so they swap or flip between subjects, and a 15 degree
  misalignment is well inside what the coarse level recovers by itself;
* the transform is ``x -> c_m + R(w) P(s) (x - c_f) + t`` about the fixed centre of mass ``c_f``,
  with ``R = expm(skew(w))`` and ``P = expm(sym(s))`` (polar decomposition: every affine with a
  positive determinant, never a reflection). Rotation, log-stretch and shear are divided by the
  radius of gyration so that every parameter is "millimetres of motion at the surface": Adam's
  per-parameter step is then one length, set per level relative to the voxel size;
* the similarity is global NCC, evaluated symmetrically: moving resampled on the fixed grid
  through ``T`` and fixed resampled on the moving grid through ``T^-1``, so swapping the inputs
  gives (nearly) the inverse result instead of a different one.
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
from .intensity import normalize

#: spacings (mm) of the pyramid levels for ~1 mm brains, coarse to fine
LEVEL_SPACINGS = (8.0, 4.0, 2.0)
#: Adam iterations per level (same order); the coarse levels are cheap, so they get the most
LEVEL_ITERATIONS = (120, 60, 30)
#: cap on the voxels of the finest level; larger fields of view get a coarser pyramid
MAX_FINEST_VOXELS = 1_200_000
#: a level is skipped when the fixed grid would have fewer voxels than this along its shortest axis
MIN_LEVEL_VOXELS = 8

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
    if not isinstance(image, sitk.Image):
        raise InverseRegError(f"{name} must be a SimpleITK image, got {type(image).__name__}")
    if image.GetDimension() != 3:
        raise InverseRegError(f"{name} is {image.GetDimension()}D (size {image.GetSize()}); a 3D volume is needed")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InverseRegError(f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel; a scalar volume is needed")
    if min(image.GetSize()) < 4:
        raise InverseRegError(f"{name} is too thin ({image.GetSize()}): at least 4 voxels per axis are needed")
    return image


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
    if min(geometry.spacing) < 0.5 * finest:
        # anti-alias fine input before the linear resampling; recursive Gaussian, sigma in mm
        image = sitk.SmoothingRecursiveGaussian(image, 0.5 * finest)
    size = tuple(int(max(4, math.ceil(e / finest))) for e in _extent(geometry))
    grid = centered_grid(size, (finest,) * 3, geometry.direction, geometry.center())
    background = float(sitk.GetArrayViewFromImage(image).min())
    resampled = sitk.Resample(image, grid.reference_image(), sitk.Transform(), sitk.sitkLinear,
                              background, sitk.sitkFloat32)
    array = normalize(sitk.GetArrayViewFromImage(resampled))
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


def _moments(tensor: torch.Tensor, geometry: Geometry) -> tuple[np.ndarray, float]:
    """Intensity centre of mass (LPS) and radius of gyration (mm) of a normalised level."""
    weights = tensor[0, 0].double().numpy()
    total = float(weights.sum())
    if total <= 0:
        raise InverseRegError("image has no foreground after normalisation (constant image?)")
    points = _physical_points(geometry)
    center = np.einsum("zyx,zyxc->c", weights, points) / total
    offsets = points - center
    radius = math.sqrt(float(np.einsum("zyx,zyxc->", weights, offsets**2)) / total)
    return center, max(radius, 1e-3)


def _physical_points(geometry: Geometry) -> np.ndarray:
    return geometry.physical_points()


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


def _sample(image: torch.Tensor, theta: torch.Tensor, shape) -> torch.Tensor:
    """Sample ``image`` at ``theta`` (3x4, normalised output coords -> normalised input coords)."""
    grid = F.affine_grid(theta[None], [1, 1, *shape], align_corners=True)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


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
) -> sitk.AffineTransform:
    """Rigid or affine alignment of ``moving`` onto ``fixed``; returns the ITK resampling transform.

    ``fixed``, ``moving``: 3D scalar images of any size, spacing and orientation (same modality;
    the similarity is NCC). ``mode``: ``"rigid"`` (rotation + translation) or ``"affine"`` (also
    scaling and shear; never a reflection). ``device``: where the optimisation runs.
    ``progress(fraction, message)`` is called as the levels advance. Keyword-only knobs for
    experiments: ``symmetric`` (similarity evaluated both ways, default) and ``iterations`` per
    pyramid level.

    The result ``T`` maps fixed-space physical (LPS, mm) points to moving-space points, so
    ``sitk.Resample(moving, fixed, T)`` gives the moving image aligned onto the fixed one and
    ``T.GetInverse()`` (exact) aligns the fixed onto the moving. Its centre is the fixed image's
    intensity centre of mass.
    """
    fixed = _check_image(fixed, "fixed image")
    moving = _check_image(moving, "moving image")
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
    if len(counts) != len(spacings):
        counts = (counts + [counts[-1]] * len(spacings))[: len(spacings)]
    fixed_levels = _image_pyramid(sitk.Cast(fixed, sitk.sitkFloat32), spacings)
    moving_levels = _image_pyramid(sitk.Cast(moving, sitk.sitkFloat32), spacings)

    # initialisation from the finest level's moments (cheap: ~1M voxels at most)
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
    for level, ((f_img, f_geo), (m_img, m_geo), steps) in enumerate(zip(fixed_levels, moving_levels, counts)):
        f_img, m_img = f_img.to(dev), m_img.to(dev)
        # fixed grid normalised coords -> fixed physical, and moving physical -> moving normalised
        f_from_norm = _physical_from_normalized(f_geo, dev, dtype)
        f_to_norm = _normalized_from_physical(f_geo, dev, dtype)
        m_from_norm = _physical_from_normalized(m_geo, dev, dtype)
        m_to_norm = _normalized_from_physical(m_geo, dev, dtype)
        # Adam's step is about lr per parameter, and every parameter is in mm: a quarter voxel,
        # decayed (cosine) to a fortieth of a voxel for a precise end point
        lr0 = 0.25 * spacings[level]
        optimizer = torch.optim.Adam([params], lr=lr0)
        spacing_label = f"{spacings[level]:g} mm"
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr0 * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * step / max(steps, 1))))
            optimizer.zero_grad(set_to_none=True)
            matrix = _affine_4x4(params, radius, log_scale0, rigid, c_f, c_m)
            theta = (m_to_norm @ matrix @ f_from_norm)[:3]
            warped_m = _sample(m_img, theta, f_img.shape[2:])
            loss = -_global_ncc(warped_m, f_img)
            if symmetric:
                theta_inv = (f_to_norm @ torch.linalg.inv(matrix) @ m_from_norm)[:3]
                warped_f = _sample(f_img, theta_inv, m_img.shape[2:])
                loss = 0.5 * (loss - _global_ncc(warped_f, m_img))
            loss.backward()
            params.grad.mul_(active)
            optimizer.step()
            done += 1
            if step % 10 == 0 or step == steps - 1:
                report(done / total_iterations,
                       f"{mode} alignment: level {level + 1}/{len(spacings)} ({spacing_label}), NCC {-float(loss):.3f}")

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
