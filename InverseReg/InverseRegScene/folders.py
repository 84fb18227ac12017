"""Temporary folders for registration runs: the module deletes only folders it created itself.

An earlier version deleted "the parent of the last result folder", which, after a result was
loaded from a user's own folder, removed the user's enclosing folder and everything in it.
"""
from __future__ import annotations

import os
import shutil
import tempfile


class TemporaryFolders:
    """Creates run folders and remembers them; ``release`` deletes one of them, never anything else."""

    def __init__(self, prefix: str = "InverseReg-") -> None:
        self.prefix = prefix
        self._created: set[str] = set()

    def create(self) -> str:
        path = os.path.realpath(tempfile.mkdtemp(prefix=self.prefix))
        self._created.add(path)
        return path

    def owns(self, path: str) -> bool:
        """True if ``path`` is one of the created folders or lies inside one."""
        real = os.path.realpath(path)
        return any(real == top or real.startswith(top + os.sep) for top in self._created)

    def release(self, path: str | None) -> bool:
        """Delete the created folder that holds ``path``; returns whether anything was deleted.
        A path the module did not create (a user's own result folder) is left alone."""
        if not path:
            return False
        real = os.path.realpath(path)
        for top in list(self._created):
            if real == top or real.startswith(top + os.sep):
                shutil.rmtree(top, ignore_errors=True)
                self._created.discard(top)
                return True
        return False

    def release_all(self) -> None:
        for top in list(self._created):
            shutil.rmtree(top, ignore_errors=True)
        self._created.clear()
