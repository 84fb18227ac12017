"""losses.py: local NCC, cycle L1, diffusion, the label Dice term, and how registration_loss weighs them."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from InverseRegLib.losses import (cycle_l1, diffusion, local_ncc, one_hot_labels, registration_loss,
                                  soft_dice_loss)
from InverseRegLib.presets import get_preset
from InverseRegLib.warp import identity_grid

SHAPE = (16, 20, 24)


def texture(seed=0, shape=SHAPE) -> torch.Tensor:
    """A smooth random texture in [0, 1] with contrast in every 9^3 window (local std ~0.2)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, *(s // 3 for s in shape), generator=g)
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def test_local_ncc_of_identical_images_is_one():
    # intensities x10: the eps=1e-5 regulariser of sqrt(var_a var_b + eps) is then negligible
    a = 10.0 * texture()
    assert local_ncc(a, a).item() == pytest.approx(1.0, abs=2e-3)
    assert local_ncc(a, 3.0 * a + 2.0).item() == pytest.approx(1.0, abs=2e-3)  # affine-invariant
    # on [0, 1] images the regulariser costs about 1 % at this contrast (local std ~0.1)
    assert local_ncc(a / 10.0, a / 10.0).item() == pytest.approx(1.0, abs=0.02)


def test_local_ncc_of_inverted_contrast_is_minus_one():
    """Also near the border: windows are cut at the image edge rather than zero-padded (zero
    padding gave +0.22 here: 80 % of this small grid is within 4 voxels of a face)."""
    a = 10.0 * texture()
    assert local_ncc(a, 10.0 - a).item() == pytest.approx(-1.0, abs=2e-3)
    assert local_ncc(a / 10.0, 1.0 - a / 10.0).item() == pytest.approx(-1.0, abs=0.02)


def test_local_ncc_of_independent_noise_is_about_zero():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(1, 1, *SHAPE, generator=g), torch.rand(1, 1, *SHAPE, generator=g)
    assert abs(local_ncc(a, b).item()) < 0.03


def test_local_ncc_between_one_and_minus_one_for_related_images():
    a, b = texture(0), texture(1)
    value = local_ncc(a, 0.5 * a + 0.5 * b).item()
    assert 0.3 < value < 0.99


def test_local_ncc_checks_its_arguments():
    a = texture()
    with pytest.raises(ValueError, match="differ in shape"):
        local_ncc(a, a[:, :, 1:])
    with pytest.raises(ValueError, match="odd"):
        local_ncc(a, a, window=4)


def test_cycle_l1_is_the_mean_absolute_difference():
    a = texture()
    assert cycle_l1(a, a).item() == 0.0
    assert cycle_l1(a, a + 0.25).item() == pytest.approx(0.25, abs=1e-6)


def test_diffusion_is_zero_for_constant_fields_and_hand_computed_for_a_ramp():
    constant = torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1, 1).expand(1, 3, *SHAPE)
    assert diffusion(constant).item() == 0.0
    # u_x = a * x (x along W): only the W differences of channel 0 are non-zero (= a), so
    # mean(dx^2) over the 3 channels is a^2/3 and the result (mean of the three axes) a^2/9
    a = 0.3
    ramp = torch.zeros(1, 3, *SHAPE)
    ramp[0, 0] = a * identity_grid(SHAPE)[0, 0]
    assert diffusion(ramp).item() == pytest.approx(a * a / 9.0, rel=1e-5)


def _loss_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    source, target = texture(seed), texture(seed + 1)
    u_st = F.interpolate(torch.randn(1, 3, 3, 3, 3, generator=g), size=SHAPE, mode="trilinear", align_corners=True)
    u_ts = F.interpolate(torch.randn(1, 3, 3, 3, 3, generator=g), size=SHAPE, mode="trilinear", align_corners=True)
    return source, target, u_st, u_ts, {"raw_st": 2.0 * u_st, "raw_ts": -u_ts}


def test_identity_fields_have_zero_cycle_and_smoothness():
    source, target = texture(0), texture(1)
    zero = torch.zeros(1, 3, *SHAPE)
    preset = get_preset("default")
    total, parts = registration_loss(source, target, zero, zero, {"raw_st": zero, "raw_ts": zero}, preset)
    assert parts["cycle"] == pytest.approx(0.0, abs=1e-6)
    assert parts["smooth"] == 0.0
    assert parts["ncc_st"] == pytest.approx(local_ncc(source, target, preset.ncc_window).item(), abs=1e-5)


