"""Reading and validating images, and writing outputs atomically.

Every check raises :class:`InverseRegError` with one line naming the file and the problem.
Inputs are only ever read; outputs go through a temporary file in the target folder and a rename,
so a crash never leaves a half-written file under the final name.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InverseRegError


def _read(path, what: str) -> sitk.Image:
    path = Path(path)
    if not path.exists():
        raise InverseRegError(f"{what} not found: {path}")
    if path.is_dir() and not path.name.endswith((".dcm",)):
        raise InverseRegError(f"{what} is a folder, not an image file: {path}")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else "unknown format"
        raise InverseRegError(f"cannot read {what} {path}: {reason}") from None


def validate_image(image: sitk.Image, name: str = "image") -> sitk.Image:
    """Check that ``image`` is a usable 3D scalar volume; returns it unchanged."""
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise InverseRegError(f"{name} is {image.GetDimension()}D (size {image.GetSize()}); a 3D volume is needed")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InverseRegError(
            f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel; a scalar volume is needed"
        )
    if min(image.GetSize()) < 4:
        raise InverseRegError(f"{name} is too thin ({image.GetSize()}): a 3D volume with at least 4 voxels per axis is needed")
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InverseRegError(f"{name} contains NaN or infinite values")
    if float(array.max()) == float(array.min()):
        raise InverseRegError(f"{name} is constant (every voxel is {float(array.min())}): nothing to register")
    return image


def read_image(path, name: str | None = None, role: str = "image") -> sitk.Image:
    """Read a 3D scalar image as float32, validated. ``role`` ("fixed image", ...) starts every
    error message, so a user sees which input is wrong even when the file is missing."""
    name = name or f"{role} {path}"
    image = validate_image(_read(path, role), name)
    return sitk.Cast(image, sitk.sitkFloat32)


def read_label(path, name: str | None = None, role: str = "label map") -> sitk.Image:
    """Read a 3D integer label map (cast to int32)."""
    image = _read(path, role)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InverseRegError(f"{role} {path} must be a 3D scalar image")
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
        raise InverseRegError(f"{role} {path} has non-integer values")
    return sitk.Cast(image, sitk.sitkInt32)


def write_image_atomic(image: sitk.Image, path, compress: bool = True) -> None:
    """Write with SimpleITK to a temporary sibling (same extension), then rename into place."""
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    _permissions(tmp)
    try:
        sitk.WriteImage(image, tmp, compress)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(text: str, path) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    _permissions(tmp)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def prepare_output_dir(outdir, inputs: list) -> Path:
    """Create ``outdir`` if needed; refuse a file in its place or outputs that would hit inputs."""
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise InverseRegError(f"output path exists and is not a folder: {outdir}")
    outdir.mkdir(parents=True, exist_ok=True)
    resolved_inputs = {Path(p).resolve() for p in inputs if p is not None}
    for name in OUTPUT_NAMES:
        if (outdir / name).resolve() in resolved_inputs:
            raise InverseRegError(f"output {outdir / name} would overwrite an input file; choose another folder")
    return outdir


OUTPUT_NAMES = (
    "forward.nii.gz",
    "backward.nii.gz",
    "moving_warped.nii.gz",
    "fixed_warped.nii.gz",
    "affine.tfm",
    "report.json",
    "overview.png",
    # carried label maps (--fixed-seg/--moving-seg) and Jacobian determinants (--jacobian)
    "moving_seg_warped.nii.gz",
    "fixed_seg_warped.nii.gz",
    "jacobian_forward.nii.gz",
    "jacobian_backward.nii.gz",
)


def _permissions(path) -> None:
    """mkstemp makes files private (0600); outputs get the usual mode for new files instead."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
