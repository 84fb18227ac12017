"""Instance optimisation (``--refine N``): polish the network's fields on the pair at hand.

The network predicts both fields in one pass; a few dozen gradient steps on *this* pair, with the
very loss the network was trained with, then fit what a network trained on other brains could not
predict. The optimised quantities are the network's raw outputs (``aux["raw_st"]``,
``aux["raw_ts"]``: velocities or displacements as the preset says), so everything the preset
guarantees is kept:

* symmetric presets optimise one velocity ``v``; the fields stay ``φST = exp(v)`` and
  ``φTS = exp(-v)``, inverse of each other by construction, integrated exactly as the network
  does (:meth:`InverseNet._exp`: scaling and squaring on a grid ``integration_downsize`` coarser);
* other presets optimise both raw fields, bound by the cycle term of the loss as in training;
* the loss is :func:`InverseRegLib.losses.registration_loss` with the preset's weights
  (NCC both ways, cycle L1, diffusion smoothness of the raw fields), so refinement does not trade
  the smoothness the network learned for similarity.

Everything runs on the network's device. Adam is written out (a few lines) because
``torch.optim``'s first use in a process imports ``torch._dynamo``, which costs ~3 s on a CPU.
"""
from __future__ import annotations

from typing import Callable

import torch

from .errors import InverseRegError
from .losses import registration_loss
from .model import InverseNet

#: default Adam step, in voxels of the model grid per step and parameter (measured: 0.1 lowers
#: the loss fastest over 20-50 steps without raising folding; see the module's benchmark notes)
DEFAULT_LR = 0.1

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]


class RefinementCancelled(InverseRegError):
    """``cancel()`` returned True: refinement stopped, no fields are returned."""


def _adam(params: list[torch.Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
    """A plain Adam (Kingma & Ba) over ``params``; returns ``step()`` that applies one update
    from the ``.grad`` of each parameter."""
    first = [torch.zeros_like(p) for p in params]
    second = [torch.zeros_like(p) for p in params]
    count = [0]

    @torch.no_grad()
    def step() -> None:
        count[0] += 1
        bias1 = 1.0 - betas[0] ** count[0]
        bias2 = 1.0 - betas[1] ** count[0]
        for p, m, v in zip(params, first, second):
            m.mul_(betas[0]).add_(p.grad, alpha=1.0 - betas[0])
            v.mul_(betas[1]).addcmul_(p.grad, p.grad, value=1.0 - betas[1])
            p.addcdiv_(m / bias1, (v / bias2).sqrt_().add_(eps), value=-lr)
            p.grad = None

    return step


def fields_from_raw(network: InverseNet, raw_st: torch.Tensor, raw_ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Displacements (B, 3, D, H, W, voxels) of φST and φTS from raw decoder outputs, as
    :meth:`InverseNet.forward` computes them (after its symmetric coupling)."""
    if network.preset.field_type == "velocity":
        return network._exp(raw_st), network._exp(raw_ts)
    return raw_st, raw_ts


def refine_fields(
    network: InverseNet,
    source: torch.Tensor,
    target: torch.Tensor,
    steps: int,
    lr: float = DEFAULT_LR,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    *,
    history: list[dict] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``network`` once on the pair, then optimise its raw fields for ``steps`` Adam steps.

    ``source``, ``target``: normalised ``(1, 1, D, H, W)`` tensors on the model grid (moved to the
    network's device). ``steps``: 0 returns the network's own fields. ``lr``: Adam step in voxels.
    ``progress(fraction, message)`` is called after every step with the loss; ``cancel()`` is
    checked before every step and raises :class:`RefinementCancelled` when it returns True.
    ``history``, if a list, receives the loss parts (:func:`registration_loss`'s dict) before
    every step and, last, those of the returned fields (one extra loss evaluation), e.g. for the
    report: ``history[0]`` is the network's own result.

    Returns ``(u_st, u_ts)``: displacement fields ``(1, 3, D, H, W)`` in voxels of the model grid
    (channel order x, y, z; see :mod:`InverseRegLib.warp`), ``u_st`` warping the source onto the
    target and ``u_ts`` the target onto the source; detached, on the network's device.
    """
    if not isinstance(network, InverseNet):
        raise InverseRegError(f"refinement needs an InverseNet, got {type(network).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise InverseRegError(f"refinement steps must be a whole number >= 0, got {steps!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise InverseRegError(f"refinement learning rate must be > 0, got {lr!r}")
    if source.dim() != 5 or source.shape[:2] != (1, 1) or source.shape != target.shape:
        raise InverseRegError(
            f"source and target must both be (1, 1, D, H, W); got {tuple(source.shape)} and {tuple(target.shape)}"
        )
    preset = network.preset
    parameter = next(network.parameters())
    device, dtype = parameter.device, parameter.dtype
    source = source.to(device=device, dtype=dtype)
    target = target.to(device=device, dtype=dtype)

    with torch.no_grad():
        u_st, u_ts, aux = network(source, target)
        if steps == 0:
            if history is not None:
                history.append(registration_loss(source, target, u_st, u_ts, aux, preset)[1])
            return u_st.detach(), u_ts.detach()
    del u_st, u_ts

    if preset.symmetric:
        # the network's forward already made raw_ts = -raw_st; keep that tie exactly
        velocity = aux["raw_st"].detach().clone().requires_grad_(True)
        params = [velocity]

        def raw() -> tuple[torch.Tensor, torch.Tensor]:
            return velocity, -velocity
    else:
        raw_st = aux["raw_st"].detach().clone().requires_grad_(True)
        raw_ts = aux["raw_ts"].detach().clone().requires_grad_(True)
        params = [raw_st, raw_ts]

        def raw() -> tuple[torch.Tensor, torch.Tensor]:
            return raw_st, raw_ts
    del aux

    step_fn = _adam(params, float(lr))
    requires_grad = [p.requires_grad for p in network.parameters()]
    try:
        # the weights are constants here: no gradient buffers for them
        for p in network.parameters():
            p.requires_grad_(False)
        for step in range(steps):
            if cancel is not None and cancel():
                raise RefinementCancelled(f"refinement cancelled after {step} of {steps} steps")
            raw_st_now, raw_ts_now = raw()
            u_st, u_ts = fields_from_raw(network, raw_st_now, raw_ts_now)
            loss, parts = registration_loss(source, target, u_st, u_ts,
                                            {"raw_st": raw_st_now, "raw_ts": raw_ts_now}, preset)
            loss.backward()
            step_fn()
            if history is not None:
                history.append(parts)
            if progress is not None:
                progress((step + 1) / steps, f"refine {step + 1}/{steps}: loss {parts['loss']:.4f} "
                         f"(NCC {parts['ncc_st']:.3f}/{parts['ncc_ts']:.3f})")
    finally:
        for p, flag in zip(network.parameters(), requires_grad):
            p.requires_grad_(flag)

    with torch.no_grad():
        raw_st_now, raw_ts_now = raw()
        u_st, u_ts = fields_from_raw(network, raw_st_now, raw_ts_now)
        if history is not None:
            history.append(registration_loss(source, target, u_st, u_ts,
                                             {"raw_st": raw_st_now, "raw_ts": raw_ts_now}, preset)[1])
    return u_st.detach(), u_ts.detach()
