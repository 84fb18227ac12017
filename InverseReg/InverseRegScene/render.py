"""Slice views rendered offscreen by Slicer's own ``vtkMRMLSliceLogic`` (no OpenGL, no Qt):
what a view of the scene shows, as an RGBA array or a PNG. Used by the tests and by the figure
script (``docs/figures/slicer_*.png``), not by the module itself."""
from __future__ import annotations

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support


class SliceRenderer:
    """One slice view (``orientation`` Axial, Sagittal or Coronal) on ``scene``; its composite
    node is part of the scene, so the module's view functions drive it as they drive Slicer's."""

    def __init__(self, scene, orientation: str = "Axial", size: tuple = (256, 256), name: str = "Red") -> None:
        self.scene = scene
        self.application = slicer.vtkMRMLApplicationLogic()
        self.application.SetMRMLScene(scene)
        self.colors = slicer.vtkMRMLColorLogic()
        self.colors.SetMRMLScene(scene)
        self.application.SetColorLogic(self.colors)
        # the presets go on the scene's default slice node, so they must come before the node
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
        self.node = scene.CreateNodeByClass("vtkMRMLSliceNode")
        self.node.UnRegister(None)  # CreateNodeByClass hands over a reference
        self.node.SetName(name)
        self.node.SetLayoutName(name)
        scene.AddNode(self.node)
        if not self.node.SetOrientation(orientation):
            raise ValueError(f"unknown slice orientation '{orientation}'")
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(self.application)
        self.logic.SetMRMLScene(scene)
        self.logic.SetSliceNode(self.node)
        self.node.SetDimensions(size[0], size[1], 1)

    @property
    def composite(self):
        return self.logic.GetSliceCompositeNode()

    def fit(self, offset_mm: float = 0.0) -> None:
        """Fit the view to its background volume, then move ``offset_mm`` off the centre slice."""
        self.logic.FitSliceToBackground()
        self.logic.SetSliceOffset(self.logic.GetSliceOffset() + offset_mm)

    def rgba(self) -> np.ndarray:
        """The blended slice image, (rows, columns, 4) uint8, top row first."""
        producer = self.logic.GetImageDataConnection().GetProducer()
        producer.Update()
        image = producer.GetOutputDataObject(0)
        width, height, _ = image.GetDimensions()
        array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
        return np.ascontiguousarray(array[::-1])

    def save_png(self, path: str) -> None:
        producer = self.logic.GetImageDataConnection().GetProducer()
        producer.Update()
        writer = vtk.vtkPNGWriter()  # VTK images are bottom-up, as PNG writing expects
        writer.SetFileName(str(path))
        writer.SetInputConnection(producer.GetOutputPort())
        writer.Write()
