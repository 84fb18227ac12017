"""pipeline.register end to end on synthetic brain-like pairs.

Untrained networks with scaled-up heads (smooth fields of a few mm) exercise every transfer step
without training; a network whose only output is a constant (the head's bias) gives an exactly
known physical translation; a *trained* model (bundled, or ``$INVERSEREG_TEST_MODEL``) is needed
only to check that registration improves Dice and recovers the known field.

Tolerances: forward∘backward (ICE) below 0.1 mm mean for the symmetric default preset on
fields of up to ~3 mm (measured ~0.03 mm); exact translations within 1e-4 mm.
"""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from InverseRegLib.errors import InverseRegError
from InverseRegLib.fields import affine_matrix, field_to_image
from InverseRegLib.grid import Geometry
from InverseRegLib.modelfile import LoadedModel, load_model
from InverseRegLib.pipeline import Cancelled, _compose_with_affine, model_geometry, register
from InverseRegLib.polish import NETWORK_ONLY
from inversereg_testlib import geometry_equal, oblique_geometry, small_model, trained_model_path

REPORT_KEYS = {"device", "model_id", "model_path", "preset", "affine", "refine_steps", "seconds_affine",
               "seconds_network", "seconds_to_fields", "seconds_to_warped", "folding_percent_forward", "folding_percent_backward",
               "folding_percent_forward_foreground", "folding_percent_backward_foreground", "ice_mean_mm",
               "ice_p95_mm", "peak_memory_mb_process", "seconds_total", "folds_repaired_forward",
               "folds_left_forward", "folds_repaired_backward", "folds_left_backward",
               "voxels_changed_by_fold_repair_backward"}
LABEL_KEYS = {"labels", "dice_per_label", "dice_mean", "dice_per_label_backward", "dice_mean_backward", "bir",
              "bir_backward", "dice_mean_before"}

#: an oblique, anisotropic grid of another size than the pair's (48 x 56 x 48 x 3.4 mm, axis-aligned)
OBLIQUE = oblique_geometry((48, 52, 40), (3.1, 3.7, 4.3), axis=(1.0, -1.0, 2.0), degrees=12.0, center=(2.0, -3.0, 1.5))


def onto(image: sitk.Image, geometry: Geometry, labels: bool = False) -> sitk.Image:
    """``image`` resampled (same physical content) onto another grid."""
    return sitk.Resample(image, geometry.reference_image(), sitk.Transform(),
                         sitk.sitkNearestNeighbor if labels else sitk.sitkLinear, 0.0,
                         sitk.sitkInt32 if labels else sitk.sitkFloat32)


def outside_client_warp(image: sitk.Image, reference: sitk.Image, field: sitk.Image) -> np.ndarray:
    """What SimpleITK makes of a field file: linear resampling through the displacement field."""
    transform = sitk.DisplacementFieldTransform(sitk.Image(field))
    return sitk.GetArrayFromImage(sitk.Resample(image, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))


def magnitudes(field: sitk.Image) -> np.ndarray:
    return np.linalg.norm(sitk.GetArrayViewFromImage(field), axis=-1)


def check_outputs(result, fixed: sitk.Image, moving: sitk.Image) -> None:
    """Output grids equal input grids; fields are 3-vector float64 images; report complete."""
    for image, grid in ((result.forward, fixed), (result.moving_warped, fixed),
                        (result.backward, moving), (result.fixed_warped, moving)):
        assert Geometry.of(image) == Geometry.of(grid)
    for field in (result.forward, result.backward):
        assert field.GetPixelID() == sitk.sitkVectorFloat64 and field.GetNumberOfComponentsPerPixel() == 3
        assert np.isfinite(sitk.GetArrayViewFromImage(field)).all()
    assert REPORT_KEYS <= set(result.report)
    json.dumps(result.report)  # plain JSON types only
    # the warped images are exactly what an outside client makes of the fields
    for warped, image, reference, field in ((result.moving_warped, moving, fixed, result.forward),
                                            (result.fixed_warped, fixed, moving, result.backward)):
        by_sitk = outside_client_warp(image, reference, field)
        assert np.abs(sitk.GetArrayFromImage(warped) - by_sitk).max() < 0.01  # images in [0, 1]


