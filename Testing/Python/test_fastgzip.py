"""Outputs written by fastgzip (stored, or zlib level 1 run-length / level 6 in several gzip
members when threaded) are what ITK, Python's gzip and VTK read back, bit for bit."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import SimpleITK as sitk

from InverseRegLib import fastgzip
from InverseRegLib.filecheck import check_complete
from InverseRegLib.imageio import write_image_atomic


@pytest.mark.parametrize("compression", list(fastgzip.COMPRESSIONS))
@pytest.mark.parametrize("threads", [1, 3])
def test_written_field_reads_back_exactly(tmp_path, monkeypatch, threads, compression):
    monkeypatch.setattr(fastgzip, "BLOCK", 64 << 10)  # several members even for a small field
    monkeypatch.setattr(fastgzip, "default_threads", lambda: threads)
    rng = np.random.default_rng(0)
    field = sitk.GetImageFromArray(rng.normal(0, 3, (20, 24, 22, 3)), isVector=True)
    field.SetSpacing((1.5, 1.2, 2.0))
    field.SetOrigin((-3.0, 4.0, 5.5))
    path = tmp_path / "forward.nii.gz"
    write_image_atomic(field, path, compression=compression)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forward.nii.gz"]  # no temporary left
    raw = path.read_bytes()
    members = raw.count(b"\x1f\x8b\x08")
    assert (members > 1) == (threads > 1 and compression != "none")  # stored data needs no threads
    back = sitk.ReadImage(str(path))
    assert back.GetPixelID() == sitk.sitkVectorFloat64
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(field))
    np.testing.assert_allclose(back.GetSpacing(), field.GetSpacing(), rtol=1e-6)  # NIfTI stores float32
    np.testing.assert_allclose(back.GetOrigin(), field.GetOrigin(), rtol=1e-6)
    plain = tmp_path / "plain.nii"
    sitk.WriteImage(field, str(plain), False)
    assert gzip.decompress(raw) == plain.read_bytes()  # the same NIfTI file, only compressed
    check_complete(path)


def test_vtk_reads_multi_member_files(tmp_path, monkeypatch):
    vtk = pytest.importorskip("vtk")
    monkeypatch.setattr(fastgzip, "BLOCK", 16 << 10)
    monkeypatch.setattr(fastgzip, "default_threads", lambda: 2)
    array = np.arange(30 * 20 * 10, dtype=np.float32).reshape(10, 20, 30)
    path = tmp_path / "warped.nii.gz"
    write_image_atomic(sitk.GetImageFromArray(array), path, compression="fast")
    assert path.read_bytes().count(b"\x1f\x8b\x08") > 1
    reader = vtk.vtkNIFTIImageReader()
    reader.SetFileName(str(path))
    reader.Update()
    scalars = reader.GetOutput().GetPointData().GetScalars()
    assert reader.GetOutput().GetDimensions() == (30, 20, 10)
    assert scalars.GetRange() == (0.0, float(array.max()))


@pytest.mark.parametrize("compression", list(fastgzip.COMPRESSIONS))
def test_read_gzip_gives_back_what_was_written(tmp_path, monkeypatch, compression):
    monkeypatch.setattr(fastgzip, "BLOCK", 64 << 10)  # several members when compressed in parallel
    data = np.random.default_rng(2).normal(size=300_000).astype(np.float32).tobytes() + b"tail"
    path = tmp_path / "f.gz"
    with open(path, "wb") as handle:
        stream = fastgzip.GzipWriter(handle, compression, threads=2)
        stream.write(data[:1000])
        stream.write(data[1000:])
        stream.close()
    assert fastgzip.read_gzip(path) == data == gzip.decompress(path.read_bytes())
    # the stored fast path takes exactly the files made of stored blocks
    assert (fastgzip._unpack_stored(memoryview(path.read_bytes())) is not None) == (compression == "none")


def test_read_gzip_refuses_damaged_and_truncated_stored_files(tmp_path):
    data = bytes(range(256)) * 2000
    path = tmp_path / "f.gz"
    with open(path, "wb") as handle:
        stream = fastgzip.GzipWriter(handle, "none")
        stream.write(data)
        stream.close()
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one data byte flipped: only the CRC can tell
    (tmp_path / "damaged.gz").write_bytes(bytes(raw))
    with pytest.raises(OSError, match="CRC"):
        fastgzip.read_gzip(tmp_path / "damaged.gz")
    (tmp_path / "short.gz").write_bytes(path.read_bytes()[:-100])
    with pytest.raises((OSError, EOFError)):
        fastgzip.read_gzip(tmp_path / "short.gz")
