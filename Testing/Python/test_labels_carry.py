"""Carrying label maps through the fields (issue 15, item 1).

Oracles: SimpleITK resampling each label's indicator linearly through the field file (argmax over
labels) and ITK's ``sitkLabelLinear`` interpolator for the label-preserving mode, SimpleITK's nearest-neighbour resampling for ``nearest``,
and Dice recomputed here with plain numpy from the *written* files for the report's numbers.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from InverseRegLib.cli import main
from InverseRegLib.errors import InverseRegError
from InverseRegLib.labels import check_label_map, warp_labels
from InverseRegLib.pipeline import register
from inversereg_testlib import oblique_geometry, small_model

#: the moving image's own grid in the end-to-end tests: oblique and anisotropic, not the fixed grid
MOVING_GRID = oblique_geometry((44, 50, 42), (3.6, 3.3, 3.9), axis=(1.0, -0.5, 2.0), degrees=10.0,
                               center=(1.0, -2.0, 0.5))


def onto(image: sitk.Image, geometry, labels: bool = False) -> sitk.Image:
    return sitk.Resample(image, geometry.reference_image(), sitk.Transform(),
                         sitk.sitkNearestNeighbor if labels else sitk.sitkLinear, 0.0,
                         sitk.sitkInt32 if labels else sitk.sitkFloat32)


def smooth_field(reference: sitk.Image, amplitude: float = 4.0, seed: int = 3) -> sitk.Image:
    """A smooth random displacement field (LPS mm) on ``reference``'s grid."""
    rng = np.random.default_rng(seed)
    shape = sitk.GetArrayViewFromImage(reference).shape
    noise = rng.standard_normal((*shape, 3))
    field = np.stack([sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(
        sitk.GetImageFromArray(noise[..., c]), 3.0)) for c in range(3)], axis=-1)
    field *= amplitude / np.abs(field).max()
    image = sitk.GetImageFromArray(field.astype(np.float64), isVector=True)
    image.CopyInformation(reference)
    return image


def numpy_dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    x, y = a == label, b == label
    return 2.0 * np.logical_and(x, y).sum() / (x.sum() + y.sum())


