"""Exact inverse of a written displacement field: the backward field made the inverse of the forward one.

The network's two fields are inverse of each other only up to the integration and resampling
errors of the model grid (~0.2 mm on brains). This step replaces the backward field on the moving
grid by the inverse of the *whole* forward map (deformation and affine, exactly as written), to
numerical precision at every moving-grid voxel::

    find x(q) with  φ(x) = x + f(x) = q ,   b(q) = x(q) - q

by the preconditioned fixed-point iteration ``b ← b - P (b + f(q + b))`` where ``f`` is the forward
field sampled trilinearly (inside the fixed grid, as :func:`~.fields.inverse_consistency_error`
reads it; continued beyond it as below). ``P`` is, from the network's backward field, I + ∂b/∂q of that start (it approximates
(∂φ/∂x)^-1 at the answer: a quasi-Newton step, which converges where φ compresses or stretches
strongly and the plain fixed point diverges); from a zero start, the inverse of the affine's
linear part (identity without an affine). Points whose residual is below the tolerance drop out.

Where that iteration is slow or has to cut its steps back (a start far from the answer, as after
the full-resolution iterations of ``--quality best``, or a rough forward field) the point takes
Newton steps instead: ``P = (∂φ/∂x)^-1`` at its current ``q + b``, the forward field's Jacobian by
central differences of six trilinear samples. Costly per point, so only for the few points left.
A final pass takes the points still unconverged (a start in the wrong basin, as after ``best``'s
iterations: ~0.1 % of the voxels, the source of the backward field's folding) and restarts each
from its best neighbour's value before more Newton steps.

Cost: every moving voxel's iteration reads the forward field and its own value only, so the grid
is done in z-slabs (bounded work memory on any grid size). In each slab the first check and the
first step run on the whole slab with planar (3, N) arrays and the start's Jacobian by array
slices (no gathers, no per-point matrix products: on brains ~85 % of the voxels still iterate
then); only the ~35 % left after it are compacted and iterate further.

Beyond the fixed grid the forward map is continued from its border, ``φ(x) = φ(x_b) + L (x - x_b)``
with ``x_b`` the nearest grid point and ``L`` the affine's linear part (the identity without one):
exactly the affine where the field is affine at its border, and continuous everywhere. Moving-grid
points that map there are inverted like the rest, so the backward field has no seam (keeping
their starting values instead folded it along the line where the moving image reaches beyond the
fixed grid: 0.004 % of a brain's voxels). They lie outside the fixed image, so no measure over the
brain sees them; the statistics leave them out and count them (``outside_fraction``). Fixed and moving grids may differ in size, spacing, origin and direction.

All arrays: (z, y, x, 3) LPS displacements in mm, vector components in (x, y, z) order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .fields import _to_normalized, index_affine
from .grid import Geometry
from .sampling import grid_sample

#: stop when every point's residual |φ(q + b(q)) - q| is below this (mm); float32 coordinates of
#: ~100 mm carry ~1e-5 mm of rounding, so this is about as tight as float32 allows
DEFAULT_TOLERANCE_MM = 1e-3
#: iteration limit: from the network's starting point the brain converges in ~5 (1 mm brains)
DEFAULT_ITERATIONS = 12
#: every this many iterations the slow points switch to Newton steps (see :data:`_SLOW`)
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

    Every moving voxel's iteration depends on the forward field and its own value only, so the
    grid is inverted in z-slabs of about ``_SLAB`` voxels, each to convergence: peak memory is
    one slab's worth of work arrays on top of the two fields, whatever the grid's size.
    """
    if iterations < 1 or not tolerance > 0:
        raise ValueError(f"need iterations >= 1 and tolerance > 0, got {iterations}, {tolerance}")
    f = torch.as_tensor(forward, dtype=torch.float32)
    if tuple(f.shape) != (*fixed_geometry.array_shape, 3):
        raise ValueError(f"forward field shape {tuple(f.shape)} does not match the fixed grid "
                         f"{(*fixed_geometry.array_shape, 3)}")
    # (1, 3, D, H, W) for grid_sample as a channels-last view: the same samples at the same speed
    # as a contiguous copy, without the copy (0.6 GB on a 400x400x300 fixed grid)
    volume = f.permute(3, 0, 1, 2)[None]
    shape = (*moving_geometry.array_shape, 3)
    if initial is None:
        b = torch.zeros(shape, dtype=torch.float32)
    else:
        b = torch.as_tensor(initial, dtype=torch.float32).clone()
        if tuple(b.shape) != shape:
            raise ValueError(f"initial backward field shape {tuple(b.shape)} does not match the moving grid {shape}")
    k = _to_normalized(fixed_geometry)
    # grid_sample coordinate of q + b: K (M_m i + o_m - o_f) - 1 + K b
    grid_matrix = k @ moving_geometry.index_to_physical
    grid_offset = k @ (np.asarray(moving_geometry.origin) - np.asarray(fixed_geometry.origin)) - 1.0
    if initial is None:
        constant = np.eye(3) if linear is None else np.linalg.inv(np.asarray(linear, dtype=np.float64))
        precondition = _Preconditioner(b, moving_geometry, torch.as_tensor(constant, dtype=torch.float32))
    else:
        # quasi-Newton: the Jacobian I + ∂b/∂q of the starting field approximates
        # (∂φ/∂x)^-1 at the answer, so the iteration converges where φ compresses or stretches
        # strongly (det 0.1 .. 4 on brains) and the plain fixed point b = -f(q + b) diverges.
        precondition = _Preconditioner(b, moving_geometry, None)
    k_t = torch.as_tensor(k, dtype=torch.float32)
    extension = None
    if linear is not None:
        # beyond the fixed grid φ(x) = φ(x_b) + L (x - x_b), x_b the nearest grid point: the
        # affine's linear part continues the map (exactly the affine where the field is affine
        # at the border); in grid_sample units x - x_b = K^-1 (g - clamp(g))
        extension = torch.as_tensor((np.asarray(linear, dtype=np.float64) - np.eye(3)) @ np.linalg.inv(k),
                                    dtype=torch.float32)
    volume = _Extended(volume, extension)
    newton = _ForwardNewton(volume, fixed_geometry)
    total = _Totals()
    nx, ny, nz = moving_geometry.size
    rows = max(1, _SLAB // max(nx * ny, 1))
    for z0 in range(0, nz, rows):
        z1 = min(nz, z0 + rows)
        g0 = index_affine(moving_geometry, grid_matrix, grid_offset, z_range=(z0, z1)).view(-1, 3)
        _invert_slab(volume, b, (z0, z1), g0, k_t, precondition, newton, tolerance, iterations, total)
    _rescue(volume, b, moving_geometry, grid_matrix, grid_offset, k_t, newton, total)
    stats = InverseStats(total.iterations, total.sum / total.count if total.count else 0.0,
                         total.max, 1.0 - total.count / max(b.numel() // 3, 1))
    return b.numpy(), stats


#: voxels per z-slab of the moving grid (at least one slice): ~100 bytes of work arrays each
_SLAB = 2_000_000
#: the first step is taken on the whole slab when more than this fraction of it still iterates
_DENSE_FRACTION = 0.3
#: below this fraction of the slab still iterating, slow points get Newton steps every iteration
_NEWTON_BELOW = 0.05
#: Newton steps for the points left unconverged, after their restart from a neighbour's value
_RESCUE_ITERATIONS = 10
#: at most this many of those points (the worst) are restarted
_RESCUE_MAX = 200_000
#: half-width of the forward field's central differences for Newton steps, in fixed voxels
_NEWTON_H = 0.25
#: the iterating set is compacted when fewer than this fraction of it are left
_COMPACT = 0.6
#: a step that leaves more than this fraction of the squared residual marks a slow point, which
#: takes Newton steps from the next re-linearisation on
_SLOW = 0.1


@dataclass
class _Totals:
    """Statistics summed over slabs; ``left``: (flat indices, residuals) of the points inside
    that did not converge, per slab (their residuals are not in ``sum`` and ``max`` yet)."""
    iterations: int = 0
    sum: float = 0.0
    max: float = 0.0
    count: int = 0
    left: list = field(default_factory=list)


class _Preconditioner:
    """The per-point 3x3 step matrix J, stored by columns (``[e, a, n] = J_n[a, e]``, (3, 3, N),
    so each column is a contiguous planar block): a constant (zero start: the affine's inverse)
    or I + ∂b/∂q of the current backward field at the points (central differences of
    its six neighbours, one-sided at the grid's faces), gathered for those points only."""

    def __init__(self, b: torch.Tensor, geometry: Geometry, constant: torch.Tensor | None):
        self.flat = b.view(-1, 3)
        self.size = geometry.size  # (x, y, z)
        self.inverse = torch.as_tensor(np.linalg.inv(geometry.index_to_physical), dtype=torch.float32)
        self.constant = constant

    def dense(self, b: torch.Tensor, z_range: tuple[int, int], planar: torch.Tensor) -> torch.Tensor:
        """(3, 3, N) step matrices at every voxel of z-rows ``z_range`` of ``b`` (z, y, x, 3), in
        their flat order; the same central differences as :meth:`at`, by whole-array slices of
        ``planar``, those rows of ``b`` as a planar (3, N) copy (contiguous reads and writes)."""
        z0, z1 = z_range
        n = (z1 - z0) * b.shape[1] * b.shape[2]
        if self.constant is not None:
            return self.constant.T.reshape(3, 3, 1).expand(3, 3, n)
        nz, ny, nx = b.shape[:3]
        rows = planar.view(3, z1 - z0, ny, nx)
        grad = torch.empty(3, 3, n)  # [c, a] = ∂b_a / ∂index_c
        out = grad.view(3, 3, z1 - z0, ny, nx)
        for c, dim, size in ((0, 3, nx), (1, 2, ny)):  # index x, y
            if size < 2:
                grad[c].zero_()
            else:
                _central(rows, dim, 0, out[c])
        if nz < 2:
            grad[2].zero_()
        else:
            # the rows either side of the slab, where the grid has them, as neighbours
            below = [b[z0 - 1].permute(2, 0, 1)[:, None]] if z0 > 0 else []
            above = [b[z1].permute(2, 0, 1)[:, None]] if z1 < nz else []
            _central(torch.cat(below + [rows] + above, dim=1), 1, len(below), out[2])
        # [e, a] = Σ_c (M^-1)_ce ∂b_a/∂index_c = ∂b_a/∂p_e: one small matrix product (a scale
        # per axis when the grid's axes are the coordinate axes), plus I
        diagonal = torch.diagonal(self.inverse)
        if bool((self.inverse == torch.diag(diagonal)).all()):
            jac = grad.mul_(diagonal.view(3, 1, 1))
        else:
            jac = torch.mm(self.inverse.T.contiguous(), grad.view(3, -1)).view(3, 3, n)
        for a in range(3):
            jac[a, a] += 1.0
        return jac

    def at(self, flat: torch.Tensor) -> torch.Tensor:
        """(3, 3, N) step matrices at the flat voxel indices ``flat`` (N,)."""
        if self.constant is not None:
            return self.constant.T.reshape(3, 3, 1).expand(3, 3, flat.numel())
        nx, ny, nz = self.size
        grad = torch.zeros(3, 3, flat.numel())  # [a, c] = ∂b_a / ∂index_c
        stride = 1
        for c, n in enumerate((nx, ny, nz)):
            if n > 1:
                coordinate = torch.div(flat, stride, rounding_mode="floor").remainder_(n)
                up = (coordinate < n - 1).long()
                down = (coordinate > 0).long()
                difference = (self.flat.index_select(0, flat + up * stride)
                              - self.flat.index_select(0, flat - down * stride))
                grad[:, c] = (difference / (up + down).unsqueeze(1).float()).T
            stride *= n
        # ∂b_a/∂p_e = Σ_c ∂b_a/∂i_c (M^-1)_ce, plus the identity
        jac = torch.einsum("acn,ce->ean", grad, self.inverse)
        jac[0, 0] += 1.0
        jac[1, 1] += 1.0
        jac[2, 2] += 1.0
        return jac


class _ForwardNewton:
    """Newton step matrices (∂φ/∂x)^-1 at points x given in grid_sample coordinates of the fixed
    grid: the forward field's Jacobian by central differences of its trilinear samples a
    quarter voxel either side along each fixed-grid axis."""

    def __init__(self, volume: "_Extended", fixed_geometry: Geometry):
        self.volume = volume
        nx, ny, nz = fixed_geometry.size
        self.offsets = torch.zeros(3, 3)
        for c, size in enumerate((nx, ny, nz)):
            self.offsets[c, c] = 2.0 / max(size - 1, 1) * _NEWTON_H
        self.inverse = torch.as_tensor(np.linalg.inv(fixed_geometry.index_to_physical), dtype=torch.float32)

    def __call__(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(matrices, ok)``: (3, 3, N) inverse Jacobians at the (N, 3) ``grid`` points and (N,)
        bool: where ∂φ/∂x has a positive determinant (elsewhere the matrices are meaningless)."""
        n = grid.shape[0]
        points = torch.cat([grid + self.offsets[c] for c in range(3)] + [grid - self.offsets[c] for c in range(3)])
        values = _sample(self.volume, points).view(3, 2, 3, n)  # [a, sign, c, n]
        grad = (values[:, 0] - values[:, 1]).permute(2, 0, 1) / (2.0 * _NEWTON_H)  # (N, a, c) = ∂f_a/∂index_c
        jacobian = grad @ self.inverse + torch.eye(3)  # ∂φ_a/∂x_e
        ok = torch.linalg.det(jacobian) > 0
        jacobian[~ok] = torch.eye(3)
        return torch.linalg.inv(jacobian).permute(2, 1, 0), ok


def _invert_slab(volume: "_Extended", b: torch.Tensor, z_range: tuple[int, int], g0: torch.Tensor,
                 k: torch.Tensor, precondition: _Preconditioner, newton_matrices, tolerance: float,
                 iterations: int, total: _Totals) -> None:
    """Invert the moving voxels of z-rows ``z_range`` of ``b`` ((z, y, x, 3)) in place.

    ``g0`` (N, 3): their own grid_sample coordinates in the fixed grid; ``k`` (3, 3): mm to
    grid_sample units. Work arrays are planar (3, N): contiguous per component, so norms and the
    3x3 step are plain vector operations. The first step is taken on the whole slab (no
    gathers: most points still iterate then), later ones on the shrinking set left.
    """
    z0, z1 = z_range
    slab_b = b[z0:z1].view(-1, 3)
    n = slab_b.shape[0]
    first = z0 * b.shape[1] * b.shape[2]
    grid = _to_grid(g0, slab_b, k)
    # points whose start maps outside the fixed grid iterate too, on the continued forward map
    # (see the module's docstring); they are left out of the statistics
    inside = (grid.abs() <= 1.0).all(dim=1)
    bb = slab_b.T.contiguous()  # (3, N)
    rr = _sample(volume, grid).add_(bb)  # (3, N): φ(q + b) - q
    del grid
    norm2 = _squared_norm(rr)
    tolerance2 = tolerance * tolerance
    moving = norm2 > tolerance2
    done = 1
    count = int(moving.sum())
    if count and iterations > 1 and count > _DENSE_FRACTION * moving.numel():
        # one step on the whole slab; the points that have converged or lie outside take none
        dense_matrix = precondition.dense(b, z_range, bb)
        step = _apply(dense_matrix, rr).mul_(moving)
        trial = bb - step
        del step
        trial_r = _sample(volume, _to_grid(g0, trial.T, k)).add_(trial)
        new = _squared_norm(trial_r)
        better = new <= norm2
        if bool(better.all()):  # the usual case: no selection needed
            bb, rr, norm2 = trial, trial_r, new
        else:
            bb = torch.where(better, trial, bb)
            rr = torch.where(better, trial_r, rr)
            norm2 = torch.where(better, new, norm2)
        del trial, trial_r, new
        slab_b.copy_(bb.T)
        done = 2
        active = torch.nonzero(moving & (norm2 > tolerance2)).squeeze(1)
        # where the step made things worse it is retried at half length
        damping = torch.where(better.index_select(0, active), 1.0, 0.5)
        # the start's matrices serve the rest of the iteration (re-linearised where it is slow)
        step_matrix = dense_matrix.index_select(2, active)
        del dense_matrix
    else:
        active = torch.nonzero(moving).squeeze(1)
        damping = torch.ones(active.numel())
        step_matrix = precondition.at(active + first) if iterations > 1 else None
    if active.numel() and done < iterations:
        # the points still iterating, compacted as they converge
        bb, rr = bb.index_select(1, active), rr.index_select(1, active)
        gg = g0.index_select(0, active)
        old = norm2.index_select(0, active)
        while True:
            step = _apply(step_matrix, rr).mul_(damping)
            trial = bb - step
            trial_r = _sample(volume, _to_grid(gg, trial.T, k)).add_(trial)
            new = _squared_norm(trial_r)
            # backtracking: where the residual grew (the preconditioner is off, e.g. when the
            # start is far from the answer) keep the point and halve its step
            worse = new > old
            if bool(worse.any()):
                bb = torch.where(worse, bb, trial)
                rr = torch.where(worse, rr, trial_r)
                damping = torch.where(worse, damping * 0.5, torch.clamp(damping * 2.0, max=1.0))
            else:
                bb, rr = trial, trial_r
                damping.clamp_(max=0.5).mul_(2.0)  # back to full steps (frozen points stay at 0)
            slow = new > _SLOW * old  # this step shrank the residual by less than the factor
            old = torch.minimum(new, old)
            del step, trial, trial_r, new
            done += 1
            # stalled points (step halved to nothing) stop as converged ones do
            keep = (old > tolerance2) & (damping > 1e-3)
            left = int(keep.sum())
            if done >= iterations or left == 0:
                break
            if left < _COMPACT * keep.numel():
                norm2.index_copy_(0, active, old)
                slab_b.index_copy_(0, active, bb.T)
                index = torch.nonzero(keep).squeeze(1)
                active, gg, old = active.index_select(0, index), gg.index_select(0, index), old.index_select(0, index)
                bb, rr, damping = bb.index_select(1, index), rr.index_select(1, index), damping.index_select(0, index)
                step_matrix, slow = step_matrix.index_select(2, index), slow.index_select(0, index)
            else:
                damping.mul_(keep)  # converged points stay where they are
            # where the iteration is slow (the start's Jacobian is a poor guide where the start
            # was far off, e.g. after the full-resolution iterations moved the forward field, or
            # where the forward field is rough) take Newton steps: the forward map's own Jacobian
            # at the current point, inverted; at once where the steps had to be cut back
            trouble = (damping > 0) & (damping < 0.2)
            if done % RELINEARIZE_EVERY == 0 or active.numel() < _NEWTON_BELOW * n:
                trouble |= slow & (damping > 0)
            if bool(trouble.any()):
                redo = torch.nonzero(trouble).squeeze(1)
                if redo.numel():
                    step_matrix = step_matrix.contiguous()
                    newton, ok = newton_matrices(_to_grid(gg.index_select(0, redo), bb.index_select(1, redo).T, k))
                    redo, newton = redo[ok], newton[:, :, ok]
                    step_matrix.index_copy_(2, redo, newton)
                    damping.index_fill_(0, redo, 1.0)
        norm2.index_copy_(0, active, old)
        slab_b.index_copy_(0, active, bb.T)
    unconverged = inside & (norm2 > tolerance2)
    norm = norm2.sqrt_()
    total.iterations = max(total.iterations, done)
    count = int(inside.sum())
    if count:
        converged = norm * (inside & ~unconverged)  # the rest: 0 here, counted after the rescue
        total.sum += float(converged.sum(dtype=torch.float64))
        total.max = max(total.max, float(converged.max()))
        total.count += count
    left = torch.nonzero(unconverged).squeeze(1)
    if left.numel():
        total.left.append((left + first, norm.index_select(0, left)))


def _rescue(volume: "_Extended", b: torch.Tensor, geometry: Geometry, grid_matrix: np.ndarray,
            grid_offset: np.ndarray, k: torch.Tensor, newton_matrices, total: _Totals) -> None:
    """The points that did not converge, once more: each restarted from the best of its
    neighbours' values (up to two voxels along each axis; a point stuck in a wrong basin, as
    after the full-resolution iterations of ``--quality best``, usually has a converged
    neighbour on the right one), then Newton steps, each kept only where it lowers the residual.
    Updates ``b`` where the residual fell, and the statistics."""
    if not total.left:
        return
    flat = torch.cat([index for index, _ in total.left])
    norm2 = torch.cat([norm for _, norm in total.left]).square_()
    total.left = []
    if flat.numel() > _RESCUE_MAX:
        # ~80 samples per point: only the worst are worth it when the iteration failed widely
        worst = torch.topk(norm2, _RESCUE_MAX).indices
        rest = torch.ones(flat.numel(), dtype=torch.bool)
        rest[worst] = False
        kept = norm2[rest].sqrt()
        total.sum += float(kept.sum(dtype=torch.float64))
        total.max = max(total.max, float(kept.max()))
        flat, norm2 = flat[worst], norm2[worst]
    flat_b = b.view(-1, 3)
    nx, ny, nz = geometry.size
    index = torch.stack([flat.remainder(nx), flat.div(nx, rounding_mode="floor").remainder_(ny),
                         flat.div(nx * ny, rounding_mode="floor")], dim=1)  # (N, 3): x, y, z
    g0 = index.float() @ torch.as_tensor(grid_matrix, dtype=torch.float32).T + torch.as_tensor(grid_offset, dtype=torch.float32)
    best = flat_b.index_select(0, flat).T.contiguous()  # planar (3, N)
    limits = torch.tensor([nx - 1, ny - 1, nz - 1])
    strides = torch.tensor([1, nx, nx * ny])
    for axis in range(3):
        for shift in (1, -1, 2, -2):
            moved = index.clone()
            moved[:, axis] = (moved[:, axis] + shift).clamp_(0, int(limits[axis]))
            candidate = flat_b.index_select(0, (moved * strides).sum(dim=1)).T.contiguous()
            value = _squared_norm(_sample(volume, _to_grid(g0, candidate.T, k)).add_(candidate))
            take = value < norm2
            best = torch.where(take, candidate, best)
            norm2 = torch.where(take, value, norm2)
    for _ in range(_RESCUE_ITERATIONS):
        grid = _to_grid(g0, best.T, k)
        residual = _sample(volume, grid).add_(best)
        matrices, ok = newton_matrices(grid)
        trial = best - _apply(matrices, residual)
        value = _squared_norm(_sample(volume, _to_grid(g0, trial.T, k)).add_(trial))
        take = (value < norm2) & ok
        best = torch.where(take, trial, best)
        norm2 = torch.where(take, value, norm2)
    flat_b.index_copy_(0, flat, best.T)
    norm = norm2.sqrt_()
    total.sum += float(norm.sum(dtype=torch.float64))
    total.max = max(total.max, float(norm.max()))


def _central(source: torch.Tensor, dim: int, start: int, out: torch.Tensor) -> None:
    """Central differences along ``dim`` of ``source`` at its positions ``start ..
    start + out.shape[dim] - 1`` into ``out``, one-sided at the ends of ``source`` (which must
    have at least two positions along ``dim``)."""
    n, count = source.shape[dim], out.shape[dim]
    first, last = max(start, 1), min(start + count, n - 1)  # positions with both neighbours
    if last > first:
        torch.sub(source.narrow(dim, first + 1, last - first), source.narrow(dim, first - 1, last - first),
                  out=out.narrow(dim, first - start, last - first)).mul_(0.5)
    if start == 0:
        torch.sub(source.narrow(dim, 1, 1), source.narrow(dim, 0, 1), out=out.narrow(dim, 0, 1))
    if start + count == n:
        torch.sub(source.narrow(dim, n - 1, 1), source.narrow(dim, n - 2, 1), out=out.narrow(dim, n - 1 - start, 1))


def _to_grid(base: torch.Tensor, displacement: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``base + displacement @ k.T`` for (N, 3) rows (``displacement`` may be a transposed planar
    array): grid_sample coordinates of q + b. A per-component scale when ``k`` is diagonal (grids
    whose axes are the coordinate axes up to flips), four times faster than the matrix product."""
    diagonal = torch.diagonal(k)
    if bool((k == torch.diag(diagonal)).all()):
        return torch.addcmul(base, displacement, diagonal)
    return torch.addmm(base, displacement, k.T)


def _squared_norm(planar: torch.Tensor) -> torch.Tensor:
    """|v|² of planar (3, N) vectors; -> (N,)."""
    return torch.addcmul(torch.addcmul(planar[0] * planar[0], planar[1], planar[1]), planar[2], planar[2])


def _apply(matrix: torch.Tensor, planar: torch.Tensor) -> torch.Tensor:
    """Per-point ``J @ v`` for step matrices stored by columns, ``matrix[e, a] = J[a, e]``
    (3, 3, N), and planar (3, N) vectors; -> (3, N). Each column is a contiguous (3, N) block."""
    out = matrix[0] * planar[0]
    out.addcmul_(matrix[1], planar[1]).addcmul_(matrix[2], planar[2])
    return out


class _Extended:
    """The forward field (1, 3, D, H, W) sampled trilinearly, continued beyond its grid by its
    border value plus ``extension @ (g - clamp(g))`` (``extension``: 3x3 from grid_sample units to
    mm, or None: the border value alone)."""

    def __init__(self, volume: torch.Tensor, extension: torch.Tensor | None):
        self.volume = volume
        self.extension = extension


def _sample(forward: _Extended, grid: torch.Tensor) -> torch.Tensor:
    """Samples, planar (3, N), of ``forward`` at (N, 3) grid_sample coordinates."""
    out = grid_sample(forward.volume, grid.view(1, 1, 1, -1, 3), padding_mode="border")[0, :, 0, 0]
    if forward.extension is not None:
        excess = grid - grid.clamp(-1.0, 1.0)
        out = out + (excess @ forward.extension.T).T
    return out
