"""model.py: the two-decoder network of the paper and the symmetric default."""
from __future__ import annotations

import pytest
import torch

from InverseRegLib.model import InverseNet
from InverseRegLib.presets import PRESETS, Preset, get_preset
from InverseRegLib.warp import compose

SHAPE = (16, 32, 16)  # D, H, W: divisible by 16, not cubic


def pair(shape=SHAPE, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, *shape, generator=g), torch.rand(batch, 1, *shape, generator=g)


def smooth_pair(shape=(32, 32, 32), seed=0):
    """Smooth random images (like brains: no voxel-level noise), so the untrained network's
    velocity is smooth enough for scaling and squaring to be accurate."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.nn.functional.interpolate(torch.rand(1, 1, 6, 6, 6, generator=g), size=shape,
                                                 mode="trilinear", align_corners=True) for _ in range(2))


def network(preset: str, head_scale: float = 0.0, seed: int = 0) -> InverseNet:
    torch.manual_seed(seed)
    net = InverseNet(get_preset(preset)).eval()
    if head_scale:
        with torch.no_grad():
            net.decoder_st.head.weight.mul_(head_scale)
            net.decoder_ts.head.weight.mul_(head_scale)
    return net


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_both_outputs_have_the_input_shape(preset):
    source, target = pair(batch=2)
    with torch.no_grad():
        u_st, u_ts, aux = network(preset)(source, target)
    assert u_st.shape == u_ts.shape == (2, 3, *SHAPE)
    assert aux["raw_st"].shape[:2] == (2, 3)
    assert torch.isfinite(u_st).all() and torch.isfinite(u_ts).all()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_untrained_network_starts_near_identity(preset):
    source, target = pair()
    with torch.no_grad():
        u_st, u_ts, _ = network(preset)(source, target)
    assert u_st.abs().max() < 1e-2 and u_ts.abs().max() < 1e-2


def test_size_not_divisible_by_16_is_refused_with_a_clear_message():
    source, target = pair(shape=(16, 24, 16))
    with pytest.raises(ValueError, match=r"spatial size \(16, 24, 16\) must be divisible by 16"):
        network("paper")(source, target)


def test_source_and_target_of_different_shapes_are_refused():
    source, _ = pair()
    _, target = pair(shape=(16, 16, 16))
    with pytest.raises(ValueError, match="differ"):
        network("paper")(source, target)


def test_paper_decoders_fuse_by_addition_and_subtraction():
    """The paper's preset: displacements straight from two decoders of identical shape, the
    forward one adding encoder skips, the backward one subtracting them. With the backward
    decoder's weights copied from the forward one, the outputs still differ, and only because of
    the fusion sign: flipping it makes them identical."""
    net = network("paper", head_scale=1e4)
    assert net.preset.field_type == "displacement" and not net.preset.symmetric
    assert (net.decoder_st.sign, net.decoder_ts.sign) == (1, -1)
    source, target = pair()
    with torch.no_grad():
        u_st, u_ts, aux = net(source, target)
        assert torch.equal(u_st, aux["raw_st"]) and torch.equal(u_ts, aux["raw_ts"])
        net.decoder_ts.load_state_dict(net.decoder_st.state_dict())
        same_weights_st, same_weights_ts, _ = net(source, target)
        assert (same_weights_st - same_weights_ts).abs().max() > 1e-2 * same_weights_st.abs().max()
        net.decoder_ts.sign = 1
        _, addition_ts, _ = net(source, target)
    assert torch.allclose(addition_ts, same_weights_st)


def test_decoder_refuses_an_unknown_fusion():
    from InverseRegLib.model import Decoder
    with pytest.raises(ValueError, match="sign"):
        Decoder(0, (32, 32, 32, 32), (32, 32, 8), 8)


def test_symmetric_preset_returns_mutually_inverse_fields():
    """``default``: v = (v_fwd - v_bwd)/2, φST = exp(v), φTS = exp(-v). Even untrained (heads
    scaled up so the fields are non-trivial) φTS∘φST ≈ identity: away from the border (where
    border padding extends the fields) the residual is below 5 % of the largest displacement at
    worst and 0.5 % on average (measured: 2.6 % and 0.13 %)."""
    net = network("default", head_scale=5e4)
    source, target = smooth_pair()
    with torch.no_grad():
        u_st, u_ts, aux = net(source, target)
    assert torch.equal(aux["raw_ts"], -aux["raw_st"])
    largest = u_st.abs().max()
    assert largest > 0.4, "fields too small for the test to mean anything"
    for round_trip in (compose(u_ts, u_st), compose(u_st, u_ts)):
        interior = round_trip[:, :, 4:-4, 4:-4, 4:-4]
        assert interior.abs().max() < 0.05 * largest
        assert interior.abs().mean() < 0.005 * largest


def test_non_symmetric_velocity_preset_is_not_inverse_consistent_by_construction():
    """The contrast to the test above (the check can fail): ``diffeo``'s two independent
    velocity fields, untrained, are not inverse of each other."""
    net = network("diffeo", head_scale=5e4)
    source, target = smooth_pair()
    with torch.no_grad():
        u_st, u_ts, _ = net(source, target)
    interior = compose(u_ts, u_st)[:, :, 4:-4, 4:-4, 4:-4]
    assert interior.abs().max() > 0.2 * u_st.abs().max()


def test_preset_round_trip_and_errors():
    for preset in PRESETS.values():
        assert Preset.from_dict(preset.to_dict()) == preset
    with pytest.raises(ValueError, match="unknown preset fields"):
        Preset.from_dict({"name": "x", "bogus": 1})
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        get_preset("nope")
    before = dict(get_preset("default").weights)
    changed = get_preset("default").with_weights(smooth=0.0, cycle=None)
    assert changed.weights == {**before, "smooth": 0.0}
    assert get_preset("default").weights == before  # the registry is not modified