def test_linear_mode_is_argmax_of_interpolated_indicators(small_pair):
    """The label-preserving mode equals SimpleITK resampling every label's 0/1 indicator linearly
    through the same field and taking the best label, and ITK's ``sitkLabelLinear`` interpolator,
    on a label grid that is not the output grid; no label appears that the input lacks;
    ``nearest`` equals SimpleITK's nearest neighbour."""
    fixed, _, _, moving_seg, _ = small_pair
    labels = onto(moving_seg, MOVING_GRID, labels=True)
    field = smooth_field(fixed)
    carried = warp_labels(labels, field)
    assert carried.GetPixelID() == labels.GetPixelID() and carried.GetSize() == fixed.GetSize()
    ours = sitk.GetArrayFromImage(carried)
    values = np.unique(sitk.GetArrayViewFromImage(labels))
    transform = sitk.DisplacementFieldTransform(sitk.Image(field))
    scores = np.stack([sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(labels == int(v), sitk.sitkFloat32), fixed,
                                                            transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
                       for v in values])
    expected = values[np.argmax(scores, axis=0)]
    ordered = np.sort(scores, axis=0)
    outside = ordered[-1] == 0  # beyond the label grid every indicator is 0: label 0
    assert outside.any() and np.all(ours[outside] == 0)
    clear = ordered[-1] - ordered[-2] > 1e-4  # ties may go either way
    assert clear[~outside].mean() > 0.99
    assert np.array_equal(ours[clear], expected[clear])
    assert set(np.unique(ours)) <= set(values)
    # ITK's own label-preserving linear interpolator (LabelImageGenericInterpolateImageFunction)
    itk_label_linear = sitk.Resample(labels, fixed, transform, sitk.sitkLabelLinear, 0, labels.GetPixelID())
    assert np.mean(sitk.GetArrayFromImage(itk_label_linear) == ours) > 0.9999
    nearest = sitk.Resample(labels, fixed, transform, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    assert np.array_equal(sitk.GetArrayFromImage(warp_labels(labels, field, method="nearest")),
                          sitk.GetArrayFromImage(nearest))


def test_linear_mode_leaves_no_holes_between_touching_labels():
    """Two labels that touch (a ball inside a shell) stay touching after a smooth warp: no
    background voxel appears with labelled voxels on all six sides, and no third value appears,
    where linear interpolation of the label values themselves makes a 1.5 -> 2 rim or 0s."""
    geometry = oblique_geometry((40, 40, 40), (2.0, 2.0, 2.0), degrees=15.0, center=(0.0, 0.0, 0.0))
    radius = np.linalg.norm(geometry.physical_points(), axis=-1)
    labels = np.where(radius < 14.0, 5, np.where(radius < 26.0, 9, 0)).astype(np.int32)
    image = geometry.apply_to(sitk.GetImageFromArray(labels))
    carried = sitk.GetArrayFromImage(warp_labels(image, smooth_field(image, 3.0, seed=1)))
    assert set(np.unique(carried)) == {0, 5, 9}
    inner = carried[1:-1, 1:-1, 1:-1]
    neighbours = [carried[2:, 1:-1, 1:-1], carried[:-2, 1:-1, 1:-1], carried[1:-1, 2:, 1:-1],
                  carried[1:-1, :-2, 1:-1], carried[1:-1, 1:-1, 2:], carried[1:-1, 1:-1, :-2]]
    holes = (inner == 0) & np.all([n != 0 for n in neighbours], axis=0)
    assert holes.sum() == 0
    # every voxel of the warped inner ball touches only itself or the shell, never background
    ball = inner == 5
    assert not np.any(ball & np.any([n == 0 for n in neighbours], axis=0))


def test_label_maps_must_fit_their_image(small_pair):
    fixed, _, fixed_seg, _, _ = small_pair
    shifted = sitk.Image(fixed_seg)
    shifted.SetOrigin(tuple(np.add(fixed_seg.GetOrigin(), (0.0, 5.0, 0.0))))
    with pytest.raises(InverseRegError, match="not on the grid of the fixed image .*origin"):
        check_label_map(shifted, fixed, "fixed label map", "the fixed image")
    with pytest.raises(InverseRegError, match="empty: every voxel is 0"):
        check_label_map(fixed_seg * 0, fixed, "fixed label map")
    assert check_label_map(fixed_seg, fixed).GetPixelID() == sitk.sitkInt32


@pytest.fixture(scope="module")
def files(tmp_path_factory, small_pair, model_file):
    """The pair on two different grids, written as files, plus a label map on a third grid and
    an empty one."""
    folder = tmp_path_factory.mktemp("carry")
    fixed, moving, fixed_seg, moving_seg, _ = small_pair
    paths = {"model": model_file}
    third = oblique_geometry((40, 44, 40), (3.8, 3.8, 3.8), degrees=25.0)
    for name, image in (("fixed.nii.gz", fixed), ("fixed_seg.nii.gz", fixed_seg),
                        ("moving.nii.gz", onto(moving, MOVING_GRID)),
                        ("moving_seg.nii.gz", onto(moving_seg, MOVING_GRID, labels=True)),
                        ("third_seg.nii.gz", onto(moving_seg, third, labels=True)),
                        ("empty_seg.nii.gz", onto(moving_seg, MOVING_GRID, labels=True) * 0)):
        paths[name] = folder / name
        sitk.WriteImage(image, str(paths[name]))
    return paths


def register_argv(files, outdir, moving_seg="moving_seg.nii.gz", *extra) -> list[str]:
    return ["register", str(files["fixed.nii.gz"]), str(files["moving.nii.gz"]), "-o", str(outdir),
            "--model", str(files["model"]), "--device", "cpu", "--no-affine", "--passes", "1", "--progress", "none",
            "--fixed-seg", str(files["fixed_seg.nii.gz"]), "--moving-seg", str(files[moving_seg]), *extra]


@pytest.mark.parametrize("method", ["linear", "nearest"])
def test_cli_writes_carried_labels_and_the_report_scores_them(files, tmp_path, capsys, method):
    """``--fixed-seg/--moving-seg`` write moving_seg_warped (fixed grid) and fixed_seg_warped
    (moving grid); Dice recomputed from those files against the other scan's own labels equals the
    report's, per label and both ways; the carried maps are what SimpleITK makes of the field
    files and the input label maps (the oracle of the test above for ``linear``)."""
    outdir = tmp_path / method
    assert main(register_argv(files, outdir, "moving_seg.nii.gz", "--label-interpolation", method)) == 0, \
        capsys.readouterr().err
    report = json.loads((outdir / "report.json").read_text(encoding="utf-8"))
    assert report["label_interpolation"] == method
    read = lambda p: sitk.ReadImage(str(p))  # noqa: E731
    moving_carried, fixed_carried = read(outdir / "moving_seg_warped.nii.gz"), read(outdir / "fixed_seg_warped.nii.gz")
    fixed_seg, moving_seg = read(files["fixed_seg.nii.gz"]), read(files["moving_seg.nii.gz"])
    for carried, grid in ((moving_carried, fixed_seg), (fixed_carried, moving_seg)):
        assert carried.GetSize() == grid.GetSize()
        assert np.allclose(carried.GetOrigin(), grid.GetOrigin(), atol=1e-4)
        assert np.allclose(carried.GetDirection(), grid.GetDirection(), atol=1e-5)
    a_fwd, t_fwd = sitk.GetArrayFromImage(moving_carried), sitk.GetArrayFromImage(fixed_seg)
    a_bwd, t_bwd = sitk.GetArrayFromImage(fixed_carried), sitk.GetArrayFromImage(moving_seg)
    assert report["dice_per_label"] and report["dice_per_label_backward"]
    for label, value in report["dice_per_label"].items():
        assert value == pytest.approx(numpy_dice(a_fwd, t_fwd, int(label)), abs=1e-12)
    for label, value in report["dice_per_label_backward"].items():
        assert value == pytest.approx(numpy_dice(a_bwd, t_bwd, int(label)), abs=1e-12)
    if method == "nearest":
        transform = sitk.DisplacementFieldTransform(sitk.Cast(read(outdir / "forward.nii.gz"), sitk.sitkVectorFloat64))
        expected = sitk.Resample(moving_seg, fixed_seg, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
        assert np.mean(sitk.GetArrayFromImage(expected) == a_fwd) > 0.999


@pytest.mark.parametrize("bad, needle", [("third_seg.nii.gz", "is not on the grid of the moving image"),
                                         ("empty_seg.nii.gz", "is empty")])
def test_cli_refuses_bad_label_maps(files, tmp_path, capsys, bad, needle):
    """A label map on a third grid, or an empty one: one line naming the file, exit 2, nothing
    written."""
    outdir = tmp_path / "out"
    code = main(register_argv(files, outdir, bad))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and needle in err[0] and str(files[bad]) in err[0], err
    assert not outdir.exists() or not any(outdir.iterdir())


def test_library_register_refuses_a_label_map_on_another_grid(small_pair):
    fixed, moving, fixed_seg, moving_seg, _ = small_pair
    with pytest.raises(InverseRegError, match="moving label map is not on the grid of the moving image"):
        register(fixed, moving, small_model("default"), "cpu", None, 0, fixed_seg, onto(moving_seg, MOVING_GRID, True))
