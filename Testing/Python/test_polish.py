"""``--quality fast``'s model-grid stage (InverseRegLib.polish): it must raise similarity and not fold.

Judged on the synthetic phantom pair (a known smooth deformation of a few mm): local NCC of the
warped source against the target, the physical Jacobian of the polished field, and, through
``register``, Dice of the label maps carried by the written fields and SimpleITK's own Jacobian
determinant of the written forward field.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from inversereg_testlib import small_model
from InverseRegLib.errors import InverseRegError
from InverseRegLib.fields import jacobian_determinant, physical_points, sample_grid
from InverseRegLib.fullres import FullResSettings
from InverseRegLib.grid import Geometry
from InverseRegLib.intensity import normalize
from InverseRegLib.losses import local_ncc
from InverseRegLib.pipeline import register
from InverseRegLib.polish import FAST_SETTINGS, polish_fields
from InverseRegLib.synthetic import make_pair


@pytest.fixture(scope="module")
def pair():
    return make_pair(size=(48, 56, 48), spacing=(3.0, 3.0, 3.0), seed=5, amplitude=4.0)


def warped(source: np.ndarray, d_st: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """``source`` (D, H, W) on ``geometry`` sampled at p + d_st(p); -> (1, 1, D, H, W)."""
    points = physical_points(geometry) + d_st[0].permute(1, 2, 3, 0)
    volume = torch.from_numpy(source)[None, None]
    return sample_grid(volume, geometry, points, padding_mode="zeros").permute(3, 0, 1, 2)[None]


def test_polish_raises_local_ncc_without_folding(pair):
    """From the identity, the default stage's iterations raise the local NCC of the pair (window
    5) by a clear margin, the polished forward field has det J > 0 everywhere, and the carried
    backward field is closer to the forward one's inverse than the identity is."""
    fixed, moving, _, _ = pair
    geometry = Geometry.of(fixed)
    target = normalize(sitk.GetArrayFromImage(fixed))
    source = normalize(sitk.GetArrayFromImage(moving))
    zero = torch.zeros((1, 3, *geometry.array_shape))
    t = torch.from_numpy(target)[None, None]
    before = float(local_ncc(warped(source, zero, geometry), t, 5))
    d_st, d_ts = polish_fields(target, source, zero, zero, geometry, FAST_SETTINGS)
    after = float(local_ncc(warped(source, d_st, geometry), t, 5))
    assert after > before + 0.02, (before, after)
    assert (jacobian_determinant(d_st[0].permute(1, 2, 3, 0).numpy(), geometry) > 0).all()
    # round trip q -> q + d_ts(q) -> ... + d_st(...): smaller than for the identity backward field
    points = physical_points(geometry)
    mask = torch.from_numpy(target > 0.1)

    def round_trip(back: torch.Tensor) -> float:
        y = points + back[0].permute(1, 2, 3, 0)
        there = y + sample_grid(d_st, geometry, y)
        return float(torch.linalg.norm(there - points, dim=-1)[mask].mean())

    assert round_trip(d_ts) < 0.5 * round_trip(zero)


def test_no_iterations_returns_the_fields_unchanged(pair):
    fixed, moving, _, _ = pair
    geometry = Geometry.of(fixed)
    zero = torch.zeros((1, 3, *geometry.array_shape))
    array = normalize(sitk.GetArrayFromImage(fixed))
    d_st, d_ts = polish_fields(array, array, zero, zero, geometry, FullResSettings(iterations=(0,)))
    assert d_st is zero and d_ts is zero
    with pytest.raises(InverseRegError, match="one level"):
        polish_fields(array, array, zero, zero, geometry, FullResSettings(iterations=(5, 5)))


def test_fast_quality_runs_the_stage_and_it_raises_dice(pair):
    """``register()`` (quality fast, the default) with a near-identity network: the stage runs by
    default, raises Dice of the carried label maps both ways over the same call with it switched
    off, and SimpleITK finds no folding in the written forward field."""
    fixed, moving, fixed_seg, moving_seg = pair
    model = small_model("default")
    off = register(fixed, moving, model, "cpu", None, fixed_seg=fixed_seg, moving_seg=moving_seg,
                   polish_settings=FullResSettings(iterations=(0,)))
    on = register(fixed, moving, model, "cpu", None, fixed_seg=fixed_seg, moving_seg=moving_seg)
    assert off.report["seconds_polish"] == 0 and on.report["seconds_polish"] > 0
    for key in ("dice_mean", "dice_mean_backward"):
        assert on.report[key] > off.report[key] + 0.01, (key, off.report[key], on.report[key])
    determinant = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(on.forward))
    assert determinant.min() > 0
    assert on.report["folding_percent_forward"] == 0 and on.report["folding_percent_backward"] == 0
