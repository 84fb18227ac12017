"""Instance optimisation (``--refine N``) of the network's fields on one pair (issue 5).

A small textured phantom and a copy of it deformed by a known smooth field; the network is an
untrained InverseNet (fields ~ identity), so a few refinement steps must visibly improve the
registration: lower training loss, higher NCC both ways, closer to the known field, no folding.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from InverseRegLib.errors import InverseRegError
from InverseRegLib.losses import local_ncc
from InverseRegLib.model import InverseNet
from InverseRegLib.presets import get_preset
from InverseRegLib.refine import RefinementCancelled, refine_fields
from InverseRegLib.warp import compose, identity_grid, warp

torch.set_num_threads(1)
SIZE = 32  # divisible by the network's 16


def textured_phantom(n: int = SIZE, seed: int = 0) -> torch.Tensor:
    """(1, 1, n, n, n) in [0, 1]: random ellipsoids plus smooth texture inside a head shape."""
    generator = torch.Generator().manual_seed(seed)
    zz, yy, xx = torch.meshgrid(*[torch.linspace(-1.0, 1.0, n)] * 3, indexing="ij")
    image = torch.zeros(n, n, n)
    for _ in range(6):
        center = torch.rand(3, generator=generator) - 0.5
        radii = 0.1 + 0.25 * torch.rand(3, generator=generator)
        distance = (((xx - center[0]) / radii[0]) ** 2 + ((yy - center[1]) / radii[1]) ** 2
                    + ((zz - center[2]) / radii[2]) ** 2).sqrt()
        image += (0.2 + 0.8 * torch.rand(1, generator=generator)) * torch.sigmoid(8 * (1 - distance))
    texture = F.interpolate(torch.randn(1, 1, 8, 8, 8, generator=generator), size=(n, n, n),
                            mode="trilinear", align_corners=True)[0, 0]
    head = torch.sigmoid(10 * (1 - ((xx / 0.85) ** 2 + (yy / 0.8) ** 2 + (zz / 0.75) ** 2).sqrt()))
    image = ((image + 0.3 * texture) * head).clamp(min=0)
    return (image / image.max())[None, None]


def smooth_field(n: int = SIZE, amplitude: float = 1.5, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = amplitude * torch.randn(1, 3, 4, 4, 4, generator=generator)
    return F.interpolate(coarse, size=(n, n, n), mode="trilinear", align_corners=True)


def folding_percent(u: torch.Tensor) -> float:
    """% of interior voxels where the Jacobian determinant of x -> x + u(x) is <= 0."""
    x = identity_grid(tuple(u.shape[2:])) + u
    dx = x[:, :, 1:-1, 1:-1, 2:] - x[:, :, 1:-1, 1:-1, :-2]
    dy = x[:, :, 1:-1, 2:, 1:-1] - x[:, :, 1:-1, :-2, 1:-1]
    dz = x[:, :, 2:, 1:-1, 1:-1] - x[:, :, :-2, 1:-1, 1:-1]
    jacobian = torch.stack([dx, dy, dz], dim=2).permute(0, 3, 4, 5, 1, 2) / 2.0
    return 100.0 * float((torch.linalg.det(jacobian) <= 0).float().mean())


@pytest.fixture(scope="module")
def pair():
    source = textured_phantom()
    truth = smooth_field()
    target = warp(source, truth)  # so u_ST = truth on the target grid
    return source, target, truth


def network_for(preset_name: str) -> InverseNet:
    torch.manual_seed(0)
    return InverseNet(get_preset(preset_name))


@pytest.fixture(scope="module")
def refined(pair):
    """The default preset's network fields and their refinement (run once for several tests)."""
    source, target, _ = pair
    network = network_for("default")
    weights_before = {k: v.clone() for k, v in network.state_dict().items()}
    with torch.no_grad():
        u_st0, u_ts0, _ = network(source, target)
    history, fractions = [], []
    u_st, u_ts = refine_fields(network, source, target, steps=10, lr=0.2, history=history,
                               progress=lambda f, message: fractions.append(f))
    return dict(network=network, weights_before=weights_before, initial=(u_st0, u_ts0),
                refined=(u_st, u_ts), history=history, fractions=fractions)


