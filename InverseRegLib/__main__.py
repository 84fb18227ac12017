"""``python -m InverseRegLib`` is the ``inversereg`` command."""
from .cli import run

run()
