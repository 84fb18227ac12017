"""The transform-file contract, judged by SimpleITK on pairs whose fixed and moving images lie on
different grids (size, spacing, direction and origin all differ), so each file can only be right
one way round.

The true transform is built here with SimpleITK, independently of the library:

- translation case: a network whose only output is a constant (the heads' bias) moves every
  point by a known vector, so the true forward map is ``p -> p + t``; the moving image is made
  by ``sitk.Resample(world, moving_grid, TranslationTransform(-t))``, i.e. moving(q) = world(q - t);
- rigid case: an identity network after ``affine="rigid"`` pre-alignment, the moving image made
  from a known ``Euler3DTransform``; the aligner must recover it (to well under a voxel).

What is judged (the README's contract table): forward.nii.gz lies on the fixed grid and, applied
as ``sitk.Resample(moving, fixed, DisplacementFieldTransform(forward))``, gives what the true
transform gives; backward.nii.gz the same on the moving grid the other way; the warped images are
SimpleITK's resampling through the written fields. Each judge is also shown the outputs with
forward/backward or the two warped images swapped, and must reject them. The files are judged as
written by the Python API (``register`` + ``write_result``) and by the real command line
(``python -m InverseRegLib register`` in a subprocess).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from InverseRegLib.outputs import write_result
from InverseRegLib.pipeline import register
from InverseRegLib.polish import NETWORK_ONLY
from inversereg_testlib import rotation_matrix, small_model, write_model_file

#: the network's constant output per pass, in voxels of the small test model grid (x, y, z):
#: exactly representable in bfloat16, so the result does not depend on --precision
VOXELS = (0.75, -0.5, 0.625)
#: the same in LPS mm, worked out by hand: model grid direction diag(-1, -1, 1), spacing 5 mm
T_PER_PASS = np.array([-3.75, 2.5, 3.125])
#: README: "in two quick passes by default"; each pass adds the constant once more
T_TRUE = 2 * T_PER_PASS


def grid(size, spacing, axis, degrees, center) -> sitk.Image:
    """A reference image on an oblique grid centred at ``center`` (LPS mm), built with SimpleITK
    calls only."""
    direction = rotation_matrix(axis, degrees)
    image = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection(tuple(direction.ravel()))
    half = direction @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2.0)
    image.SetOrigin(tuple(np.asarray(center, dtype=float) - half))
    return image


#: the fixed and the moving grid: every geometric property differs
FIXED_GRID = dict(size=(44, 50, 40), spacing=(3.0, 3.6, 4.0), axis=(1.0, 2.0, 0.5), degrees=12.0,
                  center=(2.0, -3.0, 4.0))
MOVING_GRID = dict(size=(50, 44, 48), spacing=(3.8, 3.3, 3.4), axis=(-0.5, 0.3, 1.0), degrees=-15.0,
                   center=(-4.0, 5.0, 1.0))


def identity_network_model():
    """An untrained default-preset network with both heads exactly zero: identity fields."""
    model = small_model("default")
    with torch.no_grad():
        for decoder in (model.network.decoder_st, model.network.decoder_ts):
            decoder.head.weight.zero_()
            decoder.head.bias.zero_()
    return model


def translation_network_model():
    """Heads zeroed, biases set: φST is the constant ``VOXELS``, φTS its negative."""
    model = small_model("default")
    with torch.no_grad():
        for decoder, sign in ((model.network.decoder_st, 1.0), (model.network.decoder_ts, -1.0)):
            decoder.head.weight.zero_()
            decoder.head.bias.copy_(sign * torch.tensor(VOXELS, dtype=torch.float32))
    return model


def resample(image, reference, transform, nearest=False) -> np.ndarray:
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return sitk.GetArrayFromImage(sitk.Resample(image, reference, transform, interpolator, 0.0, sitk.sitkFloat32))


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6))


def foreground_points(image: sitk.Image, fraction: float = 0.3, count: int = 400) -> np.ndarray:
    """Up to ``count`` physical points (LPS mm) where ``image`` is brighter than ``fraction`` of
    its maximum, found with SimpleITK's index-to-point mapping."""
    array = sitk.GetArrayViewFromImage(image)
    zyx = np.argwhere(array > fraction * array.max())
    pick = np.random.default_rng(0).choice(len(zyx), size=min(count, len(zyx)), replace=False)
    return np.array([image.TransformIndexToPhysicalPoint(tuple(int(v) for v in idx[::-1])) for idx in zyx[pick]])