def test_registration_loss_combines_the_terms_with_the_given_weights():
    source, target, u_st, u_ts, aux = _loss_inputs()
    preset = get_preset("default")
    weights = {"ncc": 2.0, "cycle": 0.5, "smooth": 3.0}
    total, parts = registration_loss(source, target, u_st, u_ts, aux, preset, weights)
    assert parts["cycle"] > 1e-3 and parts["smooth"] > 1e-3  # every term present and non-trivial
    expected = -2.0 * (parts["ncc_st"] + parts["ncc_ts"]) + 0.5 * parts["cycle"] + 3.0 * parts["smooth"]
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert parts["loss"] == pytest.approx(total.item())
    # the smoothness term is on the raw fields (velocities), not on the displacements
    assert parts["smooth"] == pytest.approx(diffusion(aux["raw_st"]).item() + diffusion(aux["raw_ts"]).item(),
                                            rel=1e-5)
    # the preset's own weights are used when none are passed
    _, default_parts = registration_loss(source, target, u_st, u_ts, aux, preset)
    w = preset.weights
    default_expected = (-w["ncc"] * (parts["ncc_st"] + parts["ncc_ts"]) + w["cycle"] * parts["cycle"]
                        + w["smooth"] * parts["smooth"])
    assert default_parts["loss"] == pytest.approx(default_expected, rel=1e-5)


def test_zero_weight_removes_a_term():
    source, target, u_st, u_ts, aux = _loss_inputs()
    preset = get_preset("paper")  # smooth weight 0 in the preset
    total, parts = registration_loss(source, target, u_st, u_ts, aux, preset)
    assert "smooth" not in parts and "cycle" in parts
    assert total.item() == pytest.approx(-(parts["ncc_st"] + parts["ncc_ts"]) + parts["cycle"], rel=1e-5)
    total, parts = registration_loss(source, target, u_st, u_ts, aux, preset, {"ncc": 1.0, "cycle": 0.0})
    assert "cycle" not in parts and "smooth" not in parts
    assert total.item() == pytest.approx(-(parts["ncc_st"] + parts["ncc_ts"]), rel=1e-6)
    # a term whose weight is zero gets no gradient through it: only NCC drives u_ts here
    u_ts = u_ts.clone().requires_grad_(True)
    total, _ = registration_loss(source, target, u_st, u_ts, aux, preset, {"ncc": 0.0, "cycle": 0.0, "smooth": 0.0})
    total.backward()
    assert u_ts.grad is None or float(u_ts.grad.abs().max()) == 0.0


def test_ncc_window_of_the_preset_is_used():
    source, target, u_st, u_ts, aux = _loss_inputs()
    small = dataclasses.replace(get_preset("paper"), ncc_window=3)
    _, parts = registration_loss(source, target, u_st, u_ts, aux, small)
    from InverseRegLib.warp import warp
    assert parts["ncc_st"] == pytest.approx(local_ncc(warp(source, u_st), target, 3).item(), abs=1e-6)


def test_loss_gradient_moves_a_shifted_image_towards_its_target():
    """The similarity term alone, optimised over a constant displacement, recovers a known
    shift of a textured object on a zero background: the loss's sign convention and the warp
    direction agree."""
    from InverseRegLib.warp import warp
    n = 24
    g = torch.Generator().manual_seed(3)
    tex = F.interpolate(torch.rand(1, 1, 8, 8, 8, generator=g), size=(n, n, n), mode="trilinear", align_corners=True)
    radius = ((identity_grid((n, n, n)) - (n - 1) / 2.0) ** 2).sum(1, keepdim=True).sqrt()
    target = tex * torch.sigmoid(2.0 * (8.0 - radius))
    true_shift = torch.tensor([1.0, -1.0, 0.5]).view(1, 3, 1, 1, 1)
    source = warp(target, -true_shift.expand(1, 3, n, n, n))  # source(x) = target(x - shift)
    shift = torch.zeros(1, 3, 1, 1, 1, requires_grad=True)
    optimizer = torch.optim.Adam([shift], lr=0.1)
    preset = dataclasses.replace(get_preset("paper"), ncc_window=5)
    for _ in range(60):
        u = shift.expand(1, 3, n, n, n)
        loss, _ = registration_loss(source, target, u, -u, {"raw_st": u, "raw_ts": -u}, preset,
                                    {"ncc": 1.0, "cycle": 0.0})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.allclose(shift.detach(), true_shift, atol=0.15)  # measured: within 0.05


