"""Image geometry and the model grid: where the network looks in physical space.

A :class:`Geometry` is an ITK image grid (size and spacing in x, y, z order, origin, direction, all
LPS as SimpleITK reports them). The network always runs on a *model grid*: a fixed size, spacing
and orientation stored in the model file, centred on the fixed image's intensity centre of mass.
Any input (any size, spacing, orientation) is resampled into it in physical space, and the fields
the network returns are resampled back onto the original grids (:mod:`InverseRegLib.fields`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class Geometry:
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major, columns are the axis directions

    @staticmethod
    def of(image: sitk.Image) -> "Geometry":
        return Geometry(
            tuple(int(s) for s in image.GetSize()),
            tuple(float(s) for s in image.GetSpacing()),
            tuple(float(s) for s in image.GetOrigin()),
            tuple(float(s) for s in image.GetDirection()),
        )

    @property
    def array_shape(self) -> tuple[int, int, int]:
        """Shape of the numpy array SimpleITK gives for this grid: (z, y, x)."""
        return self.size[::-1]

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def index_to_physical(self) -> np.ndarray:
        """3x3 matrix M with point = origin + M @ index (index in x, y, z order)."""
        return self.direction_matrix @ np.diag(self.spacing)

    def physical_points(self) -> np.ndarray:
        """Physical (LPS) coordinates of every voxel centre, shape (z, y, x, 3), float64."""
        nx, ny, nz = self.size
        k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
        index = np.stack([i, j, k], axis=-1).astype(np.float64)
        return index @ self.index_to_physical.T + np.asarray(self.origin)

    def physical_to_index(self, points: np.ndarray) -> np.ndarray:
        """Continuous (x, y, z) indices of physical points (..., 3)."""
        inverse = np.linalg.inv(self.index_to_physical)
        return (np.asarray(points) - np.asarray(self.origin)) @ inverse.T

    def reference_image(self, pixel=sitk.sitkFloat32) -> sitk.Image:
        image = sitk.Image(list(self.size), pixel)
        self.apply_to(image)
        return image

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def center(self) -> np.ndarray:
        middle = (np.asarray(self.size, dtype=np.float64) - 1.0) / 2.0
        return np.asarray(self.origin) + self.index_to_physical @ middle


def centered_grid(
    size: tuple[int, int, int], spacing: tuple[float, float, float], direction, center
) -> Geometry:
    """A grid of the given size, spacing and direction whose centre lies at ``center`` (LPS)."""
    direction = tuple(float(d) for d in np.asarray(direction, dtype=np.float64).ravel())
    matrix = np.asarray(direction).reshape(3, 3) @ np.diag(spacing)
    middle = (np.asarray(size, dtype=np.float64) - 1.0) / 2.0
    origin = np.asarray(center, dtype=np.float64) - matrix @ middle
    return Geometry(tuple(int(s) for s in size), tuple(float(s) for s in spacing),
                    tuple(float(o) for o in origin), direction)


def intensity_center(image: sitk.Image, normalized: np.ndarray | None = None) -> np.ndarray:
    """Intensity-weighted centre of mass (LPS, mm) of an image, from its normalised intensities."""
    from .intensity import normalize

    weights = normalize(sitk.GetArrayViewFromImage(image)) if normalized is None else normalized
    total = float(weights.sum())
    if total <= 0:
        return Geometry.of(image).center()
    nz, ny, nx = weights.shape
    ci = float((weights.sum(axis=(0, 1)) * np.arange(nx)).sum() / total)
    cj = float((weights.sum(axis=(0, 2)) * np.arange(ny)).sum() / total)
    ck = float((weights.sum(axis=(1, 2)) * np.arange(nz)).sum() / total)
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint((ci, cj, ck)))


def resample_to(
    image: sitk.Image,
    geometry: Geometry,
    transform: sitk.Transform | None = None,
    interpolator=sitk.sitkLinear,
    default_value: float = 0.0,
) -> sitk.Image:
    """Resample ``image`` onto ``geometry`` through ``transform`` (reference point -> image point)."""
    return sitk.Resample(
        image,
        geometry.reference_image(),
        transform if transform is not None else sitk.Transform(),
        interpolator,
        default_value,
        image.GetPixelID() if interpolator == sitk.sitkNearestNeighbor else sitk.sitkFloat32,
    )
