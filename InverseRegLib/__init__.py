"""InverseRegLib: fast inverse-consistent deformable registration of 3D images (PyTorch).

Importable without 3D Slicer. The entry point both front ends use is
:func:`InverseRegLib.pipeline.register`; the command line is ``inversereg`` (:mod:`.cli`).
"""

__version__ = "0.1.0"
