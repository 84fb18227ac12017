"""Moving points between the images through the fields, and TRE (issue 15, item 2).

Oracles: SimpleITK's ``DisplacementFieldTransform.TransformPoint`` on the written field files (the
exact evaluation p + d(p)); Slicer's own markups JSON storage node (slicer-core) writing the input
files and reading the outputs, in both LPS and RAS files; TRE recomputed here with numpy.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from InverseRegLib.cli import main
from InverseRegLib.errors import InverseRegError
from InverseRegLib.points import read_points, transform_points
from inversereg_testlib import OBLIQUE_MOVING_GRID as MOVING_GRID, RAS_FLIP as FLIP

try:  # Slicer's MRML (slicer-core) writes and reads the markups files; only those tests need it
    import slicer
except ImportError:
    slicer = None
needs_slicer = pytest.mark.skipif(slicer is None, reason="slicer-core (Slicer's MRML in Python) is not installed")



@pytest.fixture(scope="module")
def result(tmp_path_factory, small_pair, model_file):
    """A registration output folder of the small pair (moving on an oblique grid of its own)."""
    folder = tmp_path_factory.mktemp("points_pair")
    fixed, moving, _, _, _ = small_pair
    moving = sitk.Resample(moving, MOVING_GRID.reference_image(), sitk.Transform(), sitk.sitkLinear, 0.0,
                           sitk.sitkFloat32)
    sitk.WriteImage(fixed, str(folder / "fixed.nii.gz"))
    sitk.WriteImage(moving, str(folder / "moving.nii.gz"))
    out = folder / "out"
    assert main(["register", str(folder / "fixed.nii.gz"), str(folder / "moving.nii.gz"), "-o", str(out),
                 "--model", str(model_file), "--device", "cpu", "--no-affine", "--passes", "1",
                 "--progress", "none"]) == 0
    return out


def field(result, name) -> sitk.Image:
    return sitk.Cast(sitk.ReadImage(str(result / f"{name}.nii.gz")), sitk.sitkVectorFloat64)


def itk_map(points: np.ndarray, displacement: sitk.Image) -> np.ndarray:
    transform = sitk.DisplacementFieldTransform(sitk.Image(displacement))
    return np.array([transform.TransformPoint(tuple(float(v) for v in p)) for p in points])


def inside_points(image: sitk.Image, count: int, seed: int) -> np.ndarray:
    """Random LPS points whose continuous index lies within the voxel centres (ITK interpolates
    there; beyond, ITK gives zero displacement while we extend the edge for half a voxel)."""
    rng = np.random.default_rng(seed)
    size = np.asarray(image.GetSize(), dtype=float)
    index = rng.uniform(1.0, size - 2.0, size=(count, 3))
    return np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(i)) for i in index])


def write_markups(path, ras_points, labels, coordinate_system: str) -> None:
    """A fiducial list written by Slicer's own storage node, in an LPS or RAS file."""
    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(node)
    for point, label in zip(ras_points, labels):
        node.AddControlPoint(*[float(v) for v in point], label)
    storage = slicer.vtkMRMLMarkupsJsonStorageNode()
    scene.AddNode(storage)
    storage.SetCoordinateSystem(getattr(slicer.vtkMRMLStorageNode, f"CoordinateSystem{coordinate_system}"))
    storage.SetFileName(str(path))
    assert storage.WriteData(node) == 1


def read_markups(path) -> tuple[np.ndarray, list[str]]:
    """Positions (RAS, as Slicer holds them) and labels, read by Slicer's storage node."""
    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLMarkupsJsonStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    positions = []
    for i in range(node.GetNumberOfControlPoints()):
        p = [0.0, 0.0, 0.0]
        node.GetNthControlPointPosition(i, p)
        positions.append(p)
    return np.array(positions), [node.GetNthControlPointLabel(i) for i in range(node.GetNumberOfControlPoints())]


