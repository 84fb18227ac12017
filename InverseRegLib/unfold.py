"""Folds removed from a displacement field by smoothing it locally, where and only where it folds.

The iterative stages after the network (:mod:`~.polish`, :mod:`~.fullres`) compose small smoothed
updates, which keeps a fold-free field fold-free in the continuum; on the voxel grid, with little
smoothing of the field itself, a few voxels can still end with det(∂φ/∂x) ≤ 0 (measured: up to
0.0002 % of a 1 mm brain, i.e. about ten voxels, on one pair in six). The exact inverse of such a
sharp forward field (:mod:`~.inverse`) folds where the forward one compresses almost to a point:
its inverse stretches there by more than a voxel per voxel, which central differences see as
folds (``--quality best``: ~50 voxels of a 1 mm brain with the third round's settings, ~300 with
the fourth's sharper ones, all inside the brain).

This step finds them (central differences, as every folding figure here is measured), replaces
the field in a small neighbourhood of each by its Gaussian-smoothed value there, and repeats
until no voxel folds or the rounds run out: first gently (:data:`GENTLE`: σ 0.7 voxel, the folding
voxels and one voxel around them), then, for what is left, more widely (σ 1, two voxels around).
The field elsewhere is untouched, bit for bit. The smoothing runs in one box per 16-voxel cell
that holds folds, not one box around all of them (scattered over a brain, that was most of the
grid: 1.0 s against 0.2 s on a best backward field), each reaching 3σ beyond its folds, so the
values are those of smoothing the whole field. On the backward field this gives up exactness of
the inverse at the changed voxels only (measured on 11→12: ~1400-2100 voxels changed and
moving-order inverse consistency 0.0006 → 0.002 mm mean over the brain with the third round's
best; 6632 voxels and 0.006 mm with the fourth's).

Arrays: (z, y, x, 3) LPS displacements in mm on ``geometry``.
"""
from __future__ import annotations

from dataclasses import dataclass, field as dataclass_field

import numpy as np
import torch
import torch.nn.functional as F

from .fields import jacobian_determinant
from .grid import Geometry

#: rounds of local smoothing at most, per pass; each smooths the neighbourhoods still folding once more
ROUNDS = 8
#: Gaussian of the local smoothing (voxels) and voxels around a folding voxel that take the
#: smoothed values: the first pass, then the second for the folds it left
GENTLE = (0.7, 1)
SIGMA = 1.0
MARGIN = 2
#: voxels per side of the cells that group folding voxels into boxes (:func:`_clusters`)
_BLOCK = 16


@dataclass
class Repair:
    folded_before: int  # voxels with det <= 0 at the start
    folded_after: int  # and at the end (0 unless the rounds ran out)
    rounds: int
    changed: int  # voxels whose displacement was replaced
    #: det(∂φ/∂x) of the returned field, (z, y, x), as :func:`~.fields.jacobian_determinant`
    determinant: np.ndarray | None = dataclass_field(default=None, repr=False, compare=False)


def repair_folds(field, geometry: Geometry, rounds: int = ROUNDS, det: np.ndarray | None = None,
                 passes: tuple[tuple[float, int], ...] = (GENTLE, (SIGMA, MARGIN))) -> tuple[np.ndarray, Repair]:
    """``(field without folds, Repair)`` for a (z, y, x, 3) field (numpy or tensor; not modified).

    ``passes``: (sigma, margin) of each pass of at most ``rounds`` rounds, the next one only for
    the folds the previous left. ``det``: the field's Jacobian determinant if the caller has it.
    Returns the input itself (as float32 numpy) when nothing folds, so the common case costs one
    Jacobian (none with ``det``). ``det`` is judged over the whole grid."""
    out = np.ascontiguousarray(torch.as_tensor(field).numpy() if isinstance(field, torch.Tensor) else field,
                               dtype=np.float32)
    det = jacobian_determinant(out, geometry) if det is None else det
    bad = det <= 0
    before = int(bad.sum())
    if before == 0:
        return out, Repair(0, 0, 0, 0, det)
    out, det = out.copy(), det.copy()  # the caller's arrays are never written
    changed = np.zeros(bad.shape, dtype=bool)
    done = 0
    for sigma, margin in passes:
        if not bad.any():
            break
        done += _smooth_rounds(out, det, bad, changed, geometry, rounds, sigma, margin)
    return out, Repair(before, int(bad.sum()), done, int(changed.sum()), det)


def _clusters(bad: np.ndarray, pad: int) -> list[tuple[tuple[slice, slice, slice], np.ndarray]]:
    """``(box, points)`` per :data:`_BLOCK`-voxel cell that holds folding voxels: ``points`` (n, 3) those
    voxels' indices, ``box`` their bounding box grown by ``pad`` and clipped to the grid (folds lie
    scattered over a brain; one box around all of them would be most of the grid)."""
    where = np.argwhere(bad)
    cells, which = np.unique(where // _BLOCK, axis=0, return_inverse=True)
    boxes = []
    for cell in range(len(cells)):
        points = where[which.reshape(-1) == cell]
        low, high = points.min(axis=0) - pad, points.max(axis=0) + 1 + pad
        boxes.append((tuple(slice(max(0, int(a)), min(n, int(b))) for a, b, n in zip(low, high, bad.shape)), points))
    return boxes


def _smooth_rounds(out: np.ndarray, det: np.ndarray, bad: np.ndarray, changed: np.ndarray, geometry: Geometry,
                   rounds: int, sigma: float, margin: int) -> int:
    """Up to ``rounds`` rounds of local smoothing of ``out`` (in place; ``det``, ``bad`` and
    ``changed`` kept current); returns the rounds run.

    Each round smooths the field in a box around each cluster of folding voxels and takes the
    smoothed values within ``margin`` of that cluster's voxels. The boxes reach 3 sigma beyond
    those, so each value is what smoothing the whole field would give there (all from the field
    before the round), whichever box it comes from."""
    from .fullres import gaussian_smooth
    from .polish import _crop
    radius = margin + int(np.ceil(3 * sigma)) + 1
    done = 0
    while bad.any() and done < rounds:
        done += 1
        updates = []
        for box, points in _clusters(bad, radius):
            crop = torch.from_numpy(np.ascontiguousarray(out[box])).permute(3, 0, 1, 2)[None]
            smooth = gaussian_smooth(crop.contiguous(), sigma)[0].permute(1, 2, 3, 0).numpy()
            seeds = np.zeros(smooth.shape[:3], dtype=np.float32)  # this cluster's folds only
            local = points - np.asarray([b.start for b in box])
            seeds[local[:, 0], local[:, 1], local[:, 2]] = 1.0
            grow = torch.from_numpy(seeds)[None, None]
            near = F.max_pool3d(grow, 2 * margin + 1, stride=1, padding=margin)[0, 0].numpy() > 0
            updates.append((box, near, smooth[near]))
        for box, near, values in updates:
            out[box][near] = values
            changed[box] |= near
        for box, _, _ in updates:
            # the Jacobian only where it can have changed (the box, one voxel beyond for the differences)
            outer = tuple(slice(max(0, s.start - 1), min(n, s.stop + 1)) for s, n in zip(box, bad.shape))
            det_box = jacobian_determinant(out[outer], _crop(geometry, outer))
            inner = tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(box, outer))
            det[box] = det_box[inner]
            bad[box] = det[box] <= 0
    return done