@pytest.mark.parametrize("preset", ["paper", "default"])
def test_register_small_pair_with_both_presets(small_pair, preset):
    fixed, moving, fixed_seg, moving_seg, _ = small_pair
    result = register(fixed, moving, small_model(preset, 5e4), "cpu", None, 0, fixed_seg, moving_seg)
    check_outputs(result, fixed, moving)
    report = result.report
    assert LABEL_KEYS <= set(report)
    assert report["preset"] == preset and report["device"] == "cpu" and report["affine"] is None
    assert report["labels"] == sorted(set(np.unique(sitk.GetArrayViewFromImage(fixed_seg))) - {0})
    assert set(report["dice_per_label"]) == {str(v) for v in report["labels"]}
    assert 0.0 <= report["dice_mean"] <= 1.0 and report["bir"] <= 1.0
    assert 1.0 < magnitudes(result.forward).max() < 10.0  # non-trivial, smooth fields
    if preset == "default":  # inverse by construction, diffeomorphic
        assert report["ice_mean_mm"] < 0.2  # the fixed order's interpolation floor (0.12 measured)
        assert report["folding_percent_forward"] == 0.0 and report["folding_percent_backward"] == 0.0
    # two independent untrained decoders ("paper") are not inverse to each other, but the written
    # backward field is made the inverse of the forward one either way (InverseRegLib.inverse); to
    # precision where the forward field is fold-free, closely where the untrained "paper" one folds
    assert report["ice_moving_mean_mm"] < (2e-3 if preset == "default" else 0.05)


@pytest.mark.parametrize("which", ["moving", "fixed"])
def test_outputs_on_the_original_grids_and_inverse_consistent(small_pair, which):
    """Fixed and moving on different grids (one resampled onto an oblique anisotropic grid of
    another size): forward and moving_warped on the fixed grid, backward and fixed_warped on the
    moving grid; the symmetric default gives forward∘backward ≈ identity (ICE mean < 0.2 mm,
    95th percentile < 0.5 mm: in this order only the trilinear interpolation of the exact inverse
    between voxels, 0.11-0.14 mm measured with the default's model-grid stage, whose sharper
    fields raised it from < 0.1) and no folding, with fields of several mm."""
    fixed, moving, fixed_seg, moving_seg, _ = small_pair
    if which == "moving":
        moving, moving_seg = onto(moving, OBLIQUE), onto(moving_seg, OBLIQUE, labels=True)
    else:
        fixed, fixed_seg = onto(fixed, OBLIQUE), onto(fixed_seg, OBLIQUE, labels=True)
    result = register(fixed, moving, small_model("default", 5e4), "cpu", None, 0, fixed_seg, moving_seg)
    check_outputs(result, fixed, moving)
    assert not geometry_equal(result.forward, result.backward)
    report = result.report
    assert magnitudes(result.forward).max() > 2.0
    assert report["ice_mean_mm"] < 0.2 and report["ice_p95_mm"] < 0.5
    for key in ("folding_percent_forward", "folding_percent_backward",
                "folding_percent_forward_foreground", "folding_percent_backward_foreground"):
        assert report[key] == 0.0


def translation_model(preset: str, voxels) -> LoadedModel:
    """A network that outputs the constant ``voxels`` (x, y, z) as φST and its negative as φTS:
    heads zeroed, biases set. For the velocity presets the constant is the velocity, whose
    exponential is the same translation."""
    model = small_model(preset)
    with torch.no_grad():
        for decoder, sign in ((model.network.decoder_st, 1.0), (model.network.decoder_ts, -1.0)):
            decoder.head.weight.zero_()
            decoder.head.bias.copy_(sign * torch.tensor(voxels, dtype=torch.float32))
    return model


