"""Several network passes (``passes``): the network again on the moving image warped so far.

An untrained InverseNet returns nearly the same small field whatever the pair, so a second pass
would repeat the first and a wrong composition order could go unnoticed. The network here is an
InverseNet that returns a different smooth velocity on each call (two fields of a few voxels
that do not commute), integrated by the model's own scaling and squaring, φ = exp(v) and
φ⁻¹ = exp(−v) as the ``default`` preset does, and records what it was given. Checked: one pass is
the network's output; the second pass sees the source warped by the first field; two passes are
φ1∘φ2 forward and φ2⁻¹∘φ1⁻¹ backward, in that order; the pair stays inverse to each other (the
other order breaks that, so the check can fail); no folding; register()'s argument (the CLI's
``--passes`` is checked in test_cli.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from InverseRegLib.errors import InverseRegError
from InverseRegLib.model import InverseNet
from InverseRegLib.pipeline import Cancelled, register, run_network
from InverseRegLib.presets import get_preset
from InverseRegLib.warp import compose, warp
from inversereg_testlib import small_model
from test_refine import folding_percent, smooth_field, textured_phantom

torch.set_num_threads(1)
CPU = torch.device("cpu")
INNER = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))


class ScriptedNet(InverseNet):
    """Call k returns exp(v_k), exp(-v_k); keeps the (source, target) of every call."""

    def __init__(self, velocities):
        super().__init__(get_preset("default"))
        self.velocities = velocities
        self.calls = []

    def forward(self, source, target):
        self.calls.append((source.detach().clone(), target.detach().clone()))
        velocity = self.velocities[(len(self.calls) - 1) % len(self.velocities)]
        velocity = velocity.to(source.dtype)
        return self._exp(velocity), self._exp(-velocity), {"raw_st": velocity, "raw_ts": -velocity}


VELOCITIES = [smooth_field(amplitude=2.0, seed=1), smooth_field(amplitude=2.0, seed=2)]


@pytest.fixture
def model():
    loaded = small_model("default")
    loaded.network = ScriptedNet(VELOCITIES).eval()
    return loaded


@pytest.fixture(scope="module")
def pair():
    source = textured_phantom(seed=0)[0, 0].numpy()
    target = textured_phantom(seed=3)[0, 0].numpy()
    return source, target


def exp(velocity):
    return ScriptedNet(VELOCITIES)._exp(velocity)


def test_one_pass_is_the_network_output(model, pair):
    u_st, u_ts = run_network(model, *pair, CPU, passes=1)
    assert len(model.network.calls) == 1
    assert float(u_st.norm(dim=1).mean()) > 0.5, "the test fields must move voxels"
    assert torch.allclose(u_st, exp(VELOCITIES[0]), atol=1e-5)
    assert torch.allclose(u_ts, exp(-VELOCITIES[0]), atol=1e-5)


def test_two_passes_compose_forward_after_and_backward_before(model, pair):
    u_st, u_ts = run_network(model, *pair, CPU, passes=2)
    source, target = (torch.from_numpy(a)[None, None] for a in pair)
    calls = model.network.calls
    assert len(calls) == 2
    assert torch.allclose(calls[1][0], warp(source, exp(VELOCITIES[0])), atol=1e-5)
    assert torch.equal(calls[0][1], target) and torch.equal(calls[1][1], target)
    first, second = exp(VELOCITIES[0]), exp(VELOCITIES[1])
    assert torch.allclose(u_st, compose(first, second), atol=1e-5)
    assert torch.allclose(u_ts, compose(exp(-VELOCITIES[1]), exp(-VELOCITIES[0])), atol=1e-5)


def test_two_passes_stay_inverse_consistent_and_fold_free(model, pair):
    u_st, u_ts = run_network(model, *pair, CPU, passes=2)
    residual = float(compose(u_ts, u_st)[INNER].norm(dim=1).mean())
    assert float(u_st.norm(dim=1).mean()) > 0.8
    assert residual < 0.1, residual
    # the backward steps composed in the other order are not the inverse: the check would see it
    wrong = compose(exp(-VELOCITIES[0]), exp(-VELOCITIES[1]))
    assert float(compose(wrong, u_st)[INNER].norm(dim=1).mean()) > 4 * residual
    assert folding_percent(u_st) == 0.0 and folding_percent(u_ts) == 0.0


def test_register_takes_passes(small_pair):
    fixed, moving = small_pair[:2]
    model = small_model("default", head_scale=5e4)  # a real (untrained) network on the model grid
    with pytest.raises(InverseRegError, match="passes must be"):
        register(fixed, moving, model, "cpu", None, passes=0)
    one = register(fixed, moving, model, "cpu", None, passes=1)
    two = register(fixed, moving, model, "cpu", None, passes=2)
    assert one.report["passes"] == 1 and two.report["passes"] == 2
    difference = sitk.GetArrayFromImage(one.forward) - sitk.GetArrayFromImage(two.forward)
    assert np.abs(difference).max() > 0.1  # mm: the second pass moved something


def test_every_pass_reports_progress_and_cancel_stops_between_passes(model, pair):
    messages = []
    run_network(model, *pair, CPU, passes=3, progress=lambda f, m: messages.append((round(f, 3), m)))
    assert [m for _, m in messages[:3]] == [f"network pass {k} of 3" for k in (1, 2, 3)]
    fractions = [f for f, _ in messages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    # cancel answered True on its second question: the first pass ran, the second never started
    answers = iter([False, True])
    with pytest.raises(Cancelled, match="before network pass 2 of 3"):
        run_network(model, *pair, CPU, passes=3, cancel=lambda: next(answers))
    assert len(model.network.calls) == 4  # 3 from the first run, 1 from the cancelled one
