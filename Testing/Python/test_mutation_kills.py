"""Tests written to kill mutants that survived a mutation-testing run (docs/mutation_testing.md):
each names the behaviour the surviving mutant changed without any test noticing."""
from __future__ import annotations

import pytest

from InverseRegLib.metrics import bir, resolve_labels


def test_label_zero_is_a_valid_label_number():
    """Documented: whole numbers >= 0 (mutants `number <= 0` / `number < 1` survived)."""
    assert resolve_labels("0,2") == [0, 2]
    assert resolve_labels([0]) == [0]


def test_bir_without_a_labelled_target_says_so():
    import numpy as np
    with pytest.raises(ValueError, match="^target label map has no labelled voxels$"):
        bir(np.array([1, 2]), np.array([0, 0]))