@pytest.mark.parametrize("passes", [1, 2])
@pytest.mark.parametrize("preset", ["paper", "default"])
def test_a_constant_network_field_becomes_the_physical_translation(small_pair, preset, passes):
    """Voxel channel c of the model grid is its index axis c: with the model grid's direction
    diag(-1, -1, 1) and 5 mm spacing, (1, 0.5, -0.4) voxels are (-5, -2.5, -2) mm LPS, whatever
    grid the moving image is on; the backward field is the exact opposite. Each further pass
    adds the same translation once more. In float32: bfloat16 would round the bias 0.4 to
    0.40039 (test_precision.py covers that precision). The default's model-grid NCC stage is
    switched off: this checks how the network's own field reaches the written files."""
    fixed, moving, _, _, _ = small_pair
    moving = onto(moving, OBLIQUE)
    model = translation_model(preset, [1.0, 0.5, -0.4])
    expected = passes * np.array([-5.0, -2.5, -2.0])
    result = register(fixed, moving, model, "cpu", None, passes=passes, precision="float32",
                      polish_settings=NETWORK_ONLY)
    forward = sitk.GetArrayFromImage(result.forward)
    backward = sitk.GetArrayFromImage(result.backward)
    assert np.abs(forward - expected).max() < 1e-4
    assert np.abs(backward + expected).max() < 1e-4
    assert result.report["ice_mean_mm"] < 1e-4
    reference = sitk.Resample(moving, fixed, sitk.TranslationTransform(3, tuple(expected)), sitk.sitkLinear, 0.0)
    assert np.abs(sitk.GetArrayFromImage(result.moving_warped) - sitk.GetArrayFromImage(reference)).max() < 0.01


def test_compose_with_affine_matches_an_itk_composite_transform(small_pair):
    """forward(p) = A(p + d_ST(p)) - p and backward(q) = A⁻¹(q) + d_TS(A⁻¹(q)) - q, checked with
    ITK's CompositeTransform of the affine and the model-grid field (ITK applies the last added
    transform first)."""
    fixed, moving, _, _, _ = small_pair
    moving = onto(moving, OBLIQUE)
    model = small_model("default")
    grid = model_geometry(model, fixed)
    points = grid.physical_points()
    d_st = 3.0 * np.sin(points / 25.0 + np.array([0.1, 0.7, 1.3]))  # smooth, LPS mm, on the model grid
    d_ts = -0.8 * d_st
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.05, 0.04, -0.02, -0.03, 0.97, 0.05, 0.02, -0.01, 1.02))
    affine.SetTranslation((3.0, -2.0, 1.5))
    affine.SetCenter((1.0, 2.0, -3.0))

    def as_volume(d):
        return torch.from_numpy(np.moveaxis(d, -1, 0).astype(np.float32))[None]

    fixed_grid, moving_grid = Geometry.of(fixed), Geometry.of(moving)
    forward = _compose_with_affine(as_volume(d_st), grid, fixed_grid, affine, inverse=False)
    backward = _compose_with_affine(as_volume(d_ts), grid, moving_grid, affine, inverse=True)
    field_st = sitk.DisplacementFieldTransform(field_to_image(d_st, grid))
    field_ts = sitk.DisplacementFieldTransform(field_to_image(d_ts, grid))
    composite_forward = sitk.CompositeTransform([affine, field_st])  # A(D_st(p))
    composite_backward = sitk.CompositeTransform([field_ts, affine.GetInverse()])  # D_ts(A^-1(q))
    rng = np.random.default_rng(0)
    for output_grid, field, composite in ((fixed_grid, forward, composite_forward),
                                          (moving_grid, backward, composite_backward)):
        reference = output_grid.reference_image()
        checked = 0
        for _ in range(80):
            index = tuple(int(v) for v in rng.integers(0, output_grid.size))
            p = np.asarray(reference.TransformIndexToPhysicalPoint(index))
            inner = p if composite is composite_forward else np.asarray(affine.GetInverse().TransformPoint(tuple(p)))
            if not np.all((grid.physical_to_index(inner) > 0) & (grid.physical_to_index(inner) < np.asarray(grid.size) - 1)):
                continue  # ITK gives zero displacement outside the field; the library extends its edge
            expected = np.asarray(composite.TransformPoint(tuple(p)))
            assert np.allclose(p + field[index[::-1]], expected, atol=2e-3)
            checked += 1
        assert checked >= 40
    matrix, offset = affine_matrix(affine)
    assert np.allclose(affine_matrix(affine.GetInverse())[0], np.linalg.inv(matrix))


