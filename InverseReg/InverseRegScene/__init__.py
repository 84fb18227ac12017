"""InverseReg's scene layer: everything the Slicer module does to an MRML scene, without Qt.

Every function takes the scene (and nodes) as arguments and imports only ``slicer`` (the MRML
classes, from the Slicer application or from the ``slicer-core`` wheel), vtk, numpy, SimpleITK
and InverseRegLib: never qt, ctk, ``slicer.app``, ``slicer.mrmlScene``, ``slicer.util``,
``sitkUtils`` or ``slicer.cli``. So the same code runs inside Slicer (called by the Widget and
the Logic in ``InverseReg.py``) and in pytest on slicer-core (``Testing/Python/test_slicer_scene.py``).

It is a package (a folder with ``__init__.py``) because Slicer loads every ``.py`` file beside
``InverseReg.py`` as a module of its own.

Modules: ``volumes`` (volume nodes <-> SimpleITK images), ``results`` (a result folder -> grid
transform nodes and registered volumes), ``views`` (directions, the user's own transforms,
difference / blend / checkerboard views), ``runner`` (the background registration process),
``folders`` (temporary folders the module created, and only those, are deleted), ``checks``
(input problems as sentences), ``carry`` (label maps, segmentations and markups carried
across, Jacobian volumes), ``render`` (slice views to pictures, offscreen), ``tests`` (the
test bodies both pytest and ``InverseRegTest`` run).
"""

#: attribute on every node the module creates, naming what it is (so it finds its nodes by role,
#: never by a name the user may have given another node)
ROLE_ATTRIBUTE = "InverseReg.Role"
