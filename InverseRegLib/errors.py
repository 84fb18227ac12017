"""The one exception type the library raises for problems a user can fix.

Front ends (the CLI, the Slicer module) print ``str(error)`` as a single line, so every message
names the offending file or value and, where there is one, the remedy.
"""


class InverseRegError(Exception):
    """A user-facing problem: bad input, a wrong model file, an unusable device."""
