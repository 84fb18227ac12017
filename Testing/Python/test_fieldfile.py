"""fieldfile.write_field against ITK's own NIfTI writer: byte for byte the file ITK writes for the
same field (vectors in RAS, intent 1006), whatever the grid and the compression."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import SimpleITK as sitk

from InverseRegLib import fieldfile
from InverseRegLib.errors import InverseRegError
from InverseRegLib.fastgzip import COMPRESSIONS
from InverseRegLib.fieldfile import field_header, write_field
from InverseRegLib.grid import Geometry, centered_grid
from InverseRegLib.filecheck import check_complete


def _oblique_geometry(size=(9, 11, 7)) -> Geometry:
    direction = np.array([[0.0, -1.0, 0.0], [0.8, 0.0, 0.6], [-0.6, 0.0, 0.8]])  # rotated axes, det +1
    return centered_grid(size, (2.0, 1.5, 3.0), direction.ravel(), (5.0, -3.0, 12.0))


def _itk_file(field: np.ndarray, geometry: Geometry, path) -> bytes:
    """What ITK's writer makes of the field (x, y negated for RAS), with intent 1006 patched in."""
    ras = field * np.array([-1.0, -1.0, 1.0])
    image = geometry.apply_to(sitk.GetImageFromArray(ras.astype(np.float64), isVector=True))
    sitk.WriteImage(image, str(path), False)
    data = bytearray(path.read_bytes())
    struct.pack_into("<h", data, 68, 1006)
    return bytes(data)


@pytest.mark.parametrize("compression", list(COMPRESSIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bytes_equal_itks_writer(tmp_path, compression, dtype, monkeypatch):
    monkeypatch.setattr(fieldfile, "SLAB_VOXELS", 150)  # several slabs per component even on a tiny grid
    geometry = _oblique_geometry()
    rng = np.random.default_rng(1)
    field = rng.normal(0, 2.5, (*geometry.array_shape, 3)).astype(dtype)
    field[0, 0, 0] = 0.0  # a zero component: its sign must come out as ITK's
    path = tmp_path / "forward.nii.gz"
    write_field(field, geometry, path, compression, threads=3, block=2048)
    expected = _itk_file(field.astype(np.float64), geometry, tmp_path / "itk.nii")
    assert gzip.decompress(path.read_bytes()) == expected
    if compression != "none":
        assert path.stat().st_size < len(expected)
        assert path.read_bytes().count(b"\x1f\x8b\x08") > 1  # parallel members
    check_complete(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forward.nii.gz", "itk.nii"]  # no temporary left


def test_plain_nii_and_simpleitk_transform(tmp_path):
    geometry = _oblique_geometry((6, 5, 8))
    points = geometry.physical_points()
    field = np.stack([np.sin(points[..., 1] / 5.0), np.cos(points[..., 0] / 4.0), 0.3 + 0 * points[..., 2]], -1)
    path = tmp_path / "backward.nii"
    write_field(field.astype(np.float32), geometry, path)
    assert path.read_bytes() == _itk_file(field.astype(np.float32).astype(np.float64), geometry, tmp_path / "itk.nii")
    transform = sitk.DisplacementFieldTransform(sitk.ReadImage(str(path)))
    p = points[3, 2, 4]
    np.testing.assert_allclose(transform.TransformPoint(tuple(p)), p + field[3, 2, 4], atol=1e-5)


def test_header_alone_matches_itk_for_the_real_size(tmp_path):
    geometry = _oblique_geometry((40, 3, 17))
    expected = _itk_file(np.zeros((*geometry.array_shape, 3)), geometry, tmp_path / "itk.nii")
    header = field_header(geometry)
    assert header == expected[:len(header)] and len(header) == 352


def test_refuses_what_is_not_a_field(tmp_path):
    geometry = _oblique_geometry()
    with pytest.raises(InverseRegError, match="does not match its grid"):
        write_field(np.zeros((3, 3, 3, 3)), geometry, tmp_path / "f.nii.gz")
    with pytest.raises(InverseRegError, match="3 components"):
        write_field(np.zeros((*geometry.array_shape, 2)), geometry, tmp_path / "f.nii.gz")
    with pytest.raises(InverseRegError, match="NIfTI"):
        write_field(np.zeros((*geometry.array_shape, 3)), geometry, tmp_path / "f.mha")
    with pytest.raises(ValueError, match="compression must be one of"):
        write_field(np.zeros((*geometry.array_shape, 3)), geometry, tmp_path / "f.nii.gz", "zstd")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("compression", ["none", "fast"])
def test_read_field_ras_is_what_simpleitk_and_slicers_conversion_give(tmp_path, compression):
    from InverseRegLib.fieldfile import read_field_ras
    from InverseRegLib.slicer_grid import itk_field_to_slicer_grid, read_slicer_grid
    geometry = _oblique_geometry()
    field = np.random.default_rng(3).normal(0, 2.0, (*geometry.array_shape, 3)).astype(np.float32)
    path = tmp_path / "forward.nii.gz"
    write_field(field, geometry, path, compression, threads=2, block=4096)
    ras, read_geometry = read_field_ras(path)
    reference = itk_field_to_slicer_grid(sitk.ReadImage(str(path)))  # ITK's reader, then LPS -> RAS
    np.testing.assert_array_equal(ras, reference.displacement_ras)
    np.testing.assert_array_equal(ras, field * np.array([-1.0, -1.0, 1.0]))
    grid = read_slicer_grid(path)
    np.testing.assert_allclose(grid.ijk_to_ras(), reference.ijk_to_ras(), atol=1e-9)
    assert read_geometry.size == geometry.size


def test_read_field_ras_leaves_other_files_to_itk(tmp_path):
    from InverseRegLib.fieldfile import read_field_ras
    from InverseRegLib.slicer_grid import itk_field_to_slicer_grid, read_slicer_grid
    geometry = _oblique_geometry()
    image = geometry.apply_to(sitk.GetImageFromArray(np.ones((*geometry.array_shape, 3)), isVector=True))
    path = tmp_path / "itk.nii.gz"
    sitk.WriteImage(image, str(path))  # intent 1007, compressed by ITK
    assert read_field_ras(path) is None
    np.testing.assert_array_equal(read_slicer_grid(path).displacement_ras,
                                  itk_field_to_slicer_grid(sitk.ReadImage(str(path))).displacement_ras)
