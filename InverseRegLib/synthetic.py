"""A synthetic brain-like phantom and pairs with a known deformation (tests, demo, Slicer test).

The phantom is analytic, so it can be evaluated at any physical point: a pair is made by
evaluating it at the fixed grid's points (fixed image) and at ``H(q)`` for the moving grid's points
``q``, with ``H(q) = q + h(q)`` a smooth sinusoidal map. The true forward transform (fixed point to
moving point, the ITK resampling convention) is ``G = H^-1``, computed by fixed-point iteration,
and returned on request so tests can check a recovered field against it.

Structures carry FreeSurfer label numbers (left/right by the sign of LPS x) and T1-like
intensities (white matter brightest, CSF darkest) so a model trained on brains sees something
familiar.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .grid import Geometry

# (label_left, label_right, intensity) for each structure; background 0
_T1 = {"wm": (2, 41, 0.92), "cortex": (3, 42, 0.55), "ventricle": (4, 43, 0.12),
       "thalamus": (10, 49, 0.78), "caudate": (11, 50, 0.62), "putamen": (12, 51, 0.68),
       "cerebellum_cortex": (8, 47, 0.58), "cerebellum_wm": (7, 46, 0.88), "brainstem": (16, 16, 0.82)}


def _ellipsoid(r: np.ndarray, center, axes) -> np.ndarray:
    return (((r - np.asarray(center)) / np.asarray(axes)) ** 2).sum(-1) < 1.0


def phantom(points: np.ndarray, center: np.ndarray, radii: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intensity and label of the phantom at physical points (..., 3); radii are the brain's
    semi-axes in mm (x: left-right, y: anterior-posterior, z: inferior-superior, LPS)."""
    r = (points - center) / radii
    # LPS: +y is posterior and +z superior; flip y so "front" is +r_y in the formulas below
    r = r * np.array([1.0, -1.0, 1.0])
    norm = np.sqrt((r**2).sum(-1))
    theta = np.arctan2(r[..., 1], r[..., 0])
    phi = np.arccos(np.clip(r[..., 2] / np.maximum(norm, 1e-6), -1, 1))
    gyri = 0.08 * np.sin(9 * theta) * np.sin(7 * phi)
    left = r[..., 0] >= 0
    labels = np.zeros(points.shape[:-1], dtype=np.int32)
    intensity = np.zeros(points.shape[:-1], dtype=np.float32)

    def put(mask, name):
        lab_left, lab_right, value = _T1[name]
        labels[mask] = np.where(left[mask], lab_left, lab_right)
        intensity[mask] = value

    cerebrum = (norm < 1.0 + 0.5 * gyri) & (r[..., 2] > -0.45)
    put(cerebrum, "cortex")
    put(cerebrum & (norm < 0.82 + gyri), "wm")
    for side in (-1, 1):
        put(_ellipsoid(r, (0.28 * side, 0.05, 0.05), (0.13, 0.22, 0.15)), "putamen")
        put(_ellipsoid(r, (0.13 * side, 0.25, 0.18), (0.07, 0.18, 0.10)), "caudate")
        put(_ellipsoid(r, (0.12 * side, -0.15, 0.05), (0.10, 0.16, 0.11)), "thalamus")
        put(_ellipsoid(r, (0.09 * side, 0.10, 0.26), (0.07, 0.40, 0.11)), "ventricle")
        put(_ellipsoid(r, (0.30 * side, -0.55, -0.55), (0.30, 0.28, 0.22)), "cerebellum_cortex")
        put(_ellipsoid(r, (0.25 * side, -0.52, -0.52), (0.15, 0.14, 0.10)), "cerebellum_wm")
    put(_ellipsoid(r, (0.0, -0.28, -0.55), (0.11, 0.13, 0.38)), "brainstem")
    return intensity, labels


def _image(array: np.ndarray, geometry: Geometry, dtype=None) -> sitk.Image:
    image = sitk.GetImageFromArray(array if dtype is None else array.astype(dtype))
    return geometry.apply_to(image)


def default_geometry(size=(96, 112, 96), spacing=(1.7, 1.7, 1.7), direction=None) -> Geometry:
    """A grid centred on the origin; ``direction`` defaults to RAS-stored data as in NIfTI brains."""
    direction = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0) if direction is None else tuple(direction)
    from .grid import centered_grid
    return centered_grid(size, spacing, direction, (0.0, 0.0, 0.0))


class SmoothDeformation:
    """``H(q) = q + h(q)``, h a sum of sinusoids of amplitude ``amplitude`` mm and wavelength
    ``wavelength`` mm with random phases and directions; invertible while amplitude * 2π/wavelength < 1."""

    def __init__(self, rng: np.random.Generator, amplitude: float, wavelength: float):
        if amplitude * 2 * np.pi / wavelength >= 0.8:
            raise ValueError("deformation too strong to be invertible: lower amplitude or raise wavelength")
        self.waves = [(rng.normal(size=3), rng.uniform(0, 2 * np.pi), rng.normal(size=3)) for _ in range(3)]
        self.amplitude, self.wavelength = amplitude, wavelength

    def h(self, q: np.ndarray) -> np.ndarray:
        out = np.zeros_like(q)
        for k, phase, direction in self.waves:
            k = k / np.linalg.norm(k) * 2 * np.pi / self.wavelength
            direction = direction / np.linalg.norm(direction)
            out += np.sin(q @ k + phase)[..., None] * direction
        return out * (self.amplitude / np.sqrt(len(self.waves)))

    def inverse(self, p: np.ndarray, iterations: int = 14) -> np.ndarray:
        """G(p) with H(G(p)) = p, by the contraction x <- p - h(x)."""
        x = p.copy()
        for _ in range(iterations):
            x = p - self.h(x)
        return x


def make_pair(size=(64, 64, 64), spacing=(2.5, 3.0, 2.5), seed: int = 0, amplitude: float = 4.0,
              wavelength: float = 70.0, direction=None, noise: float = 0.02, return_field: bool = False):
    """A fixed/moving phantom pair with a known smooth deformation.

    Returns ``(fixed, moving, fixed_seg, moving_seg)`` SimpleITK images on the same grid (float32
    images, int32 labels), plus the true forward displacement field image (VectorFloat64, LPS mm,
    fixed -> moving points) when ``return_field``. The brain fills the field of view like a real
    scan: its semi-axes are about 40% of the grid's extent.
    """
    rng = np.random.default_rng(seed)
    geometry = default_geometry(size, spacing, direction)
    extent = np.asarray(size) * np.asarray(spacing)
    radii = extent * np.array([0.38, 0.40, 0.37])
    center = geometry.center() + rng.normal(0, 0.01, 3) * extent
    deformation = SmoothDeformation(rng, amplitude, wavelength)
    points = geometry.physical_points()

    def render(at: np.ndarray):
        intensity, labels = phantom(at, center, radii)
        image = sitk.SmoothingRecursiveGaussian(_image(intensity, geometry), float(min(spacing)) * 0.6)
        array = sitk.GetArrayFromImage(image)
        array = array + noise * rng.standard_normal(array.shape).astype(np.float32)
        array[labels == 0] *= 0.2  # skull-stripped look: near-zero background
        return _image(np.clip(array, 0, None).astype(np.float32), geometry), _image(labels, geometry)

    fixed, fixed_seg = render(points)
    moving, moving_seg = render(points + deformation.h(points))
    if not return_field:
        return fixed, moving, fixed_seg, moving_seg
    from .fields import field_to_image
    forward = deformation.inverse(points) - points
    return fixed, moving, fixed_seg, moving_seg, field_to_image(forward, geometry)
