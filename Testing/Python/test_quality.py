"""``quality='best'``: the full-resolution optimiser (InverseRegLib.fullres) and its place in ``register``.

Judged against the synthetic pair's known true forward field, and by SimpleITK: Dice through the
written fields, folding from the physical Jacobian, forward∘backward composed by SimpleITK.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from inversereg_testlib import small_model
from InverseRegLib.errors import InverseRegError
from InverseRegLib.fields import image_to_field
from InverseRegLib.fullres import FullResSettings, gaussian_smooth, optimise_fullres
from InverseRegLib.pipeline import register
from InverseRegLib.synthetic import make_pair
from test_inverse import composed_error


@pytest.fixture(scope="module")
def pair():
    """64^3 voxels of 2.5 mm, a smooth deformation of up to ~4 mm, with its true forward field."""
    return make_pair(size=(56, 64, 56), spacing=(2.5, 2.5, 2.5), seed=3, amplitude=4.0, return_field=True)


def brain(image: sitk.Image) -> np.ndarray:
    array = sitk.GetArrayFromImage(image)
    return array > 0.1 * array.max()


@pytest.mark.parametrize("radius, sigma_update, sigma_field, gain",
                         [(2, 1.5, 0.5, 0.4), (2, 1.5, 0.0, 0.25), (3, 1.0, 0.0, 0.15)])
def test_optimiser_recovers_a_known_deformation(pair, radius, sigma_update, sigma_field, gain):
    """From the identity, 20 + 20 iterations bring the field closer to the true one over the brain
    (mean error to the truth, mm; the phantom's structures are uniform inside, so only their edges
    pin the deformation down), with no folding: by at least 40 % with greedy's settings (5^3 NCC,
    update smoothing 1.5 voxels, field 0.5), by at least 25 % without the field smoothing, by at
    least 15 % with the default's (7^3, update 1.0, field 0; which Dice on brains prefers: the
    smoother field is the closer one on this smooth phantom, measured 48 %, 32 % and 22 %)."""
    fixed, moving, _, _, truth = pair
    true_field, geometry = image_to_field(truth)
    start = np.zeros_like(true_field)
    mask = brain(fixed)
    before = np.linalg.norm(true_field - start, axis=-1)[mask].mean()
    result = optimise_fullres(fixed, moving, start, FullResSettings(iterations=(20, 20), step=0.5, radius=radius,
                                                                      sigma_update=sigma_update,
                                                                      sigma_field=sigma_field))
    after = np.linalg.norm(true_field - result, axis=-1)[mask].mean()
    assert before > 1.5 and after < (1.0 - gain) * before
    from InverseRegLib.fields import jacobian_determinant
    assert (jacobian_determinant(result, geometry) > 0).all()


def test_best_beats_fast_and_stays_inverse_consistent(pair):
    """``register(quality='best')`` with an untrained network (fields of a few mm that are not the
    answer): Dice through the written fields rises by > 0.05 over the network's fields alone
    (``fast`` with its model-grid stage off) and by > 0.02 over ``fast`` as shipped, both ways, no
    folding, and the written backward field is the inverse of the forward one on the moving grid
    (SimpleITK's composition < 2e-3 mm over the brain)."""
    fixed, moving, fixed_seg, moving_seg, _ = pair
    model = small_model("default", 2e4)
    network_only = register(fixed, moving, model, "cpu", None, fixed_seg=fixed_seg, moving_seg=moving_seg,
                            polish_settings=FullResSettings(iterations=(0,)))
    fast = register(fixed, moving, model, "cpu", None, fixed_seg=fixed_seg, moving_seg=moving_seg)
    best = register(fixed, moving, model, "cpu", None, fixed_seg=fixed_seg, moving_seg=moving_seg, quality="best",
                    fullres_settings=FullResSettings(iterations=(10, 10)))
    assert fast.report["quality"] == "fast" and best.report["quality"] == "best"
    assert best.report["seconds_fullres"] > 0 and fast.report["seconds_fullres"] == 0
    for key in ("dice_mean", "dice_mean_backward"):
        assert best.report[key] > network_only.report[key] + 0.05, key
        assert best.report[key] > fast.report[key] + 0.02, key
    assert best.report["folding_percent_forward"] == 0 and best.report["folding_percent_backward"] == 0
    assert composed_error(best.backward, best.forward)[brain(moving)].max() < 2e-3


def test_gaussian_smooth_matches_scipy():
    """The separable Gaussian equals scipy.ndimage's sampled Gaussian with the same 3-sigma
    radius and replicated edges (``mode='nearest'``), faces included."""
    import torch
    from scipy.ndimage import gaussian_filter
    rng = np.random.default_rng(0)
    # axes shorter than one block of the banded products, and longer ones (several blocks, a
    # short last one), where every block must reach the band's rows across its edges
    for shape in ((20, 22, 24), (70, 33, 97)):
        volume = rng.standard_normal(shape).astype(np.float32)
        for sigma in (0.5, 1.0, 1.5):
            ours = gaussian_smooth(torch.from_numpy(volume)[None, None], sigma)[0, 0].numpy()
            radius = max(1, int(np.ceil(3.0 * sigma)))
            theirs = gaussian_filter(volume.astype(np.float64), sigma, mode="nearest", truncate=radius / sigma)
            assert np.allclose(ours, theirs, atol=1e-5), (shape, sigma)


def test_box_mean_matches_torch_average_pooling():
    """The NCC window's mean: torch's own 3D average over the window's voxels inside the grid
    (``count_include_pad=False``), for several channels and axes of one to several blocks."""
    import torch
    import torch.nn.functional as F
    from InverseRegLib.fullres import _box_mean
    volume = torch.rand(1, 3, 70, 33, 97, generator=torch.Generator().manual_seed(1), dtype=torch.float64).float()
    for radius in (2, 3, 4):
        ours = _box_mean(volume, radius)
        theirs = F.avg_pool3d(volume.double(), 2 * radius + 1, stride=1, padding=radius, count_include_pad=False)
        assert torch.allclose(ours.double(), theirs, atol=1e-6), radius


def test_bad_quality_and_settings_are_refused(pair):
    fixed, moving, _, _, _ = pair
    with pytest.raises(InverseRegError, match="quality must be one of fast, best"):
        register(fixed, moving, small_model("default"), "cpu", None, quality="fastest")
    with pytest.raises(InverseRegError, match="iterations per level"):
        FullResSettings(iterations=(10, -1))


def test_cli_quality_option(pair, tmp_path, capsys):
    """``inversereg register --quality best`` writes the fields and says so in report.json;
    an unknown value exits with status 2 naming the allowed choices, before any work."""
    import json
    from inversereg_testlib import write_model_file
    from InverseRegLib.cli import main
    fixed, moving, _, _, _ = pair
    sitk.WriteImage(fixed, str(tmp_path / "fixed.nii.gz"))
    sitk.WriteImage(moving, str(tmp_path / "moving.nii.gz"))
    model = write_model_file(tmp_path / "small.pt", small_model("default", 2e4))
    base = [str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), "--model", str(model),
            "--no-affine", "--device", "cpu", "--progress", "none"]
    with pytest.raises(SystemExit) as exit_info:
        main(["register", *base, "-o", str(tmp_path / "bad"), "--quality", "fastest"])
    assert exit_info.value.code == 2 and "invalid choice: 'fastest'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(["register", *base, "-o", str(tmp_path / "out"), "--quality", "best"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert report["quality"] == "best" and report["seconds_fullres"] > 0
