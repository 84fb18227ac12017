"""metrics.py: Dice and the paper's BIR on hand-built label maps with hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest

from InverseRegLib.metrics import FREESURFER_EVAL_LABELS, bir, dice_per_label, resolve_labels, restrict_labels

#     warped          target
#   1 1 0           1 0 0
#   2 2 0           2 2 2
WARPED = np.array([[1, 1, 0], [2, 2, 0]])
TARGET = np.array([[1, 0, 0], [2, 2, 2]])


def test_dice_hand_computed():
    scores = dice_per_label(WARPED, TARGET)
    # label 1: |A| = 2, |B| = 1, |A∩B| = 1 -> 2/3; label 2: |A| = 2, |B| = 3, |A∩B| = 2 -> 4/5
    assert scores == pytest.approx({1: 2.0 / 3.0, 2: 0.8})
    assert set(scores) == {1, 2}  # background 0 is not scored by default


def test_dice_perfect_disjoint_absent_and_foreign_labels():
    assert dice_per_label(TARGET, TARGET) == {1: 1.0, 2: 1.0}
    disjoint = dice_per_label(np.array([0, 0, 3, 3]), np.array([3, 3, 0, 0]))
    assert disjoint == {3: 0.0}
    # label 7 absent from both maps: undefined, skipped; label 5 only in the warped map: 0
    scores = dice_per_label(np.array([5, 1, 1]), np.array([0, 1, 1]), labels=[1, 5, 7])
    assert scores == {1: 1.0, 5: 0.0}


def test_dice_on_3d_arrays_matches_a_direct_count():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, (5, 6, 7)), rng.integers(0, 4, (5, 6, 7))
    scores = dice_per_label(a, b)
    for label in (1, 2, 3):
        inter = np.count_nonzero((a == label) & (b == label))
        expected = 2.0 * inter / (np.count_nonzero(a == label) + np.count_nonzero(b == label))
        assert scores[label] == pytest.approx(expected)


def test_dice_refuses_maps_of_different_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        dice_per_label(WARPED, TARGET[:, :2])


def test_bir_hand_computed():
    # labelled target voxels: 4; voxels whose labels differ: (0,1) 1 vs 0 and (1,2) 0 vs 2 -> 2
    assert bir(WARPED, TARGET) == pytest.approx(1.0 - 2.0 / 4.0)
    # restricted to label 2: target has 3 labelled voxels, one differs ((1,2)) -> 1 - 1/3
    assert bir(WARPED, TARGET, labels=[2]) == pytest.approx(1.0 - 1.0 / 3.0)
    assert bir(TARGET, TARGET) == 1.0


def test_bir_can_be_negative_and_needs_a_labelled_target():
    warped = np.array([1, 1, 1, 2])
    target = np.array([0, 0, 0, 1])  # one labelled voxel, all four differ
    assert bir(warped, target) == pytest.approx(1.0 - 4.0)
    with pytest.raises(ValueError, match="no labelled voxels"):
        bir(warped, np.zeros(4, dtype=int))


def test_restrict_labels():
    assert np.array_equal(restrict_labels(TARGET, [2]), np.array([[0, 0, 0], [2, 2, 2]]))
    assert restrict_labels(TARGET, None) is TARGET


def test_resolve_labels_accepts_names_text_and_numbers():
    assert resolve_labels(None) is None and resolve_labels("all") is None
    assert resolve_labels("FreeSurfer") == list(FREESURFER_EVAL_LABELS)
    assert resolve_labels("2,41 4") == [2, 41, 4]
    assert resolve_labels([2, 41, 2, np.int64(4)]) == [2, 41, 4]  # caller's order, once each
    assert resolve_labels(np.array([3.0, 5.0])) == [3, 5]


@pytest.mark.parametrize("bad", ["cortex", "2,x", [2.5], [-1], [True], [], 7])
def test_resolve_labels_refuses_with_the_value(bad):
    # a plain string used to be iterated character by character deep inside the label report
    with pytest.raises(ValueError, match="labels"):
        resolve_labels(bad)