def test_label_report_before_and_after(small_pair):
    """With an identity network the registered Dice equals the Dice before registration, and
    both equal Dice computed by hand on the label maps."""
    fixed, moving, fixed_seg, moving_seg, _ = small_pair
    result = register(fixed, moving, small_model("default"), "cpu", None, 0, fixed_seg, moving_seg, labels=[2, 41, 4],
                      polish_settings=NETWORK_ONLY)  # the network's identity field, not the NCC stage's
    report = result.report
    moved, target = sitk.GetArrayFromImage(moving_seg), sitk.GetArrayFromImage(fixed_seg)
    # by hand, not with metrics.dice_per_label (the function the report itself uses)
    by_hand = {k: 2.0 * np.count_nonzero((moved == k) & (target == k))
               / (np.count_nonzero(moved == k) + np.count_nonzero(target == k)) for k in (2, 41, 4)}
    assert report["labels"] == [2, 41, 4]
    assert report["dice_per_label"] == pytest.approx({str(k): v for k, v in by_hand.items()}, abs=1e-3)
    assert report["dice_mean_before"] == pytest.approx(np.mean(list(by_hand.values())), abs=1e-9)
    assert report["dice_mean"] == pytest.approx(report["dice_mean_before"], abs=1e-3)


def test_cancel_and_bad_arguments(small_pair):
    fixed, moving, _, _, _ = small_pair
    model = small_model("default")
    with pytest.raises(Cancelled):
        register(fixed, moving, model, "cpu", None, cancel=lambda: True)
    with pytest.raises(InverseRegError, match="affine must be"):
        register(fixed, moving, model, "cpu", "similarity")
    with pytest.raises(InverseRegError, match="refine must be >= 0"):
        register(fixed, moving, model, "cpu", None, refine=-1)
    with pytest.raises(InverseRegError, match="unknown device"):
        register(fixed, moving, model, "tpu", None)
    with pytest.raises(InverseRegError, match="labels must be"):
        register(fixed, moving, model, "cpu", None, labels="cortex")
    flat = sitk.Image(fixed)
    flat = flat * 0.0 + 1.0
    with pytest.raises(InverseRegError, match="constant"):
        register(flat, moving, model, "cpu", None)


@pytest.mark.slow
def test_register_with_affine_prealignment(small_pair):
    """The default path (affine pre-alignment). The moving image is resampled onto an oblique
    grid through a translation, moved(q) = moving(q + t) with t = (8, -6, 5) mm; with an identity
    network the forward field is the affine alone: p + forward(p) = A(p) at every grid point,
    backward is A⁻¹, and A finds the shift: a fixed point p maps to p - t (up to the pair's own
    non-affine deformation of a few mm, so the mean over the brain is checked within 1.5 mm)."""
    fixed, moving, fixed_seg, moving_seg, _ = small_pair
    shift = np.array([8.0, -6.0, 5.0])
    moved = sitk.Resample(moving, OBLIQUE.reference_image(), sitk.TranslationTransform(3, tuple(shift)),
                          sitk.sitkLinear, 0.0, sitk.sitkFloat32)  # moved(q) = moving(q + t)
    result = register(fixed, moved, small_model("default"), "cpu", "affine", polish_settings=NETWORK_ONLY)
    check_outputs(result, fixed, moved)
    assert result.report["affine"] == "affine" and isinstance(result.affine, sitk.Transform)
    assert result.report["ice_mean_mm"] < 1e-3
    forward, backward = sitk.GetArrayFromImage(result.forward), sitk.GetArrayFromImage(result.backward)
    rng = np.random.default_rng(1)
    inverse = result.affine.GetInverse()
    for field, grid, transform in ((forward, fixed, result.affine), (backward, moved, inverse)):
        for _ in range(40):
            index = tuple(int(v) for v in rng.integers(0, grid.GetSize()))
            p = np.asarray(grid.TransformIndexToPhysicalPoint(index))
            assert np.allclose(p + field[index[::-1]], transform.TransformPoint(tuple(p)), atol=1e-3)
    brain = sitk.GetArrayFromImage(fixed_seg) > 0
    assert np.allclose(forward[brain].mean(axis=0), -shift, atol=1.5)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("InverseRegLib.refine") is None, reason="InverseRegLib/refine.py not written yet")
