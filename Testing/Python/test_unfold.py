"""Fold repair (InverseRegLib/unfold.py), judged by ITK's own Jacobian-determinant filter."""
import numpy as np
import torch
import SimpleITK as sitk

from InverseRegLib.fields import field_to_image
from InverseRegLib.grid import Geometry
import pytest

from InverseRegLib import unfold
from InverseRegLib.fullres import gaussian_smooth
from InverseRegLib.unfold import repair_folds

GRID = Geometry((28, 26, 24), (1.2, 1.0, 0.9), (-10.0, 4.0, 2.5), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))


def itk_determinant(field: np.ndarray) -> np.ndarray:
    """det(I + ∂d/∂p) by ITK (central differences in physical units), (z, y, x)."""
    return sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field_to_image(field, GRID)))


def folded_field() -> np.ndarray:
    """A smooth deformation plus two tight bumps, each folding a few voxels."""
    p = GRID.physical_points()
    field = 1.5 * np.stack([np.sin(p[..., 1] / 7.0), np.cos(p[..., 2] / 6.0), np.sin(p[..., 0] / 8.0)], -1)
    for centre, amplitude in (((2.0, 16.0, 12.0), 4.0), ((14.0, 10.0, 8.0), -3.5)):
        r2 = ((p - np.asarray(centre)) ** 2).sum(-1)
        field[..., 0] += amplitude * np.exp(-r2 / (2 * 1.3 ** 2))
    return field.astype(np.float32)


def test_folds_are_removed_locally_and_the_rest_is_untouched():
    field = folded_field()
    original = field.copy()
    folded = itk_determinant(field) <= 0
    assert folded.sum() >= 2
    repaired, report = repair_folds(field, GRID)
    assert np.array_equal(field, original)  # the caller's array is not written
    assert report.folded_before == int(folded.sum()) and report.folded_after == 0 and report.rounds >= 1
    assert (itk_determinant(repaired) > 0).all()
    changed = np.any(repaired != field, axis=-1)
    assert report.changed >= changed.sum() > 0
    # only near the folds: nothing changed farther than the margin plus the rounds' growth
    far = np.ones_like(folded)
    z, y, x = np.nonzero(folded)
    for c in zip(z, y, x):
        zz, yy, xx = np.ogrid[:far.shape[0], :far.shape[1], :far.shape[2]]
        far &= (np.abs(zz - c[0]) > 8) | (np.abs(yy - c[1]) > 8) | (np.abs(xx - c[2]) > 8)
    assert far.any() and not changed[far].any()


def test_a_field_without_folds_comes_back_unchanged():
    p = GRID.physical_points()
    field = (0.8 * np.stack([np.sin(p[..., 1] / 9.0), np.cos(p[..., 2] / 8.0), np.sin(p[..., 0] / 7.0)], -1)).astype(np.float32)
    assert (itk_determinant(field) > 0).all()
    repaired, report = repair_folds(field, GRID)
    assert report.folded_before == 0 and report.changed == 0 and report.rounds == 0
    assert np.array_equal(repaired, field)


def test_the_gentle_pass_changes_fewer_voxels_and_the_determinant_is_itks():
    """The first pass (σ 0.7, one voxel around each fold) removes these folds while changing fewer
    voxels than the wide pass alone; the determinant handed back is the repaired field's (ITK's, inside the faces),
    and one passed in is used instead of recomputing it (a wrong one changes the outcome)."""
    field = folded_field()
    repaired, report = repair_folds(field, GRID)
    wide, wide_report = repair_folds(field, GRID, passes=((1.0, 2),))
    assert report.folded_after == 0 and wide_report.folded_after == 0
    assert (itk_determinant(repaired) > 0).all() and (itk_determinant(wide) > 0).all()
    assert 0 < report.changed < wide_report.changed
    # ITK's one-sided differences at the faces differ from numpy's; the inside must agree
    inside = (slice(1, -1),) * 3
    np.testing.assert_allclose(report.determinant[inside], itk_determinant(repaired)[inside], rtol=1e-4, atol=1e-4)
    # a determinant that says nothing folds: the field comes back untouched
    untouched, said = repair_folds(field, GRID, det=np.ones(field.shape[:3], dtype=np.float32))
    assert said.folded_before == 0 and np.array_equal(untouched, field)


@pytest.mark.parametrize("block", [4, 16, 64])
def test_one_round_takes_the_whole_fields_smoothed_values_whatever_the_boxes(monkeypatch, block):
    """The folds are smoothed in one box per cell of folding voxels (a few voxels per box on a
    brain, not a box around all of them): after one round the changed voxels hold exactly what
    smoothing the whole field gives there, for cells small enough to split the two folds apart
    and large enough to hold both."""
    monkeypatch.setattr(unfold, "_BLOCK", block)
    field = folded_field()
    repaired, report = repair_folds(field, GRID, rounds=1, passes=((1.0, 2),))
    changed = np.any(repaired != field, axis=-1)
    assert report.rounds == 1 and changed.sum() == report.changed > 0
    whole = gaussian_smooth(torch.from_numpy(field).permute(3, 0, 1, 2)[None].contiguous(), 1.0)
    whole = whole[0].permute(1, 2, 3, 0).numpy()
    np.testing.assert_allclose(repaired[changed], whole[changed], atol=1e-5)
    if block == 4:  # the two folds fall into cells of their own
        bad = itk_determinant(field) <= 0
        assert len(np.unique(np.argwhere(bad) // block, axis=0)) >= 2
