"""Exact inverse of a written displacement field: the backward field made the inverse of the forward one.

The network's two fields are inverse of each other only up to the integration and resampling
errors of the model grid (~0.2 mm on brains). This step replaces the backward field on the moving
grid by the inverse of the *whole* forward map (deformation and affine, exactly as written), to
numerical precision at every moving-grid voxel::

    find x(q) with  φ(x) = x + f(x) = q ,   b(q) = x(q) - q

by the preconditioned fixed-point iteration ``b ← b - P (b + f(q + b))`` where ``f`` is the forward
field sampled trilinearly (border extension, as :func:`~.fields.inverse_consistency_error` reads
it) and ``P`` is the inverse of the affine's linear part (identity without an affine). ``P`` makes
the iteration contract at the rate of the deformable part's gradient only, so rotations and
scalings in the affine do not slow it down or make it diverge. The network's backward field is
the starting point, so a few iterations suffice; points whose residual is already below the
tolerance drop out of later iterations, which keeps the cost low.

Moving-grid points that the starting field maps outside the fixed grid keep the starting value:
the forward field carries no information about the map there (with an affine, the starting field
does). They lie outside the fixed image, so no measure over the brain sees them; they are counted
in the statistics. Fixed and moving grids may differ in size, spacing, origin and direction.

All arrays: (z, y, x, 3) LPS displacements in mm, vector components in (x, y, z) order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .fields import _times_transpose, _to_normalized, index_affine
from .grid import Geometry

#: stop when every point's residual |φ(q + b(q)) - q| is below this (mm); float32 coordinates of
#: ~100 mm carry ~1e-5 mm of rounding, so this is about as tight as float32 allows
DEFAULT_TOLERANCE_MM = 1e-3
#: iteration limit: from the network's starting point the brain converges in ~5 (1 mm brains)
DEFAULT_ITERATIONS = 12
#: the preconditioner is recomputed from the current iterate every this many iterations
RELINEARIZE_EVERY = 4


@dataclass
class InverseStats:
    iterations: int  # iterations run
    residual_mean_mm: float  # mean |φ(q + b(q)) - q| over the moving points inverted, at the end
    residual_max_mm: float
    outside_fraction: float  # moving points whose start maps outside the fixed grid (kept as they were)

    def as_report(self, prefix: str = "inverse_") -> dict:
        return {f"{prefix}iterations": self.iterations,
                f"{prefix}residual_mean_mm": self.residual_mean_mm,
                f"{prefix}residual_max_mm": self.residual_max_mm,
                f"{prefix}outside_fraction": self.outside_fraction}


def invert_field(forward, fixed_geometry: Geometry, moving_geometry: Geometry, initial=None,
                 linear: np.ndarray | None = None, tolerance: float = DEFAULT_TOLERANCE_MM,
                 iterations: int = DEFAULT_ITERATIONS) -> tuple[np.ndarray, InverseStats]:
    """The backward field on ``moving_geometry`` that inverts ``forward`` (on ``fixed_geometry``).

    ``forward``: (z, y, x, 3) numpy or tensor, fixed point p -> moving point p + f(p).
    ``initial``: (z', y', x', 3) starting backward field on the moving grid (e.g. the network's),
    default zero. ``linear``: 3x3 linear part of the affine contained in ``forward``
    (its Jacobian away from the deformation), used as preconditioner; None = identity.
    Returns ``(backward, stats)``: (z', y', x', 3) float32 and :class:`InverseStats`.
    """
    if iterations < 1 or not tolerance > 0:
        raise ValueError(f"need iterations >= 1 and tolerance > 0, got {iterations}, {tolerance}")
    f = torch.as_tensor(forward, dtype=torch.float32)
    if tuple(f.shape) != (*fixed_geometry.array_shape, 3):
        raise ValueError(f"forward field shape {tuple(f.shape)} does not match the fixed grid "
                         f"{(*fixed_geometry.array_shape, 3)}")
    volume = f.permute(3, 0, 1, 2)[None].contiguous()  # (1, 3, D, H, W) for grid_sample
    shape = (*moving_geometry.array_shape, 3)
    if initial is None:
        b = torch.zeros(shape, dtype=torch.float32)
    else:
        b = torch.as_tensor(initial, dtype=torch.float32).clone()
        if tuple(b.shape) != shape:
            raise ValueError(f"initial backward field shape {tuple(b.shape)} does not match the moving grid {shape}")
    k = _to_normalized(fixed_geometry)
    # grid_sample coordinate of q + b: K (M_m i + o_m - o_f) - 1 + K b
    g0 = index_affine(moving_geometry, k @ moving_geometry.index_to_physical,
                      k @ (np.asarray(moving_geometry.origin) - np.asarray(fixed_geometry.origin)) - 1.0)
    linear_inverse = None if linear is None else torch.as_tensor(
        np.linalg.inv(np.asarray(linear, dtype=np.float64)).T.copy(), dtype=torch.float32)
    flat_b, flat_g0 = b.view(-1, 3), g0.view(-1, 3)
    # first iteration on the whole grid; most points (background, smooth regions) stop here
    grid = flat_g0 + _times_transpose(flat_b, k)
    # points whose start maps outside the fixed grid keep it: the forward field says nothing
    # about the map there (its border extension is not the affine), the starting field does
    inside = (grid.abs() <= 1.0).all(dim=1)
    residual = _sample(volume, grid).add_(flat_b)  # φ(q + b) - q
    del grid
    residual_norm = torch.linalg.vector_norm(residual, dim=1)
    done = 1
    active = torch.nonzero((residual_norm > tolerance) & inside).squeeze(1)
    if active.numel():
        if initial is not None:
            # quasi-Newton: the Jacobian I + ∂b/∂q of the starting field approximates
            # (∂φ/∂x)^-1 at the answer, so the iteration converges where φ compresses or stretches
            # strongly (det 0.1 .. 4 on brains) and the plain fixed point b = -f(q + b) diverges.
            precondition = _jacobian_at(b, moving_geometry, active)
        else:
            precondition = (torch.eye(3) if linear_inverse is None else linear_inverse.T).expand(active.numel(), 3, 3)
        # the points still iterating, compacted (N, ...) and shrunk as they converge
        bb, gg, rr = (t.index_select(0, active) for t in (flat_b, flat_g0, residual))
        del residual
        old_norm = residual_norm.index_select(0, active)
        damping = torch.ones(active.numel(), 1)
        while True:
            step = torch.bmm(precondition, rr.unsqueeze(2)).squeeze(2) * damping
            trial = bb - step
            trial_r = trial + _sample(volume, gg + _times_transpose(trial, k))
            norm = torch.linalg.vector_norm(trial_r, dim=1)
            # backtracking: where the residual grew (the preconditioner is off, e.g. when the
            # start is far from the answer) keep the point and halve its step
            worse = norm > old_norm
            better = ~worse
            bb = torch.where(worse[:, None], bb, trial)
            rr = torch.where(worse[:, None], rr, trial_r)
            norm = torch.where(worse, old_norm, norm)
            damping = torch.where(worse[:, None], damping * 0.5, torch.clamp(damping * 2.0, max=1.0))
            old_norm = norm
            residual_norm.index_copy_(0, active, norm)
            done += 1
            keep = (norm > tolerance) & (better | (damping[:, 0] > 1e-3))
            if done >= iterations or not bool(keep.any()):
                flat_b.index_copy_(0, active, bb)
                break
            finished = ~keep
            flat_b.index_copy_(0, active[finished], bb[finished])
            active, bb, gg, rr, precondition = active[keep], bb[keep], gg[keep], rr[keep], precondition[keep]
            old_norm, damping = old_norm[keep], damping[keep]
            if initial is not None and done % RELINEARIZE_EVERY == 0:
                # the start's Jacobian is a poor guide where the start was far off (e.g. after the
                # full-resolution iterations moved the forward field): take the current iterate's
                flat_b.index_copy_(0, active, bb)
                precondition = _jacobian_at(b, moving_geometry, active)
    inside_norm = residual_norm[inside]
    stats = InverseStats(done, float(inside_norm.mean()) if inside_norm.numel() else 0.0,
                         float(inside_norm.max()) if inside_norm.numel() else 0.0,
                         1.0 - float(inside.float().mean()))
    return b.numpy(), stats


def _sample(volume: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Trilinear samples (N, 3) of the (1, 3, D, H, W) ``volume`` at (N, 3) grid_sample coordinates."""
    return F.grid_sample(volume, grid.view(1, 1, 1, -1, 3), mode="bilinear", padding_mode="border",
                         align_corners=True)[0, :, 0, 0].T


def _jacobian_at(displacement: torch.Tensor, geometry: Geometry, flat: torch.Tensor) -> torch.Tensor:
    """I + ∂d/∂p of a (z, y, x, 3) physical field at the voxels with flat indices ``flat``, by
    central differences (one-sided at the grid's faces); -> (N, 3, 3), [a, c] = ∂(p + d)_a / ∂p_c."""
    columns = []
    for dim in (2, 1, 0):  # index x, y, z
        n = displacement.shape[dim]
        if n < 2:
            columns.append(torch.zeros(flat.numel(), 3))
            continue
        g = torch.empty_like(displacement)
        if n > 2:
            torch.sub(displacement.narrow(dim, 2, n - 2), displacement.narrow(dim, 0, n - 2),
                      out=g.narrow(dim, 1, n - 2)).mul_(0.5)
        torch.sub(displacement.narrow(dim, 1, 1), displacement.narrow(dim, 0, 1), out=g.narrow(dim, 0, 1))
        torch.sub(displacement.narrow(dim, n - 1, 1), displacement.narrow(dim, n - 2, 1), out=g.narrow(dim, n - 1, 1))
        columns.append(g.view(-1, 3).index_select(0, flat))
        del g
    grad = torch.stack(columns, dim=2)  # [a, b] = ∂d_a / ∂index_b
    inverse = torch.as_tensor(np.linalg.inv(geometry.index_to_physical), dtype=torch.float32)
    return (grad @ inverse).add_(torch.eye(3))


def _residual(volume: torch.Tensor, g0: torch.Tensor, b: torch.Tensor, k: np.ndarray,
              active: torch.Tensor) -> torch.Tensor:
    """|φ(q + b(q)) - q| (mm) at the flat indices ``active``; -> (N,)."""
    bb, gg = b[active], g0[active]
    return torch.linalg.vector_norm(bb + _sample(volume, gg + _times_transpose(bb, k)), dim=1)