def test_refinement_through_the_pipeline(small_pair):
    """``refine=N`` polishes the fields on the pair: Dice rises even from an untrained (identity)
    network, the symmetric tie keeps forward∘backward ≈ identity, no folding."""
    fixed, moving, fixed_seg, moving_seg, _ = small_pair
    model = small_model("default")
    result = register(fixed, moving, model, "cpu", None, 4, fixed_seg, moving_seg)
    check_outputs(result, fixed, moving)
    report = result.report
    assert report["refine_steps"] == 4
    assert report["dice_mean"] > report["dice_mean_before"] + 0.01  # measured: +0.03 after 5 steps
    assert report["ice_mean_mm"] < 0.1
    assert report["folding_percent_forward"] == 0.0 and report["folding_percent_backward"] == 0.0


# --- with a trained model ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_registration():
    """The bundled model (or $INVERSEREG_TEST_MODEL) on a brain-sized phantom pair with a known
    deformation, no affine pre-alignment (the pair is aligned): one network pass, and the default
    (two passes); both without the default's model-grid NCC stage, so that they judge the network."""
    path = trained_model_path()
    from InverseRegLib.synthetic import make_pair
    fixed, moving, fixed_seg, moving_seg, true_forward = make_pair(size=(96, 112, 96), spacing=(1.7, 1.7, 1.7),
                                                                   seed=0, return_field=True)
    model = load_model(path)
    one_pass = register(fixed, moving, model, "cpu", None, 0, fixed_seg, moving_seg, passes=1,
                        polish_settings=NETWORK_ONLY)
    default = register(fixed, moving, model, "cpu", None, 0, fixed_seg, moving_seg, polish_settings=NETWORK_ONLY)
    return fixed, moving, fixed_seg, true_forward, one_pass, default


@pytest.mark.slow
def test_trained_model_improves_dice_and_recovers_the_field(trained_registration):
    """One pass: the network's own estimate of a known smooth deformation."""
    fixed, moving, fixed_seg, true_forward, result, _ = trained_registration
    check_outputs(result, fixed, moving)
    report = result.report
    # measured, bundled model 9f1a6cb54152: Dice 0.751 -> 0.823, mean field error 2.31 mm vs 2.74 mm
    # for zero displacement (the earlier model 6c69cabad929: 0.835, 2.16 mm)
    assert report["dice_mean"] > report["dice_mean_before"] + 0.03
    assert report["dice_mean_backward"] > report["dice_mean_before"] + 0.03
    brain = sitk.GetArrayFromImage(fixed_seg) > 0
    truth = sitk.GetArrayFromImage(true_forward)
    recovered = sitk.GetArrayFromImage(result.forward)
    error_zero = np.linalg.norm(truth, axis=-1)[brain].mean()
    error_recovered = np.linalg.norm(recovered - truth, axis=-1)[brain].mean()
    assert error_zero > 1.5  # the known deformation is a real one
    assert error_recovered < 0.95 * error_zero


@pytest.mark.slow
def test_second_pass_raises_dice_on_the_phantom(trained_registration):
    """The default second pass aligns the labels better (measured 0.823 -> 0.867). It does not
    bring the field closer to the phantom's known smooth one (2.31 -> 2.57 mm mean error, in
    texture-poor regions): what it adds is alignment of edges, which is what Dice measures."""
    _, _, _, _, one_pass, default = trained_registration
    assert default.report["passes"] == 2
    assert default.report["dice_mean"] > one_pass.report["dice_mean"] + 0.01
    assert default.report["dice_mean_backward"] > one_pass.report["dice_mean_backward"] + 0.01


@pytest.mark.slow
def test_trained_model_is_inverse_consistent_and_folding_free(trained_registration):
    for result in trained_registration[-2:]:
        report = result.report
        # measured 0.058 / 0.184 mm with one pass, 0.073 / 0.208 mm with two
        assert report["ice_mean_mm"] < 0.1 and report["ice_p95_mm"] < 0.3
        assert report["folding_percent_forward_foreground"] == 0.0
        assert report["folding_percent_backward_foreground"] == 0.0
