"""Jacobian determinant images (issue 15, item 3).

Independent judges: analytic deformations (a uniform scaling has det = s³ everywhere; a sinusoid
has a closed-form det), ANTs' ``CreateJacobianDeterminantImage`` (antspyx) on the written field,
and the two directions of a synthetic pair whose fields are known in closed form, which must be
reciprocal at corresponding points: det J_forward(x) · det J_backward(x + forward(x)) = 1.

Tolerances: central differences on a grid of spacing h are exact for linear fields (float32
rounding: 1e-4) and err by about |d''| h² / 6 otherwise: 1e-2 on the sinusoid below (h up to 3 mm,
measured 4e-3); reciprocity on the synthetic pair (3.4 mm grid, ~4 mm deformation) within 3e-2 per
voxel, 5e-3 on average (measured 0.019 and 0.002).
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from InverseRegLib.cli import main
from InverseRegLib.grid import Geometry
from InverseRegLib.jacobian import LOG_FLOOR, jacobian_image
from InverseRegLib.synthetic import SmoothDeformation, default_geometry
from inversereg_testlib import oblique_geometry

K = 2 * np.pi / 50.0
#: voxels at least two away from the grid's faces, where both use central differences
INNER = (slice(2, -2),) * 3


def flipped_oblique() -> Geometry:
    """An oblique anisotropic grid whose first two axes are also flipped (as an RAS NIfTI read by ITK)."""
    g = oblique_geometry((30, 34, 28), (2.0, 2.5, 3.0), degrees=25.0)
    direction = g.direction_matrix @ np.diag([-1.0, -1.0, 1.0])
    return Geometry(g.size, g.spacing, g.origin, tuple(direction.ravel()))


def field_image(displacement: np.ndarray, geometry: Geometry) -> sitk.Image:
    return geometry.apply_to(sitk.GetImageFromArray(displacement.astype(np.float64), isVector=True))


def sinusoid(geometry: Geometry) -> tuple[sitk.Image, np.ndarray]:
    """d(p) = (3 sin(k x), 2 sin(k z), 0): det J = 1 + 3 k cos(k x) exactly."""
    p = geometry.physical_points()
    d = np.zeros_like(p)
    d[..., 0] = 3.0 * np.sin(K * p[..., 0])
    d[..., 1] = 2.0 * np.sin(K * p[..., 2])
    return field_image(d, geometry), 1.0 + 3.0 * K * np.cos(K * p[..., 0])


@pytest.mark.parametrize("scale", [0.8, 1.25])
def test_uniform_scaling_has_det_s_cubed(scale):
    """d(p) = (s - 1)(p - c) maps p to c + s (p - c): det J = s³ at every voxel, on a flipped
    oblique grid; the log image is 3 ln s."""
    geometry = flipped_oblique()
    points = geometry.physical_points()
    field = field_image((scale - 1.0) * (points - geometry.center()), geometry)
    det = jacobian_image(field)
    assert det.GetSize() == field.GetSize() and np.allclose(det.GetDirection(), field.GetDirection())
    assert np.abs(sitk.GetArrayFromImage(det) - scale**3).max() < 1e-4
    assert np.abs(sitk.GetArrayFromImage(jacobian_image(field, log=True)) - 3 * np.log(scale)).max() < 1e-4


def test_sinusoid_matches_closed_form_where_simpleitk_does_not():
    """On a flipped oblique grid ours follows the closed form; SimpleITK's filter, which ignores
    direction cosines, is off by far more (the pitfall in the peers notes)."""
    field, analytic = sinusoid(flipped_oblique())
    ours = sitk.GetArrayFromImage(jacobian_image(field))
    assert np.abs(ours - analytic)[INNER].max() < 1e-2  # measured 4e-3 (central differences, h <= 3 mm)
    assert np.abs(ours - analytic).max() < 0.1  # one-sided differences on the faces
    theirs = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))
    assert np.abs(theirs - analytic)[INNER].max() > 0.3


def test_agrees_with_ants_create_jacobian_determinant_image(tmp_path):
    """ANTs reads the written field file and computes its own determinant on the same grid."""
    ants = pytest.importorskip("ants")
    geometry = flipped_oblique()
    field, analytic = sinusoid(geometry)
    path = tmp_path / "field.nii.gz"
    sitk.WriteImage(field, str(path))
    domain = ants.from_numpy(np.zeros(geometry.size, dtype=np.float32), origin=list(geometry.origin),
                             spacing=list(geometry.spacing), direction=geometry.direction_matrix)
    theirs = ants.create_jacobian_determinant_image(domain, str(path), do_log=False).numpy().transpose(2, 1, 0)
    assert np.abs(theirs - analytic)[INNER].max() < 1e-3  # ANTs itself is right here (measured 6e-5)
    ours = sitk.GetArrayFromImage(jacobian_image(sitk.ReadImage(str(path))))
    assert np.abs(ours - theirs)[INNER].max() < 1e-2


def test_forward_and_backward_determinants_are_reciprocal():
    """The synthetic pair's true maps: backward q -> H(q) = q + h(q) on the moving grid (closed
    form), forward its inverse G on the fixed grid. det J_backward is sampled at x + forward(x) by
    SimpleITK resampling the backward determinant image through the forward field."""
    rng = np.random.default_rng(4)
    geometry = default_geometry((40, 44, 40), (3.4, 3.4, 3.4))
    deformation = SmoothDeformation(rng, 6.0, 50.0)
    points = geometry.physical_points()
    forward = field_image(deformation.inverse(points, iterations=30) - points, geometry)
    backward = field_image(deformation.h(points), geometry)
    det_forward = jacobian_image(forward)
    det_backward = jacobian_image(backward)
    at_mapped = sitk.Resample(det_backward, det_forward, sitk.DisplacementFieldTransform(sitk.Image(forward)),
                              sitk.sitkLinear, np.nan, sitk.sitkFloat32)
    product = sitk.GetArrayFromImage(det_forward) * sitk.GetArrayFromImage(at_mapped)
    # the brain region of the grid, one voxel off its faces (one-sided differences there)
    inner = np.zeros(product.shape, dtype=bool)
    inner[2:-2, 2:-2, 2:-2] = True
    inner &= np.isfinite(product)
    spread = np.abs(sitk.GetArrayFromImage(det_forward)[inner] - 1.0).max()
    assert spread > 0.1  # a real deformation: local volume changes of more than 10 % (measured 13 %)
    error = np.abs(product[inner] - 1.0)
    assert error.max() < 3e-2 and error.mean() < 5e-3, (error.max(), error.mean())


def reciprocity(outdir) -> np.ndarray:
    """|det J_forward(x) · det J_backward(x + forward(x)) - 1| over the fixed grid (inner voxels)
    of a written registration, the backward determinant sampled by SimpleITK through forward."""
    read = lambda name: sitk.ReadImage(str(outdir / name))  # noqa: E731
    forward = sitk.Cast(read("forward.nii.gz"), sitk.sitkVectorFloat64)
    det_forward = read("jacobian_forward.nii.gz")
    at_mapped = sitk.Resample(read("jacobian_backward.nii.gz"), det_forward, sitk.DisplacementFieldTransform(forward),
                              sitk.sitkLinear, np.nan, sitk.sitkFloat32)
    product = sitk.GetArrayFromImage(det_forward) * sitk.GetArrayFromImage(at_mapped)
    product = product[INNER]
    return np.abs(product[np.isfinite(product)] - 1.0)


def test_register_writes_both_jacobians(tmp_path, capsys, small_pair, model_file):
    """``--jacobian`` writes det J of each written field on its grid (the same as ``inversereg
    jacobian`` on the field file), reciprocal at corresponding points as above; ``--jacobian log``
    its log, with folding floored."""
    fixed, moving, _, _, _ = small_pair
    folder = tmp_path / "in"
    folder.mkdir()
    sitk.WriteImage(fixed, str(folder / "fixed.nii.gz"))
    sitk.WriteImage(moving, str(folder / "moving.nii.gz"))
    common = [str(folder / "fixed.nii.gz"), str(folder / "moving.nii.gz"), "--model", str(model_file),
              "--device", "cpu", "--no-affine", "--passes", "1", "--progress", "none"]
    assert main(["register", *common, "-o", str(tmp_path / "plain"), "--jacobian"]) == 0
    assert main(["register", *common, "-o", str(tmp_path / "log"), "--jacobian", "log"]) == 0
    product = reciprocity(tmp_path / "plain")
    # the default preset's pair exp(v), exp(-v), resampled from the 5 mm model grid: measured
    # max 0.063, mean 0.0033 (the accuracy issue's exact-inverse step should only lower these)
    # the sharper default fields (third round) raised these from 0.13 / 0.005 to 0.24 / 0.0096
    assert product.max() < 0.3 and product.mean() < 2e-2, (product.max(), product.mean())
    for name, grid in (("forward", fixed), ("backward", moving)):
        plain = sitk.ReadImage(str(tmp_path / "plain" / f"jacobian_{name}.nii.gz"))
        assert plain.GetSize() == grid.GetSize() and np.allclose(plain.GetOrigin(), grid.GetOrigin(), atol=1e-4)
        values = sitk.GetArrayFromImage(plain)
        assert values.std() > 1e-3  # the untrained test network's fields are not trivial
        logged = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "log" / f"jacobian_{name}.nii.gz")))
        assert np.allclose(logged, np.log(np.maximum(values, LOG_FLOOR)), atol=1e-5)
        standalone = tmp_path / f"standalone_{name}.nii.gz"
        assert main(["jacobian", str(tmp_path / "plain" / f"{name}.nii.gz"), "-o", str(standalone)]) == 0
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(standalone))), values)
    capsys.readouterr()
    code = main(["jacobian", str(folder / "missing.nii.gz"), "-o", str(tmp_path / "x.nii.gz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "missing.nii.gz" in err[0]
