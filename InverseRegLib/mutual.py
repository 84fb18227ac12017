"""Both written fields adjusted together, so that each is the other's inverse in both orders.

:mod:`~.inverse` makes the backward field b the inverse of the forward one f at every voxel of
the moving grid, so the moving order ``|f(q + b(q)) + b(q)|`` is ~1e-3 mm. The fixed order
``|b(x + f(x)) + f(x)|`` reads b *between* its voxels, where trilinear interpolation cannot follow
the kinks of the exact inverse (f is trilinear itself): 0.04-0.17 mm on brains, and no backward
field alone does much better (a 0.5 mm backward grid only halves it). Moving both fields does:
this minimises ::

    mean over the fixed mask of |f(x) + b(x + f(x))|²  +  mean over the moving mask of |b(q) + f(q + b(q))|²

by Adam on the two fields' voxel values (a step of at most ``step_mm`` per voxel and iteration),
from the exact inverse's pair, until ``steps`` have run or both orders are within ``target_mm``.
Both orders fall together, while the forward field drifts: reaching 0.01 mm in both orders moves
it by ~0.15-0.17 mm on average on 1 mm brains, whatever the rate, and the fields get smoother in
the process, which costs Dice (``fast`` on the report pairs 11 <-> 12: 0.0099 / 0.0098 mm in 107
steps at the default rate, for 0.0059 mean Dice): an option for those who need the pair inverse
in both orders, not the default. The rate (0.04 mm) was chosen on choice pairs 03 <-> 04, where
it needs 0.45x the steps of 0.01 mm for the same Dice at the target (docs/benchmark.md, eighth and
ninth rounds). Under 1 s per step on two CPU cores for a 1 mm brain (1.5 M voxels in each mask),
so ~1.5 minutes for 0.01 mm. Sharp fields (``best``'s) can fold during the steps; register()
are repaired (:mod:`~.unfold`), which raises the error again there; :func:`make_written_pair_inverse`
(what register() runs) then runs a second round aiming lower.

The masks: the images' foregrounds, grown by :data:`MASK_MARGIN` voxels so the error is
lowered a little beyond where it is measured. Points mapped beyond a grid read its border
values (as :func:`~.quality.inverse_consistency` does).

All arrays: (z, y, x, 3) LPS displacements in mm on their image grids.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .fields import _to_normalized, physical_points
from .grid import Geometry
from .unfold import Repair, repair_folds

#: Adam's step (mm): the largest change of a voxel's displacement per iteration
DEFAULT_STEP_MM = 0.04
#: fewer points than this per thread are sampled on one thread (the split's bookkeeping costs more)
MIN_POINTS_PER_THREAD = 65_536
#: the foreground masks are grown by this many voxels (a cube) before the optimisation
MASK_MARGIN = 2
#: with a target, at most this many rounds of steps and fold repair (:func:`make_written_pair_inverse`)
ROUNDS = 3


@dataclass
class MutualStats:
    steps_run: int  # iterations run (fewer than asked when the target was reached)
    target_mm: float | None  # the steps stop once both orders' means are at most this (None: all run)
    reached_target: bool  # whether they did (then ``steps_run`` is how many it took)
    fixed_order_mm: float  # mean |b(x + f(x)) + f(x)| over the fixed mask, after the steps
    fixed_order_before_mm: float  # the same before them
    moving_order_mm: float  # mean |f(q + b(q)) + b(q)| over the moving mask, after
    moving_order_before_mm: float  # and before
    forward_change_mm: float  # mean |f_after - f_before| over the fixed mask

    def as_report(self, prefix: str = "mutual_") -> dict:
        return {f"{prefix}{k}": v for k, v in self.__dict__.items()}


class _Side:
    """One field as a trainable (3, D, H, W) volume, its mask's voxels and the map from physical
    points to its grid_sample coordinates."""

    def __init__(self, field, geometry: Geometry, mask: np.ndarray, margin: int, device: torch.device):
        values = torch.as_tensor(np.asarray(field, dtype=np.float32))
        if tuple(values.shape) != (*geometry.array_shape, 3):
            raise ValueError(f"field shape {tuple(values.shape)} does not match its grid {(*geometry.array_shape, 3)}")
        if tuple(mask.shape) != geometry.array_shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match its grid {geometry.array_shape}")
        self.device = device
        self.volume = values.permute(3, 0, 1, 2).contiguous().to(device).requires_grad_(True)
        grown = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None].to(device)
        if margin > 0:
            grown = F.max_pool3d(grown, 2 * margin + 1, stride=1, padding=margin)
        self.index = grown.view(-1).nonzero()[:, 0]
        # which of those voxels are the mask's own: where a target is judged, as the report's ICE is
        self.core = torch.from_numpy(np.ascontiguousarray(mask, dtype=bool)).to(device).view(-1)[self.index]
        self.points = physical_points(geometry, device).view(-1, 3)[self.index]
        k = _to_normalized(geometry)
        self.k_t = torch.as_tensor(k.T, dtype=torch.float32, device=device)
        self.origin = torch.as_tensor(geometry.origin, dtype=torch.float32, device=device)

    def at_voxels(self) -> torch.Tensor:
        """(N, 3) displacements at the mask's voxels."""
        return self.volume.view(3, -1)[:, self.index].t()

    def sample(self, points: torch.Tensor) -> torch.Tensor:
        """(N, 3) displacements at physical points (N, 3), trilinear, border beyond the grid.

        The points are cut into one batch entry per thread, the volume repeated as a stride-0
        view: PyTorch's CPU grid_sample, forward and backward, runs one batch entry per core
        (as :mod:`~.sampling` does without gradients; 1.8x on two cores); a GPU takes them whole."""
        grid = (points - self.origin) @ self.k_t - 1.0
        count = grid.shape[0]
        parts = max(1, min(torch.get_num_threads(), count // MIN_POINTS_PER_THREAD)) if self.device.type == "cpu" else 1
        per_part = -(-count // parts)
        if per_part * parts > count:  # padded with copies of the last point, dropped below
            grid = torch.cat([grid, grid[-1:].expand(per_part * parts - count, 3)])
        out = F.grid_sample(self.volume[None].expand(parts, -1, -1, -1, -1), grid.view(parts, 1, 1, per_part, 3),
                            align_corners=True, padding_mode="border")  # (parts, 3, 1, 1, per_part)
        return out.permute(0, 4, 1, 2, 3).reshape(parts * per_part, 3)[:count]

    def field(self) -> np.ndarray:
        return self.volume.detach().permute(1, 2, 3, 0).contiguous().cpu().numpy()


def _mean_norm(residuals: torch.Tensor) -> float:
    return float(residuals.norm(dim=-1).mean()) if len(residuals) else 0.0


def _judged(fixed: _Side, moving: _Side, e_fixed: torch.Tensor, e_moving: torch.Tensor) -> tuple[float, float]:
    """Both orders' mean error over the masks' own voxels (not the margin they were grown by)."""
    with torch.no_grad():
        return _mean_norm(e_fixed[fixed.core]), _mean_norm(e_moving[moving.core])


def _errors(fixed: _Side, moving: _Side) -> tuple[torch.Tensor, torch.Tensor]:
    """(fixed-order, moving-order) residual vectors at the two masks' voxels."""
    f = fixed.at_voxels()
    b = moving.at_voxels()
    return f + moving.sample(fixed.points + f), b + fixed.sample(moving.points + b)


def make_mutually_inverse(forward, fixed_geometry: Geometry, backward, moving_geometry: Geometry,
                          fixed_mask: np.ndarray, moving_mask: np.ndarray, steps: int,
                          step_mm: float | None = None, margin: int = MASK_MARGIN,
                          target_mm: float | None = None,
                          report: Callable[[int, float], None] | None = None,
                          cancel: Callable[[], bool] | None = None,
                          device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray, MutualStats]:
    """``(forward, backward, stats)`` after ``steps`` joint iterations (see the module docstring).

    ``forward`` (z, y, x, 3) on ``fixed_geometry`` (fixed -> moving points), ``backward`` on
    ``moving_geometry``; neither is modified. ``fixed_mask`` / ``moving_mask``: (z, y, x) bool on
    each grid, where the inverse consistency counts. ``step_mm``: Adam's rate (None:
    :data:`DEFAULT_STEP_MM`). ``target_mm``: stop as soon as both orders' means are at most this
    (measured on the residuals each step computes anyway, so the check costs nothing); ``steps``
    is then the most that run. ``report(step, error_mm)`` hears of every step, with the worse
    order's mean error when it started; ``cancel()`` is asked before each and stops with
    :class:`~.pipeline.Cancelled`. The target, the reported errors and the statistics count the
    masks' own voxels, as register()'s ICE does; the loss also counts the margin they are grown by.
    ``device``: where the steps run (register() passes its own; on a GPU they should take a
    small part of the CPU's ~0.6 s each, not measured here); the fields come back as numpy
    arrays either way.
    """
    step_mm = DEFAULT_STEP_MM if step_mm is None else step_mm
    if steps < 0 or not step_mm > 0:
        raise ValueError(f"need steps >= 0 and step_mm > 0, got {steps}, {step_mm}")
    if target_mm is not None and not target_mm > 0:
        raise ValueError(f"need target_mm > 0 (or None), got {target_mm}")
    device = torch.device(device)
    fixed = _Side(forward, fixed_geometry, fixed_mask, margin, device)
    moving = _Side(backward, moving_geometry, moving_mask, margin, device)
    start = fixed.at_voxels().detach().clone()
    optimiser = torch.optim.Adam([fixed.volume, moving.volume], lr=step_mm, fused=True)
    with torch.no_grad():
        before = _judged(fixed, moving, *_errors(fixed, moving))
    ran, reached = 0, False
    for step in range(steps):
        if cancel is not None and cancel():
            from .pipeline import Cancelled
            raise Cancelled(f"registration cancelled during mutual-inverse step {step + 1}")
        e_fixed, e_moving = _errors(fixed, moving)
        error = max(_judged(fixed, moving, e_fixed, e_moving))  # the fields as the previous step left them
        if target_mm is not None and error <= target_mm:
            reached = True
            break
        loss = e_fixed.pow(2).sum() / max(len(e_fixed), 1) + e_moving.pow(2).sum() / max(len(e_moving), 1)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        ran = step + 1
        if report is not None:
            report(ran, error)
    with torch.no_grad():
        after = _judged(fixed, moving, *_errors(fixed, moving))
        reached = reached or (target_mm is not None and max(after) <= target_mm)
        stats = MutualStats(ran, target_mm, reached, after[0], before[0], after[1], before[1],
                            _mean_norm((fixed.at_voxels() - start)[fixed.core]))
    return fixed.field(), moving.field(), stats


def both_orders(forward, fixed_geometry: Geometry, backward, moving_geometry: Geometry, fixed_mask: np.ndarray,
                moving_mask: np.ndarray, device: str | torch.device = "cpu") -> tuple[float, float]:
    """Mean fixed-order and moving-order error (mm) of a pair of fields over the two masks, as
    :func:`make_mutually_inverse` judges its target."""
    device = torch.device(device)
    fixed = _Side(forward, fixed_geometry, fixed_mask, MASK_MARGIN, device)
    moving = _Side(backward, moving_geometry, moving_mask, MASK_MARGIN, device)
    with torch.no_grad():
        return _judged(fixed, moving, *_errors(fixed, moving))


def make_written_pair_inverse(forward, fixed_geometry: Geometry, backward, moving_geometry: Geometry,
                              fixed_mask: np.ndarray, moving_mask: np.ndarray, steps: int,
                              target_mm: float | None = None, report: Callable[[int, float], None] | None = None,
                              cancel: Callable[[], bool] | None = None, device: str | torch.device = "cpu",
                              ) -> tuple[np.ndarray, np.ndarray, Repair, Repair, dict]:
    """The steps of :func:`make_mutually_inverse`, then the fold repair of both fields, judged on
    the fields as written. Sharp fields (best's) fold during the steps and smoothing the folds out
    raises the error again (11 -> 12: 0.0099 mm in the loop, 0.014 written): with a target, the
    steps then go on, aiming lower by what the repair added (at least half the target), for at most
    :data:`ROUNDS` rounds and ``steps`` steps in all. ``report(step, error_mm)`` counts the steps
    over all rounds. Returns ``(forward, backward, forward repair, backward repair, report)``: the
    repairs' counts summed over the rounds, the report's keys prefixed ``mutual_``."""
    import dataclasses
    start, aim, done, rounds, first, repairs = forward, target_mm, 0, 0, None, []
    while True:
        rounds += 1
        forward, backward, stats = make_mutually_inverse(
            forward, fixed_geometry, backward, moving_geometry, fixed_mask, moving_mask, steps - done,
            target_mm=aim, report=None if report is None else (lambda step, error: report(done + step, error)),
            cancel=cancel, device=device)
        first, done = first or stats, done + stats.steps_run
        forward, forward_repair = repair_folds(forward, fixed_geometry)
        backward, backward_repair = repair_folds(backward, moving_geometry)
        repairs.append((forward_repair, backward_repair))
        loop_error = max(stats.fixed_order_mm, stats.moving_order_mm)
        written = None
        if forward_repair.changed or backward_repair.changed:
            written = both_orders(forward, fixed_geometry, backward, moving_geometry, fixed_mask, moving_mask, device)
        error = loop_error if written is None else max(written)
        if target_mm is None or error <= target_mm or done >= steps or rounds == ROUNDS:
            break
        aim = max(aim - (error - loop_error), 0.5 * target_mm)
    out = dataclasses.replace(stats, steps_run=done, fixed_order_before_mm=first.fixed_order_before_mm,
                              moving_order_before_mm=first.moving_order_before_mm, target_mm=target_mm,
                              reached_target=target_mm is not None and error <= target_mm).as_report()
    change = np.linalg.norm((np.asarray(forward) - np.asarray(start))[fixed_mask], axis=-1)
    out.update({"mutual_forward_change_mm": float(change.mean()) if change.size else 0.0, "mutual_rounds": rounds})
    if written is not None:
        out.update({"mutual_fixed_order_after_repair_mm": written[0], "mutual_moving_order_after_repair_mm": written[1]})

    def summed(side: int) -> Repair:
        return dataclasses.replace(repairs[-1][side], folded_before=sum(r[side].folded_before for r in repairs),
                                   changed=sum(r[side].changed for r in repairs))
    return forward, backward, summed(0), summed(1), out
