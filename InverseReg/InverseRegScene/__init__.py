"""InverseReg's Qt-free scene layer: functions that take the MRML scene and nodes (Slicer's own
classes, in Slicer or through slicer-core), so they run in tests without the Slicer application."""
