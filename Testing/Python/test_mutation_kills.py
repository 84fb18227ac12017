"""Tests written to kill mutants that survived a mutation-testing run (docs/mutation_testing.md):
each names the behaviour the surviving mutant changed without any test noticing."""
from __future__ import annotations
