"""Both fields adjusted together (InverseRegLib.mutual), judged by SimpleITK composing the written fields.

The judge is test_inverse's: both fields as ``sitk.DisplacementFieldTransform`` composed by
``sitk.CompositeTransform`` (linear interpolation, as any ITK reader applies them).
"""
from __future__ import annotations

import numpy as np
import pytest

from test_inverse import FIXED, MOVING, central_mask, composed_error
from InverseRegLib.errors import InverseRegError
from InverseRegLib.fields import field_to_image, jacobian_determinant
from InverseRegLib.inverse import invert_field
from InverseRegLib.mutual import DEFAULT_STEP_MM, make_mutually_inverse
from InverseRegLib.pipeline import Cancelled, register


def wavy_forward(geometry, amplitude: float = 1.0) -> np.ndarray:
    """A displacement that bends within a few voxels (wavelengths of 8-9 voxels of 2 mm), so the
    exact inverse's trilinear interpolation leaves a fixed-order error of ~0.13 mm."""
    p = geometry.physical_points()
    return amplitude * np.stack([np.sin(p[..., 1] / 2.5), np.sin(p[..., 2] / 2.9 + 0.3), np.cos(p[..., 0] / 2.7)], -1)


def both_orders(forward, backward):
    """Mean fixed-order and moving-order error (mm) by SimpleITK over the central 'brains'."""
    forward_image = field_to_image(forward, FIXED)
    backward_image = field_to_image(np.asarray(backward, dtype=np.float64), MOVING)
    fixed_order = composed_error(forward_image, backward_image)[central_mask(FIXED, 20.0)].mean()
    moving_order = composed_error(backward_image, forward_image)[central_mask(MOVING, 20.0)].mean()
    return fixed_order, moving_order


def test_both_orders_fall_on_different_grids():
    """Different grids (size, spacing, oblique direction, origin). From the exact inverse, whose
    moving order is ~0 and fixed order the interpolation floor, 60 steps bring the fixed order
    to under a third and keep the moving order under the same bound; the forward field moves
    by less than a step per iteration allows, nothing folds, the inputs are left as they were,
    and the statistics agree with SimpleITK's measure of the written fields. (The field is
    smoothed in the process: its mean change is a quarter of its amplitude.)"""
    forward = wavy_forward(FIXED)
    backward, _ = invert_field(forward, FIXED, MOVING)
    fixed_before, moving_before = both_orders(forward, backward)
    assert fixed_before > 0.05 and moving_before < 2e-3  # the floor this module is for
    copies = forward.copy(), backward.copy()
    new_forward, new_backward, stats = make_mutually_inverse(
        forward, FIXED, backward, MOVING, central_mask(FIXED, 20.0), central_mask(MOVING, 20.0), 60)
    np.testing.assert_array_equal(forward, copies[0])
    np.testing.assert_array_equal(backward, copies[1])
    fixed_after, moving_after = both_orders(new_forward, new_backward)
    assert fixed_after < fixed_before / 3 and moving_after < fixed_before / 3
    assert stats.steps_run == 60 and not stats.reached_target and stats.fixed_order_before_mm == pytest.approx(fixed_before, rel=0.3)
    assert stats.fixed_order_mm < stats.fixed_order_before_mm / 3
    # Adam's steps are about its rate per component at most
    assert 0 < stats.forward_change_mm and np.abs(new_forward - forward).max() <= 60 * DEFAULT_STEP_MM * 1.05
    assert (jacobian_determinant(new_forward, FIXED) > 0).all() and (jacobian_determinant(new_backward, MOVING) > 0).all()


