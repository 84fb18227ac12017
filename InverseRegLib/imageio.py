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
    if path.is_file():
        from .filecheck import Damaged, check_complete
        try:
            check_complete(path)  # ITK reads a truncated NIfTI as zeros without a word
        except Damaged as error:
            which = "the file" if error.file == path else f"its data file {error.file.name}"
            raise InverseRegError(f"cannot read {what} {path}: {which} is truncated or damaged: {error.detail}") from None
        except OSError as error:
            raise InverseRegError(f"cannot read {what} {path}: {error.strerror or error}") from None
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else "unknown format"
        raise InverseRegError(f"cannot read {what} {path}: {reason}") from None


def _write_image(image: sitk.Image, path: str, compress: bool, compression: str | None = None) -> None:
    """``sitk.WriteImage``, but a compressed NIfTI is written plain by ITK and gzipped by
    :mod:`.fastgzip` with ``compression`` (default :data:`~.fastgzip.DEFAULT_COMPRESSION`): the
    same bytes once decompressed, at a fraction of ITK's deflate time (docs/benchmark.md)."""
    if not (compress and path.endswith(".nii.gz")):
        sitk.WriteImage(image, path, compress)
        return
    from .fastgzip import DEFAULT_COMPRESSION, default_threads, gzip_file

    plain = path[: -len(".gz")]
    try:
        sitk.WriteImage(image, plain, False)
        gzip_file(plain, path, compression or DEFAULT_COMPRESSION, threads=default_threads())
    finally:
        Path(plain).unlink(missing_ok=True)


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


def write_image_atomic(image: sitk.Image, path, compress: bool = True, compression: str | None = None) -> None:
    """Write with SimpleITK to a temporary sibling (same extension), then rename into place;
    ``compression``: how a ``.nii.gz`` is compressed (:data:`~.fastgzip.COMPRESSIONS`)."""
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    _permissions(tmp)
    try:
        _write_image(image, tmp, compress, compression)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_displacement_field(field: sitk.Image, path, chunk_bytes: int | None = None,
                             compression: str | None = None) -> None:
    """Write an ITK displacement field image (3 components, LPS mm) as a NIfTI displacement-vector
    file (intent 1006, vectors in RAS on disk as NIfTI prescribes), atomically: see
    :func:`InverseRegLib.fieldfile.write_field`, which writes from the array directly.

    SimpleITK alone writes vector images with intent 1007 (and refuses an ``intent_code`` in
    the metadata), which 3D Slicer's transform reader warns about; with intent 1006, ITK (so
    SimpleITK, ANTs and Slicer) flips x and y back to LPS when it reads the file, and every one
    of those readers gets exactly ``field``'s values back (Testing/Python/test_slicer_fields.py).
    ``compression`` as for :func:`write_image_atomic`; ``chunk_bytes``: bytes per gzip member
    when compressing in parallel.

    One consequence of intent 1006: SimpleITK keeps ``intent_code`` in the metadata of an image
    it read from such a file, and its NIfTI writer then refuses that image ("RAS conversion
    requires pixel to be 3-component vector"). To save a copy as NIfTI, use this function (or
    erase the image's metadata first); other formats (.mha, .nrrd) are not affected.
    """
    from .fastgzip import DEFAULT_COMPRESSION
    from .fieldfile import write_field
    from .grid import Geometry

    path = Path(path)
    if field.GetDimension() != 3 or field.GetNumberOfComponentsPerPixel() != 3:
        raise InverseRegError(f"{path.name}: a 3D displacement field with 3 components per voxel is needed")
    write_field(sitk.GetArrayViewFromImage(field), Geometry.of(field), path, compression or DEFAULT_COMPRESSION,
                block=chunk_bytes)


def write_text_atomic(text: str, path) -> None:
    """Write ``text`` to a temporary sibling, then rename it into place; on any failure the
    temporary file is removed and ``path`` is as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _permissions(tmp)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output_dir(outdir, inputs: list) -> Path:
    """Refuse a file in place of ``outdir`` or outputs that would hit inputs, creating nothing
    (so that an input refused afterwards leaves no trace)."""
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise InverseRegError(f"output path exists and is not a folder: {outdir}")
    resolved_inputs = {Path(p).resolve() for p in inputs if p is not None}
    for name in OUTPUT_NAMES:
        if (outdir / name).resolve() in resolved_inputs:
            raise InverseRegError(f"output {outdir / name} would overwrite an input file; choose another folder")
    return outdir


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
