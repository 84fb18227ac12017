"""Carrying label maps through a displacement field, and checking that a label map fits its image.

A label map drawn on the moving image goes onto the fixed grid through the *forward* field (which
lives on the fixed grid and maps fixed points into moving space), one drawn on the fixed image goes
onto the moving grid through the *backward* field: each direction is a plain resampling, never a
numeric inversion.

Interpolation (``method``):

- ``"linear"`` (default): label-preserving linear interpolation. Each label's indicator (one-hot
  channel) is interpolated trilinearly and the voxel takes the label with the largest value
  (argmax). Only labels of the 8 neighbouring voxels can win, so no new label value appears, and
  boundaries move smoothly with the field instead of on the nearest voxel's staircase. Computed
  from the 8 neighbours' labels and weights, so its cost does not grow with the number of labels.
- ``"nearest"``: the nearest voxel's label (what ``sitk.sitkNearestNeighbor`` gives).

Outside the label map (further than half a voxel beyond the outer voxel centres, ITK's rule) the
label is 0.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from .errors import InverseRegError
from .fields import _z_slabs, index_affine, warp_image
from .grid import Geometry

LABEL_METHODS = ("linear", "nearest")

#: grid agreement needed between a label map and its image: the same size, and spacing, origin and
#: direction equal up to what float32 NIfTI headers round away
SPACING_TOLERANCE = 1e-4  # relative
ORIGIN_TOLERANCE = 1e-3  # in voxels (times the smallest spacing)
DIRECTION_TOLERANCE = 1e-4

_NEIGHBOURS = [(dx, dy, dz) for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]


def grid_mismatch(a: Geometry, b: Geometry) -> str | None:
    """``None`` when the two grids agree (see the tolerances above), else what differs, e.g.
    ``"size (40, 40, 30) vs (48, 56, 48)"``."""
    if tuple(a.size) != tuple(b.size):
        return f"size {tuple(a.size)} vs {tuple(b.size)}"
    if not np.allclose(a.spacing, b.spacing, rtol=SPACING_TOLERANCE, atol=0.0):
        return f"spacing {_fmt(a.spacing)} vs {_fmt(b.spacing)} mm"
    if np.abs(np.subtract(a.origin, b.origin)).max() > ORIGIN_TOLERANCE * min(b.spacing):
        return f"origin {_fmt(a.origin)} vs {_fmt(b.origin)} mm"
    if np.abs(np.subtract(a.direction, b.direction)).max() > DIRECTION_TOLERANCE:
        return "direction cosines differ"
    return None


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def check_label_map(labels: sitk.Image, image, role: str = "label map", image_role: str = "its image") -> sitk.Image:
    """Refuse a label map that is not on its image's grid or has no labelled voxel; returns it as
    int32. ``image`` is a SimpleITK image or a :class:`Geometry`; ``role`` names the label map in
    the one-line error (e.g. ``"moving label map moving_seg.nii.gz"``)."""
    if labels.GetDimension() != 3 or labels.GetNumberOfComponentsPerPixel() != 1:
        raise InverseRegError(f"{role} must be a 3D scalar image")
    geometry = image if isinstance(image, Geometry) else Geometry.of(image)
    mismatch = grid_mismatch(Geometry.of(labels), geometry)
    if mismatch is not None:
        raise InverseRegError(f"{role} is not on the grid of {image_role} ({mismatch}); a label map must have "
                              "the size of its image and share its spacing, origin and direction")
    array = sitk.GetArrayViewFromImage(labels)
    if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
        raise InverseRegError(f"{role} has non-integer values")
    if not np.any(array):
        raise InverseRegError(f"{role} is empty: every voxel is 0 (no label to carry or to score)")
    return sitk.Cast(labels, sitk.sitkInt32)


def compact_labels(image: sitk.Image) -> sitk.Image:
    """The same label map in the smallest integer type that holds its values (uint8, uint16,
    int16 or int32): smaller files, and viewers recognise them as label maps."""
    array = sitk.GetArrayViewFromImage(image)
    low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
    for pixel, lo, hi in ((sitk.sitkUInt8, 0, 255), (sitk.sitkUInt16, 0, 65535), (sitk.sitkInt16, -32768, 32767)):
        if lo <= low and high <= hi:
            return sitk.Cast(image, pixel)
    return sitk.Cast(image, sitk.sitkInt32)


def _field_on(field, reference) -> tuple[torch.Tensor, Geometry]:
    """(z, y, x, 3) float32 displacement and the output grid from the caller's field/reference."""
    if isinstance(field, sitk.Image):
        if field.GetNumberOfComponentsPerPixel() != 3 or field.GetDimension() != 3:
            raise InverseRegError("the field must be a 3D displacement field (3 components per voxel)")
        field_geometry = Geometry.of(field)
        if reference is None:
            reference = field_geometry
        reference = reference if isinstance(reference, Geometry) else Geometry.of(reference)
        mismatch = grid_mismatch(field_geometry, reference)
        if mismatch is not None:
            raise InverseRegError(f"the field is not on the reference grid ({mismatch}): use the field that "
                                  "lives on the grid the labels go to (forward for the fixed grid, backward for the moving one)")
        array = sitk.GetArrayViewFromImage(field)
    else:
        if reference is None:
            raise InverseRegError("a field given as an array needs its reference grid")
        reference = reference if isinstance(reference, Geometry) else Geometry.of(reference)
        array = field
    displacement = torch.from_numpy(np.array(array, dtype=np.float32))
    if tuple(displacement.shape) != (*reference.array_shape, 3):
        raise InverseRegError(f"field shape {tuple(displacement.shape)} does not match the reference grid "
                              f"{(*reference.array_shape, 3)}")
    return displacement, reference