def test_refinement_lowers_the_loss_and_improves_the_fields(pair, refined):
    source, target, truth = pair
    (u_st0, u_ts0), (u_st, u_ts), history = refined["initial"], refined["refined"], refined["history"]
    assert len(history) == 11 and refined["fractions"] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert history[-1]["loss"] < history[0]["loss"] - 0.01, (history[0], history[-1])
    for moved, fixed, before, after in ((source, target, u_st0, u_st), (target, source, u_ts0, u_ts)):
        assert float(local_ncc(warp(moved, after), fixed)) > float(local_ncc(warp(moved, before), fixed)) + 0.01
    # closer to the deformation that made the pair, and still folding-free
    mask = (target > 0.05).expand_as(truth)
    error_before = (u_st0 - truth).norm(dim=1, keepdim=True).expand_as(truth)[mask].mean()
    error_after = (u_st - truth).norm(dim=1, keepdim=True).expand_as(truth)[mask].mean()
    assert error_after < 0.8 * error_before, (float(error_before), float(error_after))
    assert folding_percent(u_st) < 0.1 and folding_percent(u_ts) < 0.1
    assert u_st.shape == u_ts.shape == (1, 3, SIZE, SIZE, SIZE) and not u_st.requires_grad
    # the network itself is untouched and still trainable
    network = refined["network"]
    for key, value in network.state_dict().items():
        assert torch.equal(value, refined["weights_before"][key])
    assert all(p.requires_grad for p in network.parameters())


def test_symmetric_preset_keeps_the_backward_field_the_inverse(refined):
    u_st, u_ts = refined["refined"]
    # exp(-v) o exp(v) = identity up to the interpolation error of the integration
    residual = compose(u_ts, u_st)[:, :, 2:-2, 2:-2, 2:-2].norm(dim=1)
    assert float(u_st.norm(dim=1).mean()) > 0.2  # the fields did move
    assert float(residual.mean()) < 0.05, float(residual.mean())


def test_refinement_of_a_displacement_preset_lowers_its_loss(pair):
    # the paper preset: two independent displacement fields, no smoothness term in its loss (so
    # large steps fold; the check here is only that the same loss is optimised)
    source, target, _ = pair
    network = network_for("paper")
    history = []
    u_st, u_ts = refine_fields(network, source, target, steps=5, lr=0.05, history=history)
    assert history[-1]["loss"] < history[0]["loss"] - 0.01, (history[0], history[-1])
    assert not torch.equal(u_st, -u_ts)  # two fields, not one


def test_zero_steps_returns_the_network_fields(pair):
    source, target, _ = pair
    network = network_for("default")
    with torch.no_grad():
        expected_st, expected_ts, _ = network(source, target)
    u_st, u_ts = refine_fields(network, source, target, steps=0)
    assert torch.equal(u_st, expected_st) and torch.equal(u_ts, expected_ts)


def test_cancel_is_checked_every_step(pair):
    source, target, _ = pair
    network = network_for("default")
    calls, steps_done = [], []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 3  # allow three steps, cancel before the fourth

    with pytest.raises(RefinementCancelled, match="after 3 of 20"):
        refine_fields(network, source, target, steps=20, cancel=cancel,
                      progress=lambda f, m: steps_done.append(f))
    assert len(steps_done) == 3
    assert all(p.requires_grad for p in network.parameters())  # restored after the interruption
    with pytest.raises(RefinementCancelled):
        refine_fields(network, source, target, steps=5, cancel=lambda: True)
    assert issubclass(RefinementCancelled, InverseRegError)


def test_bad_arguments(pair):
    source, target, _ = pair
    network = network_for("default")
    with pytest.raises(InverseRegError, match="steps"):
        refine_fields(network, source, target, steps=-1)
    with pytest.raises(InverseRegError, match="steps"):
        refine_fields(network, source, target, steps=2.5)
    with pytest.raises(InverseRegError, match="learning rate"):
        refine_fields(network, source, target, steps=1, lr=0.0)
    with pytest.raises(InverseRegError, match=r"\(1, 1, D, H, W\)"):
        refine_fields(network, source[0], target[0], steps=1)
    with pytest.raises(InverseRegError, match="InverseNet"):
        refine_fields(torch.nn.Identity(), source, target, steps=1)