def _block_labels(n: int, shift: int = 0) -> torch.Tensor:
    """(n, n, n) int64 map: label 3 in one block, 7 in another, 0 elsewhere; ``shift`` voxels along x."""
    label = torch.zeros(n, n, n, dtype=torch.int64)
    label[4:12, 4:12, 4 + shift:12 + shift] = 3
    label[12:18, 6:14, 8 + shift:14 + shift] = 7
    return label


def test_one_hot_labels_has_one_channel_per_requested_label():
    label = _block_labels(20)
    onehot = one_hot_labels(label, [3, 7, 9])
    assert onehot.shape == (1, 3, 20, 20, 20) and onehot.dtype == torch.float32
    assert torch.equal(onehot[0, 0].bool(), label == 3) and torch.equal(onehot[0, 1].bool(), label == 7)
    assert onehot[0, 2].sum() == 0  # a label absent from the map: an empty channel
    assert float(onehot.sum()) == float((label > 0).sum())  # the background is in no channel
    with pytest.raises(ValueError, match="empty"):
        one_hot_labels(label, [])


def test_soft_dice_loss_values_and_absent_structures():
    a = one_hot_labels(_block_labels(20), [3, 7])
    assert soft_dice_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    disjoint = torch.zeros_like(a)
    disjoint[:, :, :2] = 1.0  # outside both blocks
    assert soft_dice_loss(disjoint, a).item() == pytest.approx(1.0, abs=1e-6)
    # half of label 3's block kept, label 7 perfect: Dice 2*256/(256+512) = 2/3 and 1
    half = a.clone()
    half[:, 0, :, :, 4:8] = 0.0
    assert soft_dice_loss(half, a).item() == pytest.approx(1.0 - (2.0 / 3.0 + 1.0) / 2.0, abs=1e-6)
    # a channel empty in both masks is left out of the mean, not counted as a perfect 1
    extra = torch.cat([half, torch.zeros_like(half[:, :1])], dim=1)
    reference = torch.cat([a, torch.zeros_like(a[:, :1])], dim=1)
    assert soft_dice_loss(extra, reference).item() == pytest.approx(soft_dice_loss(half, a).item(), abs=1e-6)
    with pytest.raises(ValueError, match="shape"):
        soft_dice_loss(a, a[:, :1])


def test_dice_term_is_weighted_needs_labels_and_pulls_the_field_onto_the_labels():
    """w_dice adds exactly w * (Dice loss of each direction); without labels it is refused; and
    optimising a constant displacement under the label term alone recovers the known shift of the
    label blocks (sign and warp direction agree with the image terms)."""
    from InverseRegLib.warp import warp
    n = 20
    target_labels = one_hot_labels(_block_labels(n), [3, 7])
    source_labels = one_hot_labels(_block_labels(n, shift=2), [3, 7])  # source(x) = target(x - 2 e_x)
    source = target = texture(0, (n, n, n))
    zero = torch.zeros(1, 3, n, n, n)
    preset = get_preset("default")
    aux = {"raw_st": zero, "raw_ts": zero}
    weights = {"ncc": 1.0, "cycle": 0.0, "smooth": 0.0, "dice": 0.5}
    total, parts = registration_loss(source, target, zero, zero, aux, preset, weights,
                                     labels=(source_labels, target_labels))
    expected_dice = (soft_dice_loss(warp(source_labels, zero), target_labels)
                     + soft_dice_loss(warp(target_labels, zero), source_labels)).item()
    assert parts["dice"] == pytest.approx(expected_dice, abs=1e-6) and parts["dice"] > 0.1
    assert total.item() == pytest.approx(-(parts["ncc_st"] + parts["ncc_ts"]) + 0.5 * parts["dice"], rel=1e-5)
    with pytest.raises(ValueError, match="no label maps"):
        registration_loss(source, target, zero, zero, aux, preset, weights)
    _, plain = registration_loss(source, target, zero, zero, aux, preset)  # the preset has no Dice weight
    assert "dice" not in plain
    shift = torch.zeros(1, 3, 1, 1, 1, requires_grad=True)
    optimizer = torch.optim.Adam([shift], lr=0.1)
    for _ in range(80):
        u = shift.expand(1, 3, n, n, n)
        loss, _ = registration_loss(source, target, u, -u, {"raw_st": u, "raw_ts": -u}, preset,
                                    {"ncc": 0.0, "cycle": 0.0, "dice": 1.0}, labels=(source_labels, target_labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # channel 0 of a displacement is x (the last array axis): the blocks sit 2 voxels further along it
    assert torch.allclose(shift.detach().view(3), torch.tensor([2.0, 0.0, 0.0]), atol=0.3), shift.view(3)
