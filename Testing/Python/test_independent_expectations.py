"""Expected values computed without the code under test.

``test_losses.py`` checks how ``registration_loss`` weighs its terms using the terms it returns
itself, so a term computed on the wrong images (e.g. NCC(S∘φST, S) instead of NCC(S∘φST, T), or
the cycle warped the wrong way) would pass there. Here every term is recomputed with SciPy:
``ndimage.map_coordinates`` for the warps (linear, zero outside, as ``grid_sample`` with zero
padding) and ``ndimage.uniform_filter`` for the local means of NCC (windows cut at the border and
renormalised by the share of the window inside, as the docstring of ``local_ncc`` states).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from InverseRegLib.losses import registration_loss
from InverseRegLib.presets import get_preset

SHAPE = (12, 14, 16)


def scipy_warp(image: np.ndarray, displacement: np.ndarray) -> np.ndarray:
    """``image`` (D, H, W) sampled at x + u(x); ``displacement`` (3, D, H, W) in voxels with
    channels (x, y, z), i.e. along array axes (2, 1, 0)."""
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in image.shape], indexing="ij")
    coordinates = np.stack([zz + displacement[2], yy + displacement[1], xx + displacement[0]])
    return ndimage.map_coordinates(image, coordinates, order=1, mode="grid-constant", cval=0.0)


def scipy_local_ncc(a: np.ndarray, b: np.ndarray, window: int, eps: float = 1e-5) -> float:
    def mean(x):
        inside = ndimage.uniform_filter(np.ones_like(x), window, mode="constant", cval=0.0)
        return ndimage.uniform_filter(x, window, mode="constant", cval=0.0) / inside

    mean_a, mean_b = mean(a), mean(b)
    cov = mean(a * b) - mean_a * mean_b
    var_a = np.maximum(mean(a * a) - mean_a**2, 0.0)
    var_b = np.maximum(mean(b * b) - mean_b**2, 0.0)
    return float((cov / np.sqrt(var_a * var_b + eps)).mean())


def scipy_diffusion(field: np.ndarray) -> float:
    return float(np.mean([np.mean(np.diff(field, axis=axis) ** 2) for axis in (1, 2, 3)]))


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def smooth(channels, amplitude):
        coarse = amplitude * torch.randn(1, channels, 4, 4, 4, generator=g, dtype=torch.float64)
        return F.interpolate(coarse, size=SHAPE, mode="trilinear", align_corners=True)

    source, target = (smooth(1, 1.0) + 2.0), (smooth(1, 1.0) + 2.0)
    u_st, u_ts = smooth(3, 1.5), smooth(3, 1.5)
    return source, target, u_st, u_ts, {"raw_st": 0.5 * u_st, "raw_ts": -0.5 * u_ts}


@pytest.mark.parametrize("preset_name", ["default", "paper"])
def test_every_loss_term_against_scipy(preset_name):
    source, target, u_st, u_ts, aux = inputs()
    preset = get_preset(preset_name)
    total, parts = registration_loss(source.float(), target.float(), u_st.float(), u_ts.float(),
                                     {k: v.float() for k, v in aux.items()}, preset)
    s, t = source[0, 0].numpy(), target[0, 0].numpy()
    f_st, f_ts = u_st[0].numpy(), u_ts[0].numpy()
    s_warped, t_warped = scipy_warp(s, f_st), scipy_warp(t, f_ts)  # S∘φST (target space), T∘φTS
    window = preset.ncc_window
    expected = {"ncc_st": scipy_local_ncc(s_warped, t, window), "ncc_ts": scipy_local_ncc(t_warped, s, window),
                "cycle": float(np.abs(t - scipy_warp(t_warped, f_st)).mean() + np.abs(s - scipy_warp(s_warped, f_ts)).mean()),
                "smooth": scipy_diffusion(aux["raw_st"][0].numpy()) + scipy_diffusion(aux["raw_ts"][0].numpy())}
    # the test means something: the two NCC terms, and the terms on swapped images, differ
    assert abs(expected["ncc_st"] - scipy_local_ncc(s_warped, s, window)) > 0.05
    assert abs(expected["ncc_st"] - expected["ncc_ts"]) > 0.01
    weights = preset.weights
    loss = -weights["ncc"] * (expected["ncc_st"] + expected["ncc_ts"]) + weights["cycle"] * expected["cycle"]
    if weights["smooth"] > 0:
        loss += weights["smooth"] * expected["smooth"]
        assert parts["smooth"] == pytest.approx(expected["smooth"], rel=1e-4)
    else:
        assert "smooth" not in parts
    for key in ("ncc_st", "ncc_ts", "cycle"):
        assert parts[key] == pytest.approx(expected[key], abs=2e-4), key
    assert total.item() == pytest.approx(loss, abs=5e-4)


def test_two_network_passes_compose_as_scipy_says():
    """``test_passes.py`` states the two-pass fields with the library's own ``compose``. Here:
    the second pass registers source∘φ1 to the target, so the forward map is
    x -> x + u2(x) + u1(x + u2(x)) (u1 sampled linearly, clamped at the border), and the backward
    map is x -> x + b1(x) + b2(x + b1(x)), each sampled with SciPy."""
    from InverseRegLib.pipeline import run_network
    from test_passes import VELOCITIES, ScriptedNet
    from inversereg_testlib import small_model

    model = small_model("default")
    model.network = ScriptedNet(VELOCITIES).eval()
    rng = np.random.default_rng(0)
    shape = tuple(VELOCITIES[0].shape[2:])
    source, target = (rng.random(shape).astype(np.float32) for _ in range(2))
    u_st, u_ts = run_network(model, source, target, torch.device("cpu"), passes=2)
    u1, u2 = (ScriptedNet(VELOCITIES)._exp(v)[0].double().numpy() for v in VELOCITIES)
    b1, b2 = (ScriptedNet(VELOCITIES)._exp(-v)[0].double().numpy() for v in VELOCITIES)

    def after(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
        zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
        at = np.stack([zz + inner[2], yy + inner[1], xx + inner[0]])
        return inner + np.stack([ndimage.map_coordinates(c, at, order=1, mode="nearest") for c in outer])

    np.testing.assert_allclose(u_st[0].numpy(), after(u1, u2), atol=1e-4)
    np.testing.assert_allclose(u_ts[0].numpy(), after(b2, b1), atol=1e-4)
    assert np.abs(after(u1, u2) - after(u2, u1)).max() > 0.05  # the order matters for these fields