def test_transform_points_is_itk_transform_point(result):
    """p + forward(p) (and q + backward(q)) equal SimpleITK evaluating the field files."""
    for name in ("forward", "backward"):
        displacement = field(result, name)
        points = inside_points(displacement, 60, seed=len(name))
        ours = transform_points(points, displacement)
        assert np.abs(ours - points).max() > 0.5  # the fields move points
        assert np.abs(ours - itk_map(points, displacement)).max() < 1e-6


@needs_slicer
@pytest.mark.parametrize("system", ["LPS", "RAS"])
def test_markups_both_ways_with_tre(result, tmp_path, capsys, system):
    """Slicer markups files (written in LPS or RAS by Slicer's storage node) on both images: each
    list goes to the other space through the other field, Slicer reads the outputs back at the
    positions SimpleITK gives, and the TRE summary is what numpy computes from those positions."""
    forward, backward = field(result, "forward"), field(result, "backward")
    fixed_lps = inside_points(forward, 12, seed=1)
    # corresponding moving points: the exact images of the fixed ones plus a known error of 0-2 mm
    offsets = np.random.default_rng(2).normal(size=(12, 3))
    offsets *= (np.linspace(0.0, 2.0, 12) / np.linalg.norm(offsets, axis=1))[:, None]
    moving_lps = itk_map(fixed_lps, forward) + offsets
    labels = [f"L{i}" for i in range(12)]
    write_markups(tmp_path / "fixed.mrk.json", fixed_lps * FLIP, labels, system)
    # the moving list in another order: points are paired by label
    order = np.random.default_rng(3).permutation(12)
    write_markups(tmp_path / "moving.mrk.json", (moving_lps * FLIP)[order], [labels[i] for i in order], system)
    assert json.loads((tmp_path / "fixed.mrk.json").read_text(encoding="utf-8"))["markups"][0]["coordinateSystem"] == system
    out = tmp_path / "out"
    assert main(["points", str(result), "--fixed-points", str(tmp_path / "fixed.mrk.json"),
                 "--moving-points", str(tmp_path / "moving.mrk.json"), "-o", str(out)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "TRE fixed -> moving (forward)" in printed
    ras, names = read_markups(out / "fixed_points_in_moving.mrk.json")
    assert names == labels
    assert np.abs(ras * FLIP - itk_map(fixed_lps, forward)).max() < 1e-4
    ras, names = read_markups(out / "moving_points_in_fixed.mrk.json")
    moving_in_fixed = itk_map(moving_lps[order], backward)
    assert np.abs(ras * FLIP - moving_in_fixed).max() < 1e-4
    assert json.loads((out / "fixed_points_in_moving.mrk.json").read_text(encoding="utf-8"))["markups"][0]["coordinateSystem"] == system
    tre = json.loads((out / "tre.json").read_text(encoding="utf-8"))
    forward_errors = np.linalg.norm(offsets, axis=1)  # |p + f(p) - q| = |offset|
    assert tre["fixed_to_moving"]["mean_mm"] == pytest.approx(forward_errors.mean(), abs=1e-5)
    assert tre["fixed_to_moving"]["max_mm"] == pytest.approx(2.0, abs=1e-5)
    assert tre["fixed_to_moving"]["median_mm"] == pytest.approx(np.median(forward_errors), abs=1e-5)
    backward_errors = np.linalg.norm(itk_map(moving_lps, backward) - fixed_lps, axis=1)
    assert tre["moving_to_fixed"]["mean_mm"] == pytest.approx(backward_errors.mean(), abs=1e-5)
    assert tre["before"]["mean_mm"] == pytest.approx(np.linalg.norm(moving_lps - fixed_lps, axis=1).mean(), abs=1e-5)
    assert tre["pairs"] == 12


def test_csv_in_lps_and_ras(result, tmp_path, capsys):
    """The same points as an LPS CSV and as a RAS CSV land on the same physical points; each
    output keeps its input's system and labels."""
    forward = field(result, "forward")
    points = inside_points(forward, 5, seed=7)
    for system, values in (("LPS", points), ("RAS", points * FLIP)):
        rows = "label,x,y,z\n" + "".join(f"p{i},{x},{y},{z}\n" for i, (x, y, z) in enumerate(values))
        (tmp_path / f"{system}.csv").write_text(rows)
        out = tmp_path / system
        assert main(["points", str(result), "--fixed-points", str(tmp_path / f"{system}.csv"), "-o", str(out),
                     "--coordinates", system]) == 0
        back = read_points(out / "fixed_points_in_moving.csv", system)
        assert back.names == [f"p{i}" for i in range(5)]
        assert np.abs(back.lps - itk_map(points, forward)).max() < 1e-5
    capsys.readouterr()


def test_bad_point_inputs(result, tmp_path, capsys):
    """A point outside the image, a CSV without x,y,z, a missing file, lists that cannot be paired:
    one line each, exit 2, nothing written."""
    forward = field(result, "forward")
    far = np.asarray(forward.TransformContinuousIndexToPhysicalPoint((-5.0, 3.0, 3.0)))
    (tmp_path / "far.csv").write_text(f"label,x,y,z\nnear,{far[0] + 0},{far[1]},{far[2]}\n")
    (tmp_path / "noxyz.csv").write_text("label,r,a,s\np,1,2,3\n")
    inside = inside_points(forward, 3, seed=9)
    (tmp_path / "three.csv").write_text("x,y,z\n" + "".join(f"{x},{y},{z}\n" for x, y, z in inside))
    (tmp_path / "two.csv").write_text("x,y,z\n" + "".join(f"{x},{y},{z}\n" for x, y, z in inside[:2]))
    cases = [(["--fixed-points", tmp_path / "far.csv"], "'near'"),
             (["--fixed-points", tmp_path / "noxyz.csv"], "x,y,z"),
             (["--moving-points", tmp_path / "missing.mrk.json"], "missing.mrk.json"),
             (["--fixed-points", tmp_path / "three.csv", "--moving-points", tmp_path / "two.csv"], "cannot pair"),
             ([], "--fixed-points")]
    for extra, needle in cases:
        out = tmp_path / "out"
        code = main(["points", str(result), *[str(e) for e in extra], "-o", str(out)])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(err) == 1 and needle in err[0], (extra, err)
        assert not out.exists() or not any(out.iterdir())
    with pytest.raises(InverseRegError, match="outside the fixed image"):
        transform_points(far[None], forward, ["x"], "the fixed image's grid")


@needs_slicer
@pytest.mark.parametrize("system", ["LPS", "RAS"])
def test_slicer_fcsv_files(result, tmp_path, capsys, system):
    """Slicer's older fiducial CSV (written by Slicer's own storage node in LPS or RAS) moves like
    the markups JSON, and Slicer reads the output back, labels (one with a comma) kept."""
    forward = field(result, "forward")
    lps = inside_points(forward, 4, seed=11)
    labels = ["a", "b,c", "d", "e"]
    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(node)
    for point, label in zip(lps * FLIP, labels):
        node.AddControlPoint(*[float(v) for v in point], label)
    storage = slicer.vtkMRMLMarkupsFiducialStorageNode()
    scene.AddNode(storage)
    storage.SetCoordinateSystem(getattr(slicer.vtkMRMLStorageNode, f"CoordinateSystem{system}"))
    storage.SetFileName(str(tmp_path / "fixed.fcsv"))
    assert storage.WriteData(node) == 1
    assert f"CoordinateSystem = {system}" in (tmp_path / "fixed.fcsv").read_text(encoding="utf-8")
    out = tmp_path / "out"
    assert main(["points", str(result), "--fixed-points", str(tmp_path / "fixed.fcsv"), "-o", str(out)]) == 0
    capsys.readouterr()
    back = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(back)
    reader = slicer.vtkMRMLMarkupsFiducialStorageNode()
    scene.AddNode(reader)
    reader.SetFileName(str(out / "fixed_points_in_moving.fcsv"))
    assert reader.ReadData(back) == 1 and back.GetNumberOfControlPoints() == 4
    got = np.array([back.GetNthControlPointPosition(i) for i in range(4)])
    assert [back.GetNthControlPointLabel(i) for i in range(4)] == labels
    assert np.abs(got * FLIP - itk_map(lps, forward)).max() < 1e-4