def judge(folder: Path, fixed: sitk.Image, moving: sitk.Image, true_forward: sitk.Transform,
          true_backward: sitk.Transform, point_tolerance_mm: float) -> None:
    """Raise AssertionError unless the files in ``folder`` honour the contract for a pair whose
    true fixed -> moving map is ``true_forward`` (and moving -> fixed ``true_backward``)."""
    read = lambda name: sitk.ReadImage(str(folder / name))  # noqa: E731
    forward, backward = read("forward.nii.gz"), read("backward.nii.gz")
    moving_warped, fixed_warped = read("moving_warped.nii.gz"), read("fixed_warped.nii.gz")
    assert same_grid(forward, fixed), "forward.nii.gz is not on the fixed image's grid"
    assert same_grid(backward, moving), "backward.nii.gz is not on the moving image's grid"
    assert same_grid(moving_warped, fixed), "moving_warped.nii.gz is not on the fixed image's grid"
    assert same_grid(fixed_warped, moving), "fixed_warped.nii.gz is not on the moving image's grid"
    for field, image, truth, name in ((forward, fixed, true_forward, "forward"),
                                      (backward, moving, true_backward, "backward")):
        transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
        points = foreground_points(image)
        error = np.array([np.linalg.norm(np.subtract(transform.TransformPoint(tuple(p)), truth.TransformPoint(tuple(p))))
                          for p in points])
        assert error.mean() < point_tolerance_mm and error.max() < 4 * point_tolerance_mm, \
            f"{name} field: mean point error {error.mean():.3f} mm, max {error.max():.3f} mm"
    # the registered images: what SimpleITK makes of the written fields, and of the truth
    for warped, image, reference, field, truth, name in (
            (moving_warped, moving, fixed, forward, true_forward, "moving_warped"),
            (fixed_warped, fixed, moving, backward, true_backward, "fixed_warped")):
        by_field = resample(image, reference, sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64)))
        by_truth = resample(image, reference, truth)
        scale = float(sitk.GetArrayViewFromImage(image).max())
        assert np.abs(sitk.GetArrayFromImage(warped) - by_field).max() < 1e-3 * scale, \
            f"{name}.nii.gz is not SimpleITK's resampling through the written field"
        assert np.abs(by_field - by_truth).mean() < 0.01 * scale, f"{name}: the field does not do what the truth does"
    # and the point of it all: the moving image, registered, looks like the fixed one
    registered = resample(moving, fixed, sitk.DisplacementFieldTransform(sitk.Cast(forward, sitk.sitkVectorFloat64)))
    target = sitk.GetArrayFromImage(fixed)
    inside = registered > 0
    assert np.corrcoef(registered[inside], target[inside])[0, 1] > 0.97


def swapped_copies(folder: Path, root: Path) -> dict[str, Path]:
    """Copies of an output folder with forward/backward, and with the two warped images,
    exchanged: the mistakes the contract tests exist to catch."""
    out = {}
    for label, (a, b) in {"fields": ("forward.nii.gz", "backward.nii.gz"),
                          "warped": ("moving_warped.nii.gz", "fixed_warped.nii.gz")}.items():
        target = root / f"swapped_{label}"
        shutil.copytree(folder, target)
        (target / a).unlink()
        (target / b).unlink()
        shutil.copy(folder / a, target / b)
        shutil.copy(folder / b, target / a)
        out[label] = target
    return out


@pytest.fixture(scope="module")
def world(small_pair) -> sitk.Image:
    """The phantom scene both images are cut from (48 x 56 x 48 voxels of 3.4 mm)."""
    return small_pair[0]