def warp_labels(labels: sitk.Image, field, reference=None, method: str = "linear") -> sitk.Image:
    """Resample a label map through a displacement field onto the field's grid.

    ``labels``: an integer label map on the grid of the image the field maps *into* (the moving
    image for the forward field). ``field``: an ITK displacement field image (LPS mm, the
    resampling convention: ``p -> p + d(p)``), or a (z, y, x, 3) array on ``reference``.
    ``reference``: the output grid (a SimpleITK image or :class:`Geometry`; default the field's
    grid, which it must equal). ``method``: ``"linear"`` (label-preserving, see the module
    docstring) or ``"nearest"``. Returns an image on ``reference`` with ``labels``' pixel type.
    """
    if method not in LABEL_METHODS:
        raise InverseRegError(f"label interpolation must be one of {', '.join(LABEL_METHODS)}, got {method!r}")
    if labels.GetDimension() != 3 or labels.GetNumberOfComponentsPerPixel() != 1:
        raise InverseRegError("the label map must be a 3D scalar image")
    displacement, geometry = _field_on(field, reference)
    pixel = labels.GetPixelID()
    if method == "nearest":
        warped = warp_image(sitk.Cast(labels, sitk.sitkInt32), displacement, geometry, nearest=True)
        return sitk.Cast(warped, pixel)
    source = Geometry.of(labels)
    array = sitk.GetArrayFromImage(sitk.Cast(labels, sitk.sitkInt32))
    padded = np.pad(array, ((0, 1), (0, 1), (0, 1)), mode="edge").ravel()
    # continuous index in the label grid of p + d(p): Minv (M_out i + o_out - o_src) + Minv d
    inverse = np.linalg.inv(source.index_to_physical)
    matrix = inverse @ geometry.index_to_physical
    offset = inverse @ (np.asarray(geometry.origin) - np.asarray(source.origin))
    inverse_t = torch.as_tensor(inverse.T, dtype=torch.float32)
    size = torch.as_tensor(source.size, dtype=torch.float32)
    nx, ny, nz = geometry.size
    out = np.empty(geometry.array_shape, dtype=np.int32)
    for z0, z1 in _z_slabs(geometry):
        index = index_affine(geometry, matrix, offset, "cpu", (z0, z1)) + displacement[z0:z1] @ inverse_t
        index = index.reshape(-1, 3)
        out[z0:z1] = _argmax_linear(padded, source.size, index, size).reshape(z1 - z0, ny, nx).numpy()
    image = sitk.GetImageFromArray(out)
    return sitk.Cast(geometry.apply_to(image), pixel)


def _argmax_linear(padded: np.ndarray, source_size, index: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """The label whose trilinearly interpolated indicator is largest at each continuous index
    (N, 3) of a label grid; 0 beyond ITK's half-voxel border. ``padded``: the labels flattened
    from a (z, y, x) array with one edge-replicated plane added after each axis, so that the
    8 neighbours of every clamped index are at fixed offsets from the lower one.

    Inside a structure all 8 neighbours carry one label and that is the answer; the scoring runs
    only where they differ (near boundaries).
    """
    nx, ny, _ = (int(s) + 1 for s in source_size)  # the padded row and plane lengths
    inside = ((index >= -0.5) & (index < size - 0.5)).all(dim=1)
    # within the half-voxel border the edge voxels extend outwards (ITK's rule for images)
    index = torch.minimum(torch.clamp(index, min=0.0), size - 1.0)
    base = torch.floor(index)
    fraction = index - base
    base = base.long()
    lower = (base[:, 2] * ny + base[:, 1]) * nx + base[:, 0]
    offsets = torch.tensor([dx + dy * nx + dz * nx * ny for dx, dy, dz in _NEIGHBOURS], dtype=torch.long)
    # (N, 8); numpy's take gathers several times faster than torch's indexing on CPU
    corner_labels = torch.from_numpy(np.take(padded, (lower[:, None] + offsets).numpy()))
    best = corner_labels[:, 0].clone()
    mixed = torch.nonzero((corner_labels != corner_labels[:, :1]).any(dim=1)).squeeze(1)
    for start in range(0, mixed.numel(), _SCORE_CHUNK):
        rows = mixed[start:start + _SCORE_CHUNK]
        labels, f = corner_labels[rows], fraction[rows]
        weights = torch.stack([(f[:, 0] if dx else 1 - f[:, 0]) * (f[:, 1] if dy else 1 - f[:, 1])
                               * (f[:, 2] if dz else 1 - f[:, 2]) for dx, dy, dz in _NEIGHBOURS], dim=1)
        # score of corner a: the summed weight of the corners carrying a's label, i.e. that label's
        # interpolated indicator; argmax takes the first corner with the top score
        same = labels[:, :, None] == labels[:, None, :]
        scores = (same * weights[:, None, :]).sum(dim=2)
        best[rows] = labels.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)
    return torch.where(inside, best, torch.zeros_like(best))


#: boundary voxels scored at a time (bounds the (N, 8, 8) comparison's memory to ~100 MB)
_SCORE_CHUNK = 200_000
