"""Overlap measures on label maps: Dice per label and the paper's BIR.

Arrays are integer label maps of the same shape (any dimensionality).
"""
from __future__ import annotations

import numpy as np

#: FreeSurfer labels used for evaluation on the brain data (README of the shared data set):
#: cerebral WM and cortex, lateral ventricles, cerebellum WM and cortex, thalamus, caudate,
#: putamen, pallidum, 3rd/4th ventricles, brain stem, hippocampus, amygdala, CSF, ventral DC.
FREESURFER_EVAL_LABELS = (2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 28,
                          41, 42, 43, 46, 47, 49, 50, 51, 52, 53, 54, 60)


def resolve_labels(labels) -> list[int] | None:
    """The evaluation label set from what a caller gives: ``None`` or ``"all"`` (every label both
    maps share: returns None), ``"freesurfer"`` (:data:`FREESURFER_EVAL_LABELS`), text such as
    ``"2,3,41"``, or an iterable of whole numbers. Anything else raises ``ValueError`` naming it,
    before any work is done (a string is otherwise iterable character by character)."""
    if labels is None:
        return None
    if isinstance(labels, str):
        text = labels.strip().lower()
        if text == "all":
            return None
        if text == "freesurfer":
            return list(FREESURFER_EVAL_LABELS)
        parts = labels.replace(",", " ").split()
    else:
        try:
            parts = list(labels)
        except TypeError:
            raise ValueError(f"labels must be 'all', 'freesurfer' or whole numbers like 2,3,41; "
                             f"got {labels!r}") from None
    resolved = []
    for part in parts:
        try:
            number = float(part)
        except (TypeError, ValueError):
            number = float("nan")  # not a number: refused below
        if isinstance(part, bool) or not number.is_integer() or number < 0:
            raise ValueError(f"labels must be 'all', 'freesurfer' or whole numbers >= 0 like 2,3,41; "
                             f"got {labels!r}")
        resolved.append(int(number))
    if not resolved:
        raise ValueError(f"labels is empty ({labels!r}); pass None or 'all' for every shared label")
    return list(dict.fromkeys(resolved))  # the caller's order, each label once


def dice_per_label(warped: np.ndarray, target: np.ndarray, labels=None) -> dict[int, float]:
    """Dice 2|A∩B|/(|A|+|B|) for each label; ``labels`` defaults to those in ``target`` but 0.
    A label absent from both maps is skipped (Dice undefined)."""
    if warped.shape != target.shape:
        raise ValueError(f"label maps differ in shape: {warped.shape} vs {target.shape}")
    if labels is None:
        labels = [int(v) for v in np.unique(target) if v != 0]
    top = int(max(warped.max(initial=0), target.max(initial=0), max(labels, default=0))) + 1
    w = warped.ravel().astype(np.int64)
    t = target.ravel().astype(np.int64)
    size_w = np.bincount(w, minlength=top)
    size_t = np.bincount(t, minlength=top)
    inter = np.bincount(t[w == t], minlength=top)
    scores = {}
    for label in labels:
        label = int(label)
        total = size_w[label] + size_t[label] if label < top else 0
        if total > 0:
            scores[label] = float(2.0 * inter[label] / total)
    return scores


def restrict_labels(label_map: np.ndarray, labels) -> np.ndarray:
    """Set every label not in ``labels`` to 0."""
    if labels is None:
        return label_map
    return np.where(np.isin(label_map, list(labels)), label_map, 0)


def bir(warped: np.ndarray, target: np.ndarray, labels=None) -> float:
    """The paper's BIR: 1 - |binarised label difference| / |binarised target label|.

    The label difference is binarised as "voxel carries a different label in the two maps"; the
    target is binarised as "voxel is labelled". 1 is a perfect match; it can be negative when the
    warped labels disagree on more voxels than the target has.
    """
    warped = restrict_labels(warped, labels)
    target = restrict_labels(target, labels)
    foreground = int(np.count_nonzero(target))
    if foreground == 0:
        raise ValueError("target label map has no labelled voxels")
    return 1.0 - int(np.count_nonzero(warped != target)) / foreground