@pytest.fixture(scope="module")
def translation_case(world, tmp_path_factory):
    """Fixed and moving images of the world on two different grids, the moving one shifted by
    ``T_TRUE``, written as files (NIfTI and NRRD); the constant-output model written as a file."""
    folder = tmp_path_factory.mktemp("contract_translation")
    fixed_ref, moving_ref = grid(**FIXED_GRID), grid(**MOVING_GRID)
    fixed = sitk.Resample(world, fixed_ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    # moving(q) = world(q - t): the point p of the fixed image is found at p + t in the moving one
    moving = sitk.Resample(world, moving_ref, sitk.TranslationTransform(3, tuple(-T_TRUE)), sitk.sitkLinear, 0.0,
                           sitk.sitkFloat32)
    paths = {"fixed": folder / "fixed.nii.gz", "moving": folder / "moving.nrrd", "model": folder / "shift.pt"}
    sitk.WriteImage(fixed, str(paths["fixed"]))
    sitk.WriteImage(moving, str(paths["moving"]))
    write_model_file(paths["model"], translation_network_model())
    truth = (sitk.TranslationTransform(3, tuple(T_TRUE)), sitk.TranslationTransform(3, tuple(-T_TRUE)))
    return {"folder": folder, "paths": paths, "fixed": sitk.ReadImage(str(paths["fixed"])),
            "moving": sitk.ReadImage(str(paths["moving"])), "truth": truth}


def test_the_test_pair_is_truly_asymmetric(translation_case):
    fixed, moving = translation_case["fixed"], translation_case["moving"]
    assert fixed.GetSize() != moving.GetSize()
    assert not np.allclose(fixed.GetSpacing(), moving.GetSpacing())
    assert not np.allclose(fixed.GetDirection(), moving.GetDirection(), atol=0.05)
    assert not np.allclose(fixed.GetOrigin(), moving.GetOrigin(), atol=5.0)
    assert np.linalg.norm(T_TRUE) > 10.0  # a swap moves points by twice that


def test_python_api_files_honour_the_contract(translation_case, tmp_path):
    case = translation_case
    result = register(sitk.ReadImage(str(case["paths"]["fixed"])), sitk.ReadImage(str(case["paths"]["moving"])),
                      str(case["paths"]["model"]), device="cpu", affine=None, polish_settings=NETWORK_ONLY)
    write_result(result, tmp_path / "out", inputs=[case["paths"]["fixed"], case["paths"]["moving"]])
    judge(tmp_path / "out", case["fixed"], case["moving"], *case["truth"], point_tolerance_mm=1e-3)
    for label, folder in swapped_copies(tmp_path / "out", tmp_path).items():
        with pytest.raises(AssertionError):
            judge(folder, case["fixed"], case["moving"], *case["truth"], point_tolerance_mm=1e-3)


def test_command_line_files_honour_the_contract(translation_case, tmp_path):
    """The real program in a subprocess, default progress (a tqdm bar on stderr), default passes."""
    case = translation_case
    outdir = tmp_path / "cli_out"
    args = [sys.executable, "-m", "InverseRegLib", "register", str(case["paths"]["fixed"]),
            str(case["paths"]["moving"]), "-o", str(outdir), "--model", str(case["paths"]["model"]),
            "--no-affine", "--device", "cpu", "--polish", "0"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    judge(outdir, case["fixed"], case["moving"], *case["truth"], point_tolerance_mm=1e-3)
    for label, folder in swapped_copies(outdir, tmp_path).items():
        with pytest.raises(AssertionError):
            judge(folder, case["fixed"], case["moving"], *case["truth"], point_tolerance_mm=1e-3)


def test_rigid_prealignment_files_honour_the_contract(world, tmp_path):
    """A spatially varying truth: a known rotation (about 9 degrees) plus translation between two
    different grids, recovered by ``affine="rigid"`` ahead of an identity network; the aligner's
    accuracy (test_affine.py: mean point error < 0.5 mm) sets the tolerance."""
    fixed_ref, moving_ref = grid(**FIXED_GRID), grid(**MOVING_GRID)
    fixed = sitk.Resample(world, fixed_ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    center = (1.0, -2.0, 3.0)
    true_forward = sitk.Euler3DTransform(center, 0.10, -0.06, 0.12, (6.0, -4.0, 5.0))  # fixed -> moving
    true_backward = true_forward.GetInverse()
    # moving(q) = world(G^-1(q)), so that moving(G(p)) = world(p) = fixed(p)
    moving = sitk.Resample(world, moving_ref, true_backward, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    result = register(fixed, moving, identity_network_model(), device="cpu", affine="rigid", polish_settings=NETWORK_ONLY)
    outdir = tmp_path / "out"
    write_result(result, outdir, inputs=[])
    judge(outdir, fixed, moving, true_forward, true_backward, point_tolerance_mm=0.5)
    for label, folder in swapped_copies(outdir, tmp_path).items():
        with pytest.raises(AssertionError):
            judge(folder, fixed, moving, true_forward, true_backward, point_tolerance_mm=0.5)
    # affine.tfm is the fixed -> moving part, read by SimpleITK, rigid as asked
    written = sitk.ReadTransform(str(outdir / "affine.tfm"))
    points = foreground_points(fixed)
    error = [np.linalg.norm(np.subtract(written.TransformPoint(tuple(p)), true_forward.TransformPoint(tuple(p))))
             for p in points]
    assert np.mean(error) < 0.5
    # the linear part, read off SimpleITK's own mapping of three unit steps
    origin = np.asarray(written.TransformPoint((0.0, 0.0, 0.0)))
    matrix = np.stack([np.asarray(written.TransformPoint(tuple(e))) - origin for e in np.eye(3)], axis=1)
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(3), atol=1e-6)