def test_a_target_stops_the_steps_at_the_first_that_reaches_it():
    """With ``target_mm`` the steps stop as soon as both orders' means are at most the target:
    one step fewer leaves one order above it, the cap is not used up, and SimpleITK's measure of
    the written fields agrees (its masks are not grown, so within a margin). A target out of reach
    runs every step and says it was not reached."""
    forward = wavy_forward(FIXED)
    backward, _ = invert_field(forward, FIXED, MOVING)
    masks = central_mask(FIXED, 20.0), central_mask(MOVING, 20.0)
    target = 0.5 * both_orders(forward, backward)[0]
    new_forward, new_backward, stats = make_mutually_inverse(forward, FIXED, backward, MOVING, *masks, 400,
                                                             target_mm=target)
    assert stats.reached_target and stats.target_mm == target and 0 < stats.steps_run < 400
    assert max(stats.fixed_order_mm, stats.moving_order_mm) <= target
    _, _, one_fewer = make_mutually_inverse(forward, FIXED, backward, MOVING, *masks, stats.steps_run - 1)
    assert max(one_fewer.fixed_order_mm, one_fewer.moving_order_mm) > target and not one_fewer.reached_target
    assert max(both_orders(new_forward, new_backward)) < 1.3 * target
    _, _, capped = make_mutually_inverse(forward, FIXED, backward, MOVING, *masks, 5, target_mm=1e-4)
    assert capped.steps_run == 5 and not capped.reached_target
    with pytest.raises(ValueError, match="target_mm > 0"):
        make_mutually_inverse(forward, FIXED, backward, MOVING, *masks, 5, target_mm=0.0)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_hand_written_gradient_is_autograds(threads, monkeypatch):
    """The steps' gradient (by hand, to skip autograd's zero-filled volumes) equals autograd's
    through ``F.grid_sample`` of the same loss, on two different grids, with points mapped beyond
    a grid (no displacement there, as ITK reads a field; the edge values within half a voxel of
    its outer centres) and, with two threads, the points cut into two batch entries."""
    import torch
    import torch.nn.functional as F
    from InverseRegLib import mutual
    monkeypatch.setattr(mutual, "MIN_POINTS_PER_THREAD", 100)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        forward = wavy_forward(FIXED, amplitude=3.0)
        forward[:, :, :3] += 40.0  # beyond the moving grid
        backward, _ = invert_field(forward, FIXED, MOVING)
        cpu = torch.device("cpu")
        fixed = mutual._Side(forward, FIXED, central_mask(FIXED, 30.0), 2, cpu)
        moving = mutual._Side(backward, MOVING, central_mask(MOVING, 30.0), 2, cpu)
        assert fixed._grid(fixed.points)[0].shape[0] == threads
        e_fixed, e_moving, gradients = mutual._errors_with_gradients(fixed, moving)
        hand = gradients()

        volumes = [fixed.volume.clone().requires_grad_(True), moving.volume.clone().requires_grad_(True)]

        def sampled(volume, side, points, geometry):
            grid = ((points - side.origin) @ side.k_t - 1.0).view(1, 1, 1, -1, 3)
            index = geometry.physical_to_index(points.detach().double().numpy())
            inside = np.all((index >= -0.5) & (index < np.asarray(geometry.size) - 0.5), axis=-1)
            values = F.grid_sample(volume[None], grid, align_corners=True, padding_mode="border").view(3, -1).t()
            return values * torch.from_numpy(inside)[:, None], inside
        f = volumes[0].view(3, -1)[:, fixed.index].t()
        b = volumes[1].view(3, -1)[:, moving.index].t()
        in_moving, inside_moving = sampled(volumes[1], moving, fixed.points + f, MOVING)
        in_fixed, _ = sampled(volumes[0], fixed, moving.points + b, FIXED)
        r_fixed, r_moving = f + in_moving, b + in_fixed
        assert (~inside_moving).sum() >= 10 and inside_moving.mean() > 0.5  # a few points read nothing
        # each thread's points sample only the part of the volume they reach, in that part's
        # coordinates: float32 rounds them differently from the whole grid's (~1e-5 mm here)
        torch.testing.assert_close(e_fixed, r_fixed.detach(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(e_moving, r_moving.detach(), rtol=1e-5, atol=1e-4)
        (r_fixed.pow(2).sum() / len(r_fixed) + r_moving.pow(2).sum() / len(r_moving)).backward()
        for mine, theirs in zip(hand, volumes):
            assert float(theirs.grad.abs().max()) > 0
            torch.testing.assert_close(mine, theirs.grad, rtol=1e-5, atol=1e-5 * float(theirs.grad.abs().max()))
    finally:
        torch.set_num_threads(previous)


def test_the_error_is_judged_as_simpleitk_composes_the_written_fields():
    """Where the forward field sends points beyond the moving grid, ITK moves them back by nothing:
    the steps' measure (``both_orders``, what the target is judged on) and the report's
    (``quality.inverse_consistency``) give SimpleITK's means of the written fields in both orders.
    Read with the edge values instead, the fixed order would be far lower than SimpleITK's."""
    from InverseRegLib import mutual
    from InverseRegLib.quality import inverse_consistency
    forward = wavy_forward(FIXED, amplitude=2.0) + np.array([25.0, 0.0, 0.0])  # a part sent beyond the moving grid
    backward, _ = invert_field(forward, FIXED, MOVING)
    masks = central_mask(FIXED, 30.0), central_mask(MOVING, 30.0)
    index = MOVING.physical_to_index(FIXED.physical_points() + forward)[masks[0]]
    beyond = ~np.all((index >= -0.5) & (index < np.asarray(MOVING.size) - 0.5), axis=-1)
    assert 0.02 < beyond.mean() < 0.5
    forward_image = field_to_image(forward, FIXED)
    backward_image = field_to_image(np.asarray(backward, dtype=np.float64), MOVING)
    itk_fixed = composed_error(forward_image, backward_image)[masks[0]].mean()
    itk_moving = composed_error(backward_image, forward_image)[masks[1]].mean()
    steps_measure = mutual.both_orders(forward, FIXED, backward, MOVING, *masks)
    np.testing.assert_allclose(steps_measure, (itk_fixed, itk_moving), rtol=2e-3, atol=1e-4)
    report_fixed = inverse_consistency(forward, FIXED, backward, MOVING, masks[0], stride=1)[0]
    report_moving = inverse_consistency(backward, MOVING, forward, FIXED, masks[1], stride=1)[0]
    np.testing.assert_allclose((report_fixed, report_moving), (itk_fixed, itk_moving), rtol=2e-3, atol=1e-4)
    assert itk_fixed > 0.5  # the points sent beyond come back by nothing: ~25 mm each


@pytest.mark.parametrize("margin", [0, 1, 2, 3])
def test_masks_grow_as_a_cube_max_filter_grows_them(margin):
    """The masks' growth by shifted ORs is max_pool3d's with the (2 margin + 1)³ cube, up to the
    grid's edges, also on an axis shorter than the cube."""
    import torch
    import torch.nn.functional as F
    from InverseRegLib.mutual import _grown
    mask = torch.from_numpy(np.random.default_rng(margin).random((9, 2, 13)) > 0.9)
    expected = F.max_pool3d(mask.float()[None, None], 2 * margin + 1, stride=1, padding=margin)[0, 0] > 0
    grown = _grown(mask, margin)
    assert torch.equal(grown, expected) and grown.sum() >= mask.sum()
    assert not mask.any() or margin == 0 or grown.sum() > mask.sum()


def test_no_steps_change_nothing_and_bad_arguments_are_refused():
    forward = wavy_forward(FIXED)
    backward, _ = invert_field(forward, FIXED, MOVING)
    same_forward, same_backward, stats = make_mutually_inverse(
        forward, FIXED, backward, MOVING, central_mask(FIXED), central_mask(MOVING), 0)
    np.testing.assert_array_equal(same_forward, forward.astype(np.float32))
    np.testing.assert_array_equal(same_backward, backward)
    assert stats.fixed_order_mm == stats.fixed_order_before_mm and stats.forward_change_mm == 0
    with pytest.raises(ValueError, match="does not match its grid"):
        make_mutually_inverse(forward[:-1], FIXED, backward, MOVING, central_mask(FIXED), central_mask(MOVING), 1)
    with pytest.raises(ValueError, match="mask shape"):
        make_mutually_inverse(forward, FIXED, backward, MOVING, central_mask(FIXED)[:-1], central_mask(MOVING), 1)
    with pytest.raises(ValueError, match="steps >= 0"):
        make_mutually_inverse(forward, FIXED, backward, MOVING, central_mask(FIXED), central_mask(MOVING), -1)


def test_register_option_reports_and_lowers_the_fixed_order(small_pair):
    """End to end: ``mutual_steps`` lowers the report's fixed-order ICE below the exact inverse's
    alone, keeps both orders under that, reports the step's figures and judges folding on the
    image grids; the progress bar gives the steps most of its length; a cancel during them stops
    the run; a negative count is refused."""
    from inversereg_testlib import small_model
    fixed, moving, _, _, _ = small_pair
    model = small_model("default", 5e4)
    asked = []

    def count():
        asked.append(1)
        return False

    plain = register(fixed, moving, model, "cpu", None, cancel=count).report
    calls_without = len(asked)
    heard = []
    mutual = register(fixed, moving, model, "cpu", None, mutual_steps=60,
                      progress=lambda fraction, message: heard.append((fraction, message))).report
    assert plain["mutual_steps"] == 0 and plain["seconds_mutual"] == 0 and "mutual_fixed_order_mm" not in plain
    assert mutual["mutual_steps"] == 60 and mutual["seconds_mutual"] > 0
    assert mutual["ice_mean_mm"] < 0.7 * plain["ice_mean_mm"]
    assert mutual["ice_moving_mean_mm"] < plain["ice_mean_mm"]
    assert mutual["mutual_fixed_order_mm"] < mutual["mutual_fixed_order_before_mm"]
    # after the steps the report's ICE counts every voxel, as the steps judge themselves
    assert plain["ice_sampled_every"] == 2 and mutual["ice_sampled_every"] == 1
    written = (mutual.get("mutual_fixed_order_after_repair_mm", mutual["mutual_fixed_order_mm"]),
               mutual.get("mutual_moving_order_after_repair_mm", mutual["mutual_moving_order_mm"]))
    np.testing.assert_allclose((mutual["ice_mean_mm"], mutual["ice_moving_mean_mm"]), written, rtol=1e-3)
    assert mutual["folding_measured_on"] == "image grids" and mutual["folding_percent_forward"] == 0
    # the bar gives the steps their share of the time (they are most of it), in order, to 1
    fractions = [f for f, _ in heard]
    steps = [f for f, m in heard if m.startswith("mutual-inverse step")]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(steps) == 60
    assert steps[0] < 0.15 and steps[-1] > 0.9
    asked.clear()

    def cancel_in_mutual():  # past every question of a run without the step: inside its iterations
        asked.append(1)
        return len(asked) > calls_without

    with pytest.raises(Cancelled, match="mutual-inverse step"):
        register(fixed, moving, model, "cpu", None, mutual_steps=50, cancel=cancel_in_mutual)
    with pytest.raises(InverseRegError, match="mutual_steps must be"):
        register(fixed, moving, model, "cpu", None, mutual_steps=-2)
    with pytest.raises(InverseRegError, match="needs mutual_steps > 0"):
        register(fixed, moving, model, "cpu", None, mutual_target_mm=0.01)
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "0.01"):
        with pytest.raises(InverseRegError, match="mutual_target_mm must be"):
            register(fixed, moving, model, "cpu", None, mutual_steps=5, mutual_target_mm=bad)


def test_the_target_is_judged_on_the_fields_as_written(small_pair, monkeypatch):
    """Sharp fields can fold during the steps, and the fold repair after them raises the error
    again (best on 11 -> 12: 0.0099 mm in the loop, 0.014 written). The report then measures the
    repaired fields and judges the target on those. Here a repair that changes a box of the
    fields after every round of steps stands in for that: the loop reached the target, the written
    fields did not, and the report says so; without such a change nothing is measured again."""
    import dataclasses
    from inversereg_testlib import small_model
    from InverseRegLib import mutual
    fixed, moving, _, _, _ = small_pair
    model = small_model("default", 5e4)
    clean = register(fixed, moving, model, "cpu", None, mutual_steps=200, mutual_target_mm=0.05).report
    assert clean["mutual_reached_target"] and "mutual_fixed_order_after_repair_mm" not in clean
    real_repair, real_steps, after_steps = mutual.repair_folds, mutual.make_mutually_inverse, []

    def steps(*args, **kwargs):
        out = real_steps(*args, **kwargs)
        after_steps.append(True)
        return out

    def repair(field, geometry, *args, **kwargs):
        out, stats = real_repair(field, geometry, *args, **kwargs)
        if after_steps and geometry is not None and field.shape[:3] == tuple(moving.GetSize()[::-1]):
            out = np.array(out, copy=True)
            out[20:28, 24:32, 20:28] += 1.0  # one order then errs ~1 mm on a box of the brain
            stats = dataclasses.replace(stats, changed=stats.changed + 8 ** 3)
        return out, stats

    monkeypatch.setattr(mutual, "make_mutually_inverse", steps)
    monkeypatch.setattr(mutual, "repair_folds", repair)
    broken = register(fixed, moving, model, "cpu", None, mutual_steps=200, mutual_target_mm=0.05).report
    assert max(broken["mutual_fixed_order_mm"], broken["mutual_moving_order_mm"]) <= 0.05
    assert broken["mutual_moving_order_after_repair_mm"] > 0.05 and broken["mutual_reached_target"] is False
    assert broken["ice_moving_mean_mm"] > 0.05  # the report's own measure agrees
    # every round's repair broke it: the rounds ran out, within the steps asked for
    assert broken["mutual_rounds"] == mutual.ROUNDS and broken["mutual_steps_run"] <= 200


def test_steps_resume_after_a_repair_that_lifted_the_error(small_pair, monkeypatch):
    """When the fold repair lifts the written fields above the target once, a second round of
    steps (aiming lower) brings them back within it, and the report says two rounds ran and the
    target was reached; the report's own ICE of the written fields agrees."""
    import dataclasses
    from inversereg_testlib import small_model
    from InverseRegLib import mutual
    fixed, moving, _, _, _ = small_pair
    model = small_model("default", 5e4)
    real_repair, real_steps, rounds = mutual.repair_folds, mutual.make_mutually_inverse, []

    def steps(*args, **kwargs):
        out = real_steps(*args, **kwargs)
        if args[6]:  # a round of steps, not a measurement
            rounds.append(True)
        return out

    def repair(field, geometry, *args, **kwargs):
        out, stats = real_repair(field, geometry, *args, **kwargs)
        if len(rounds) == 1 and field.shape[:3] == tuple(moving.GetSize()[::-1]):
            out = np.array(out, copy=True)
            out[20:28, 24:32, 20:28] += 0.3  # one field, after the first round only
            stats = dataclasses.replace(stats, changed=stats.changed + 8 ** 3)
            rounds.append(False)  # once
        return out, stats

    monkeypatch.setattr(mutual, "make_mutually_inverse", steps)
    monkeypatch.setattr(mutual, "repair_folds", repair)
    report = register(fixed, moving, model, "cpu", None, mutual_steps=400, mutual_target_mm=0.05).report
    assert report["mutual_rounds"] == 2 and report["mutual_reached_target"] is True
    assert report["ice_mean_mm"] <= 0.05 * 1.2 and report["ice_moving_mean_mm"] <= 0.05 * 1.2


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device here")
def test_the_steps_on_a_gpu_give_the_cpus_fields():
    """On a GPU (register() passes its device) the same steps give the same fields as on the CPU,
    up to float32 summation order."""
    forward = wavy_forward(FIXED)
    backward, _ = invert_field(forward, FIXED, MOVING)
    masks = central_mask(FIXED, 20.0), central_mask(MOVING, 20.0)
    cpu = make_mutually_inverse(forward, FIXED, backward, MOVING, *masks, 20)
    gpu = make_mutually_inverse(forward, FIXED, backward, MOVING, *masks, 20, device="cuda")
    np.testing.assert_allclose(gpu[0], cpu[0], atol=2e-3)
    np.testing.assert_allclose(gpu[1], cpu[1], atol=2e-3)
    assert gpu[2].fixed_order_mm == pytest.approx(cpu[2].fixed_order_mm, rel=0.05)


def test_an_empty_mask_runs_and_counts_nothing():
    """A mask without voxels (an image with no foreground on one side) leaves that order's error
    at 0 and the steps still run: each thread's block of the volume is then the whole grid."""
    forward = wavy_forward(FIXED)
    backward, _ = invert_field(forward, FIXED, MOVING)
    empty = np.zeros(MOVING.array_shape, dtype=bool)
    _, _, stats = make_mutually_inverse(forward, FIXED, backward, MOVING, central_mask(FIXED, 20.0), empty, 3)
    assert stats.steps_run == 3 and stats.moving_order_mm == 0.0 and stats.fixed_order_mm > 0
    _, _, stats = make_mutually_inverse(forward, FIXED, backward, MOVING, np.zeros(FIXED.array_shape, dtype=bool),
                                        empty, 2)
    assert stats.steps_run == 2 and stats.fixed_order_mm == 0.0 == stats.moving_order_mm
