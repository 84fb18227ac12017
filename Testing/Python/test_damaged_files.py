"""A truncated or damaged input file, in any supported format, is refused: one line, exit 2,
nothing written (ITK alone reads a truncated NIfTI or VTK file as an image that is mostly zeros).

Each format is written by SimpleITK itself, then cut; the good file must still pass and read back
equal to what was written, so the check cannot simply refuse everything.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from InverseRegLib.cli import main
from InverseRegLib.filecheck import check_complete
from InverseRegLib.imageio import read_image

#: (file to give, file holding the voxel data, compress) for every format SimpleITK writes in 3D
FORMATS = {
    "nii": ("img.nii", "img.nii", False),
    "nii.gz": ("img.nii.gz", "img.nii.gz", True),
    "analyze hdr+img": ("img.hdr", "img.img", False),
    "analyze hdr.gz+img.gz": ("img.hdr.gz", "img.img.gz", True),
    "nrrd raw": ("img.nrrd", "img.nrrd", False),
    "nrrd gzip": ("img.nrrd", "img.nrrd", True),
    "nhdr+raw": ("img.nhdr", "img.raw", False),
    "nhdr+raw.gz": ("img.nhdr", "img.raw.gz", True),
    "mha raw": ("img.mha", "img.mha", False),
    "mha compressed": ("img.mha", "img.mha", True),
    "mhd+raw": ("img.mhd", "img.raw", False),
    "mhd+zraw": ("img.mhd", "img.zraw", True),
    "vtk": ("img.vtk", "img.vtk", False),
}


def _image() -> sitk.Image:
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:20, :24, :22]
    array = 100.0 * ((((z - 10) / 8.0) ** 2 + ((y - 12) / 9.0) ** 2 + ((x - 11) / 8.0) ** 2) < 1)
    image = sitk.GetImageFromArray((array + rng.normal(0, 5, array.shape)).astype(np.float32))
    image.SetSpacing((1.5, 1.2, 2.0))
    image.SetOrigin((-10.0, 4.0, 7.5))
    return image


@pytest.fixture(scope="module")
def good_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    image = _image()
    out = {}
    for key, (name, data, compress) in FORMATS.items():
        folder = root / key.replace(" ", "_").replace("+", "_")
        folder.mkdir()
        sitk.WriteImage(image, str(folder / name), compress)
        assert (folder / data).is_file(), f"SimpleITK wrote {sorted(os.listdir(folder))} for {key}"
        out[key] = folder / name
    return out


def _damaged_copy(good: Path, data_name: str, folder: Path, fraction: float) -> Path:
    shutil.copytree(good.parent, folder)
    data = folder / data_name
    size = data.stat().st_size
    with open(data, "r+b") as handle:
        handle.truncate(int(size * fraction))
    return folder / good.name


@pytest.mark.parametrize("key", sorted(FORMATS))
def test_good_file_passes_and_reads(good_files, key):
    check_complete(good_files[key])
    read = read_image(good_files[key])
    np.testing.assert_allclose(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(_image()), atol=1e-4)


@pytest.mark.parametrize("fraction", [0.6, 0.99])
@pytest.mark.parametrize("key", sorted(FORMATS))
def test_truncated_file_is_refused(good_files, key, fraction, tmp_path, capsys):
    _, data_name, _ = FORMATS[key]
    damaged = _damaged_copy(good_files[key], data_name, tmp_path / "in", fraction)
    before = {p: p.stat().st_size for p in (tmp_path / "in").iterdir()}
    out = tmp_path / "out"
    code = main(["register", str(good_files["nii"]), str(damaged), "-o", str(out), "--progress", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("inversereg: error: cannot read moving image"), err
    assert "truncated or damaged" in err[0], err
    assert not out.exists(), "nothing may be written for a refused input"
    assert {p: p.stat().st_size for p in (tmp_path / "in").iterdir()} == before, "inputs are never modified"


def test_first_100_kb_of_a_compressed_scan_is_refused(tmp_path, capsys):
    """The issue's case: the head of a .nii.gz scan, whose header is intact."""
    rng = np.random.default_rng(1)
    scan = sitk.GetImageFromArray(rng.integers(0, 4000, (96, 112, 96)).astype(np.int16))
    sitk.WriteImage(scan, str(tmp_path / "scan.nii.gz"), True)
    head = (tmp_path / "scan.nii.gz").read_bytes()[:100_000]
    (tmp_path / "head.nii.gz").write_bytes(head)
    code = main(["register", str(tmp_path / "head.nii.gz"), str(tmp_path / "scan.nii.gz"), "-o",
                 str(tmp_path / "out"), "--progress", "json"])
    captured = capsys.readouterr()
    assert code == 2
    assert "fixed image" in captured.err and "compressed stream ends early" in captured.err
    assert '"event": "error"' in captured.out
    assert not (tmp_path / "out").exists()


def test_corrupt_compressed_data_is_refused(good_files, tmp_path):
    """Damage inside a gzip stream (not a truncation) fails its checks (deflate or CRC)."""
    damaged = _damaged_copy(good_files["nii.gz"], "img.nii.gz", tmp_path / "in", 1.0)
    data = bytearray(damaged.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)
    damaged.write_bytes(bytes(data))
    with pytest.raises(Exception, match="truncated or damaged"):
        read_image(damaged)
