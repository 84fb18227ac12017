"""``python -m InverseRegLib`` is the ``inversereg`` command."""
import sys

from .cli import main

sys.exit(main())
