"""InverseReg: one-click inverse-consistent deformable registration in 3D Slicer.

The module is glue: every numeric step lives in InverseRegLib (importable without Slicer and
tested there). Heavy imports (torch, InverseRegLib, SimpleITK) happen on Register, never at module
load, so a missing PyTorch cannot break Slicer's start-up or this module's GUI.
"""
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLGridTransformNode, vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

_HERE = os.path.dirname(os.path.abspath(__file__))
#: the folder that holds InverseRegLib/: beside InverseReg.py once installed by the extension
#: (see InverseReg/CMakeLists.txt), one level up in a source checkout added to the module paths
MODULE_DIR = _HERE if os.path.isdir(os.path.join(_HERE, "InverseRegLib")) else os.path.dirname(_HERE)


class InverseReg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "InverseReg"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["InverseReg developers"]
        self.parent.helpText = (
            "Deformable registration of two volumes with a multiple-decoder CNN. One click gives a forward "
            "transform (moving onto fixed) and a backward transform (fixed onto moving) that are consistent "
            "with each other. Needs the PyTorch extension.")
        self.parent.acknowledgementText = (
            "Implements 'A Multiple Decoder CNN for Inverse Consistent 3D Image Registration', with a symmetric "
            "diffeomorphic default and affine pre-alignment.")


@parameterNodeWrapper
class InverseRegParameterNode:
    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    affine: Annotated[str, Choice(["affine", "rigid", "none"])] = "affine"
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    # the library's default (InverseRegLib.pipeline.DEFAULT_PASSES); not imported at module load
    networkPasses: Annotated[int, WithinRange(1, 5)] = 2
    refineSteps: Annotated[int, WithinRange(0, 500)] = 0
    modelPath: str = ""
    forwardTransform: vtkMRMLGridTransformNode
    backwardTransform: vtkMRMLGridTransformNode
    createWarpedVolumes: bool = False
    fixedLabels: vtkMRMLLabelMapVolumeNode
    movingLabels: vtkMRMLLabelMapVolumeNode


class InverseRegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._process = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/InverseReg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        for combo, items in ((self.ui.affineComboBox, ["affine", "rigid", "none"]),
                             (self.ui.deviceComboBox, ["auto", "cuda", "cpu"])):
            combo.clear()
            combo.addItems(items)
        self.logic = InverseRegLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.differenceButton.connect("clicked()", lambda: self.onComparison("difference"))
        self.ui.blendButton.connect("clicked()", lambda: self.onComparison("blend"))
        self.ui.checkerboardButton.connect("clicked()", lambda: self.onComparison("checkerboard"))
        self.ui.backwardViewCheckBox.connect("toggled(bool)", self.onDirectionToggled)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.cancelRegistration()
        if self.logic:
            self.logic.releaseOutputs()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.cancelRegistration()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.fixedVolume = first

    def setParameterNode(self, inputParameterNode: Optional[InverseRegParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self.ui.modelPathLineEdit.currentPath = self._parameterNode.modelPath
            self._checkCanApply()

    def onModelPathChanged(self, path: str) -> None:
        if self._parameterNode:
            self._parameterNode.modelPath = path

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self._process is not None:
            return
        problem = self.logic.inputProblem(self._parameterNode) if self._parameterNode else "no parameters"
        self.ui.applyButton.enabled = problem is None
        self.ui.applyButton.toolTip = problem or "Register the moving volume onto the fixed one, and back"

    # --- running -------------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        if self._process is not None:
            self.cancelRegistration()
            return
        with slicer.util.tryWithErrorDisplay("Registration could not start.", waitCursor=True):
            self.logic.ensureTorch()
            self.logic.checkModelFile(self._parameterNode.modelPath)
            self._process = self.logic.startRegistration(self._parameterNode, self.onProgress, self.onFinished)
            self.ui.applyButton.text = "Cancel"
            self.ui.applyButton.enabled = True
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Starting..."

    def cancelRegistration(self) -> None:
        if self._process is not None:
            self._process.cancel()
            self._process = None
            self._resetButton()
            self.ui.statusLabel.text = "Cancelled; the scene is unchanged."

    def _resetButton(self) -> None:
        self.ui.applyButton.text = "Register"
        self._checkCanApply()

    def onProgress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message

    def onFinished(self, outputDir: Optional[str], error: Optional[str]) -> None:
        self._process = None
        self._resetButton()
        if error:
            self.ui.statusLabel.text = f"Failed: {error}"
            slicer.util.errorDisplay(f"Registration failed: {error}")
            return
        with slicer.util.tryWithErrorDisplay("Could not load the registration result.", waitCursor=True):
            report = self.logic.applyResult(self._parameterNode, outputDir)
            self.ui.backwardViewCheckBox.checked = False
            self.logic.showComparison(self._parameterNode, "difference")
            self.ui.progressBar.value = 100
            self.ui.statusLabel.text = (f"Done on {report['device'].upper()} in {report['seconds_total']:.1f} s "
                                        f"(network {report['seconds_network']:.2f} s, "
                                        f"{report.get('passes', 1)} pass(es), {report.get('precision', 'float32')}).")
            self.ui.summaryLabel.text = self.logic.summaryText(report)

    def onDirectionToggled(self, backward: bool) -> None:
        with slicer.util.tryWithErrorDisplay("Could not switch the direction.", waitCursor=True):
            self.logic.showComparison(self._parameterNode, self.logic.comparisonMode, forward=not backward)

    def onComparison(self, mode: str) -> None:
        with slicer.util.tryWithErrorDisplay(f"Could not show the {mode} view.", waitCursor=True):
            self.logic.showComparison(self._parameterNode, mode, forward=not self.ui.backwardViewCheckBox.checked)


class RegistrationProcess:
    """A PythonSlicer subprocess running ``InverseRegLib register --progress json``.

    A reader thread puts stdout lines in a queue; a QTimer on the GUI thread drains it, so the GUI
    never blocks and callbacks run where Qt objects may be touched.
    """

    def __init__(self, command, env, outputDir, tempDir, onProgress, onFinished):
        self.outputDir, self.tempDir = outputDir, tempDir
        self.onProgress, self.onFinished = onProgress, onFinished
        self.lines = queue.Queue()
        self.error = None
        self.cancelled = False
        options = {}
        if os.name == "nt":  # no console window flashing up on Windows
            info = subprocess.STARTUPINFO()
            info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
            info.wShowWindow = 0
            options["startupinfo"] = info
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, bufsize=1, **options)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self._poll)
        self.timer.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)

    def _poll(self) -> None:
        while not self.lines.empty():
            line = self.lines.get_nowait().strip()
            try:
                event = json.loads(line)
            except ValueError:
                logging.info("InverseReg: %s", line)
                continue
            if event.get("event") == "progress":
                self.onProgress(float(event["fraction"]), event.get("message", ""))
            elif event.get("event") == "error":
                self.error = event.get("message", "unknown error")
        if self.process.poll() is not None and not self.reader.is_alive() and self.lines.empty():
            self.timer.stop()
            if self.cancelled:
                return
            code = self.process.returncode
            error = self.error or (None if code == 0 else f"the registration process ended with status {code}")
            if error:
                shutil.rmtree(self.tempDir, ignore_errors=True)
            self.onFinished(None if error else self.outputDir, error)

    def wait(self) -> None:
        """Block until done (for tests and scripting): drains events like the timer would."""
        self.process.wait()
        self.reader.join()
        self._poll()

    def cancel(self) -> None:
        self.cancelled = True
        self.timer.stop()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.tempDir, ignore_errors=True)


class InverseRegLogic(ScriptedLoadableModuleLogic):
    """Turns nodes into files and files into nodes; never touches widgets."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.lastOutputDir = None  # kept until the next run: the checkerboard reads the registered images
        self.comparisonMode = "difference"

    def getParameterNode(self):
        return InverseRegParameterNode(super().getParameterNode())

    # --- checks --------------------------------------------------------------------------------
    @staticmethod
    def volumeProblem(node, role: str) -> Optional[str]:
        if node is None:
            return f"Select a {role} volume."
        if node.IsA("vtkMRMLLabelMapVolumeNode"):
            return f"The {role} volume '{node.GetName()}' is a label map; select an image (label maps go in Labels)."
        image = node.GetImageData()
        if image is None or image.GetNumberOfPoints() == 0:
            return f"The {role} volume '{node.GetName()}' is empty."
        if image.GetNumberOfScalarComponents() != 1:
            return f"The {role} volume '{node.GetName()}' has {image.GetNumberOfScalarComponents()} components; a scalar volume is needed."
        if min(image.GetDimensions()) < 4:
            return f"The {role} volume '{node.GetName()}' is not 3D (size {image.GetDimensions()})."
        low, high = image.GetScalarRange()
        if low == high:
            return f"The {role} volume '{node.GetName()}' is constant: nothing to register."
        return None

    def inputProblem(self, parameters) -> Optional[str]:
        """The first problem that prevents registering, as a sentence, or None."""
        problem = (self.volumeProblem(parameters.fixedVolume, "fixed")
                   or self.volumeProblem(parameters.movingVolume, "moving"))
        if problem:
            return problem
        if parameters.fixedVolume == parameters.movingVolume:
            return "The fixed and moving volumes are the same volume: choose two different volumes."
        if bool(parameters.fixedLabels) != bool(parameters.movingLabels):
            return "Give both label maps (fixed and moving) or neither."
        return None

    def ensureTorch(self) -> None:
        """Make sure torch is importable in Slicer's Python, installing it with one confirmation."""
        try:
            import PyTorchUtils  # noqa: F401  (the PyTorch extension)
        except ModuleNotFoundError:
            raise RuntimeError("InverseReg needs the 'PyTorch' extension: install it from the Extensions "
                               "Manager, restart Slicer, then click Register again.") from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            torch = torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=">=2.0")
            if torch is None:
                raise RuntimeError("PyTorch is required for registration and was not installed.")

    def checkModelFile(self, modelPath: str) -> None:
        """Refuse a model file that is not ours before starting the process."""
        self._importLibrary()
        from InverseRegLib.errors import InverseRegError
        from InverseRegLib.modelfile import load_model
        try:
            load_model(modelPath or None)
        except InverseRegError as error:
            raise ValueError(str(error)) from None

    @staticmethod
    def _importLibrary() -> None:
        if MODULE_DIR not in sys.path:
            sys.path.insert(0, MODULE_DIR)

    # --- running -------------------------------------------------------------------------------
    def buildCommand(self, parameters, inputs: dict, outputDir: str) -> list:
        python = self.pythonSlicerExecutable()
        command = [python, "-m", "InverseRegLib", "register", inputs["fixed"], inputs["moving"], "-o", outputDir,
                   "--device", parameters.device, "--affine", parameters.affine,
                   "--passes", str(int(parameters.networkPasses)),
                   "--refine", str(int(parameters.refineSteps)), "--progress", "json"]
        if parameters.modelPath:
            command += ["--model", parameters.modelPath]
        if "fixedLabels" in inputs:
            command += ["--fixed-seg", inputs["fixedLabels"], "--moving-seg", inputs["movingLabels"]]
        return command

    @staticmethod
    def pythonSlicerExecutable() -> str:
        """Slicer's own Python launcher (Slicer puts it on PATH); sys.executable inside Slicer is the
        application itself, so it cannot stand in."""
        python = shutil.which("PythonSlicer")
        if not python:
            candidate = os.path.join(os.path.dirname(sys.executable), "PythonSlicer" + (".exe" if os.name == "nt" else ""))
            python = candidate if os.path.isfile(candidate) else None
        if not python:
            raise RuntimeError("PythonSlicer was not found on PATH, so the registration process cannot start; "
                               "run InverseReg from a regular Slicer installation.")
        return python

    def startRegistration(self, parameters, onProgress, onFinished) -> RegistrationProcess:
        problem = self.inputProblem(parameters)
        if problem:
            raise ValueError(problem)
        import sitkUtils
        import SimpleITK as sitk
        tempDir = tempfile.mkdtemp(prefix="InverseReg-")
        # the volumes are exported as copies: the nodes and their storage stay as the user had them
        inputs = {}
        for key, node in (("fixed", parameters.fixedVolume), ("moving", parameters.movingVolume),
                          ("fixedLabels", parameters.fixedLabels), ("movingLabels", parameters.movingLabels)):
            if node is not None:
                inputs[key] = os.path.join(tempDir, f"{key}.nrrd")
                sitk.WriteImage(sitkUtils.PullVolumeFromSlicer(node), inputs[key])
        outputDir = os.path.join(tempDir, "result")
        env = dict(os.environ)
        env["PYTHONPATH"] = MODULE_DIR + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        return RegistrationProcess(self.buildCommand(parameters, inputs, outputDir), env, outputDir, tempDir,
                                   onProgress, onFinished)

    def registerBlocking(self, parameters) -> dict:
        """Register and apply the result without a GUI (tests, scripts); returns the report."""
        outcome = {}
        process = self.startRegistration(parameters, lambda f, m: None,
                                         lambda outputDir, error: outcome.update(dir=outputDir, error=error))
        process.wait()
        if outcome.get("error"):
            raise RuntimeError(outcome["error"])
        return self.applyResult(parameters, outcome["dir"])

    # --- results into the scene ----------------------------------------------------------------
    @staticmethod
    def _referenceRoles() -> tuple:
        """(fixed, moving) reference roles of a registration transform, as Slicer names them
        (vtkMRMLTransformNode::GetFixedNodeReferenceRole / GetMovingNodeReferenceRole)."""
        node = slicer.vtkMRMLTransformNode
        return node.GetFixedNodeReferenceRole(), node.GetMovingNodeReferenceRole()

    def _setGridTransform(self, node, fieldPath: str, fixedNode, movingNode) -> None:
        self._importLibrary()
        import SimpleITK as sitk
        from InverseRegLib.slicer_grid import itk_field_to_slicer_grid, to_vtk_image
        grid = itk_field_to_slicer_grid(sitk.ReadImage(fieldPath))
        image, direction = to_vtk_image(grid)
        transform = slicer.vtkOrientedGridTransform()
        transform.SetDisplacementGridData(image)
        transform.SetGridDirectionMatrix(direction)
        transform.SetInterpolationModeToLinear()  # what ITK used when the field was computed
        # the field maps points of its own grid into the other image: Slicer's resampling direction
        node.SetAndObserveTransformFromParent(transform)
        fixedRole, movingRole = self._referenceRoles()
        node.SetNodeReferenceID(fixedRole, fixedNode.GetID())
        node.SetNodeReferenceID(movingRole, movingNode.GetID())

    def applyResult(self, parameters, outputDir: str) -> dict:
        """Create or update the two transform nodes (and warped volumes) from ``outputDir``."""
        with open(os.path.join(outputDir, "report.json")) as handle:
            report = json.load(handle)
        if self.lastOutputDir and os.path.normpath(self.lastOutputDir) != os.path.normpath(outputDir):
            self.releaseOutputs()
        self.lastOutputDir = outputDir
        fixed, moving = parameters.fixedVolume, parameters.movingVolume
        if not parameters.forwardTransform:
            parameters.forwardTransform = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLGridTransformNode", slicer.mrmlScene.GenerateUniqueName(f"{moving.GetName()} to {fixed.GetName()}"))
        if not parameters.backwardTransform:
            parameters.backwardTransform = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLGridTransformNode", slicer.mrmlScene.GenerateUniqueName(f"{fixed.GetName()} to {moving.GetName()}"))
        self._setGridTransform(parameters.forwardTransform, os.path.join(outputDir, "forward.nii.gz"), fixed, moving)
        self._setGridTransform(parameters.backwardTransform, os.path.join(outputDir, "backward.nii.gz"), fixed, moving)
        import sitkUtils
        import SimpleITK as sitk
        for fileName, source in (("moving_warped.nii.gz", moving), ("fixed_warped.nii.gz", fixed)):
            name = f"{source.GetName()} registered"
            node = slicer.mrmlScene.GetFirstNodeByName(name)
            # a registered volume left by an earlier run (or the checkerboard) must not show a stale result
            if node is None and parameters.createWarpedVolumes:
                node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
                node.CreateDefaultDisplayNodes()
            if node is not None:
                sitkUtils.PushVolumeToSlicer(sitk.ReadImage(os.path.join(outputDir, fileName)), targetNode=node)
        self.showDirection(parameters, forward=True)
        return report

    def releaseOutputs(self) -> None:
        """Delete the temporary folder of the last run (the scene holds copies of what it needs)."""
        if self.lastOutputDir:
            shutil.rmtree(os.path.dirname(self.lastOutputDir), ignore_errors=True)
            self.lastOutputDir = None

    def showDirection(self, parameters, forward: bool = True) -> None:
        """Forward: moving under the forward transform over the (untransformed) fixed volume.
        Backward: fixed under the backward transform over the moving volume. Only one direction is
        shown at a time so the background is always the untransformed reference."""
        fixed, moving = parameters.fixedVolume, parameters.movingVolume
        forwardNode, backwardNode = parameters.forwardTransform, parameters.backwardTransform
        if not (forwardNode and backwardNode):
            raise ValueError("Register first: there are no output transforms yet.")
        if forward:
            fixed.SetAndObserveTransformNodeID(None)
            moving.SetAndObserveTransformNodeID(forwardNode.GetID())
            slicer.util.setSliceViewerLayers(background=fixed, foreground=moving, foregroundOpacity=0.5)
        else:
            moving.SetAndObserveTransformNodeID(None)
            fixed.SetAndObserveTransformNodeID(backwardNode.GetID())
            slicer.util.setSliceViewerLayers(background=moving, foreground=fixed, foregroundOpacity=0.5)

    def showComparison(self, parameters, mode: str, forward: bool = True) -> None:
        """``difference`` (subtract compositing), ``blend`` (50 % opacity) or ``checkerboard``."""
        if mode not in ("difference", "blend", "checkerboard"):
            raise ValueError(f"unknown comparison '{mode}'")
        self.comparisonMode = mode
        if mode == "checkerboard":
            self._showCheckerboard(parameters, forward)
            return
        self.showDirection(parameters, forward)  # the checkerboard may have replaced the layers
        compositing = {"difference": slicer.vtkMRMLSliceCompositeNode.Subtract,
                       "blend": slicer.vtkMRMLSliceCompositeNode.Alpha}[mode]
        for composite in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"):
            composite.SetCompositing(compositing)
            composite.SetForegroundOpacity(1.0 if mode == "difference" else 0.5)

    def _registeredVolume(self, parameters, forward: bool):
        """The registered image on the reference grid (written by the library: no resampling here)."""
        source = parameters.movingVolume if forward else parameters.fixedVolume
        name = f"{source.GetName()} registered"
        node = slicer.mrmlScene.GetFirstNodeByName(name)
        if node is None:
            if not self.lastOutputDir:
                raise ValueError("Register first: there is no registered volume to compare with.")
            import sitkUtils
            import SimpleITK as sitk
            fileName = "moving_warped.nii.gz" if forward else "fixed_warped.nii.gz"
            node = sitkUtils.PushVolumeToSlicer(sitk.ReadImage(os.path.join(self.lastOutputDir, fileName)), name=name)
        return node

    def _showCheckerboard(self, parameters, forward: bool) -> None:
        reference = parameters.fixedVolume if forward else parameters.movingVolume
        registered = self._registeredVolume(parameters, forward)
        name = "InverseReg checkerboard"
        output = slicer.mrmlScene.GetFirstNodeByName(name) or slicer.mrmlScene.AddNewNodeByClass(
            "vtkMRMLScalarVolumeNode", name)
        # both inputs share the reference grid, which ITK's checkerboard filter requires
        slicer.cli.runSync(slicer.modules.checkerboardfilter, None, {
            "inputVolume1": reference.GetID(), "inputVolume2": registered.GetID(), "outputVolume": output.GetID(),
            "checkerPattern": "8,8,8"})
        slicer.util.setSliceViewerLayers(background=output, foreground=None)

    @staticmethod
    def summaryText(report: dict) -> str:
        lines = [f"Folding (det J <= 0): forward {report['folding_percent_forward']:.3f} %, "
                 f"backward {report['folding_percent_backward']:.3f} %",
                 f"Inverse consistency: mean {report['ice_mean_mm']:.3f} mm, 95% {report['ice_p95_mm']:.3f} mm"]
        if report.get("dice_mean") is not None:
            lines.append(f"Dice {report['dice_mean_before']:.3f} -> {report['dice_mean']:.3f} "
                         f"(backward {report['dice_mean_backward']:.3f}); BIR {report['bir']:.3f}")
        return "\n".join(lines)


class InverseRegTest(ScriptedLoadableModuleTest):
    """Runs in Slicer: synthetic volumes (no download), the bundled model, CPU."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_RegisterCreatesTwoConsistentGridTransforms()
        self.setUp()
        self.test_RerunReplacesOutputsWithoutLeakingNodes()
        self.setUp()
        self.test_BadInputIsRefusedAndSceneUnchanged()

    def _loadSyntheticPair(self):
        InverseRegLogic._importLibrary()
        import sitkUtils
        from InverseRegLib.synthetic import make_pair
        fixed, moving, fixedSeg, movingSeg = make_pair(size=(80, 96, 80), spacing=(2.0, 2.0, 2.0), seed=3)
        fixedNode = sitkUtils.PushVolumeToSlicer(fixed, name="fixed")
        movingNode = sitkUtils.PushVolumeToSlicer(moving, name="moving")
        return fixedNode, movingNode

    def _parameters(self):
        logic = InverseRegLogic()
        parameters = logic.getParameterNode()
        parameters.fixedVolume, parameters.movingVolume = self._loadSyntheticPair()
        parameters.device = "cpu"
        parameters.affine = "none"
        return logic, parameters

    def test_RegisterCreatesTwoConsistentGridTransforms(self):
        import numpy as np
        self.delayDisplay("Registering a synthetic pair on CPU")
        logic, parameters = self._parameters()
        report = logic.registerBlocking(parameters)
        forward, backward = parameters.forwardTransform, parameters.backwardTransform
        self.assertIsNotNone(forward)
        self.assertIsNotNone(backward)
        for node, volume in ((forward, parameters.fixedVolume), (backward, parameters.movingVolume)):
            grid = node.GetTransformFromParent()
            self.assertIsInstance(grid, slicer.vtkOrientedGridTransform)
            image = grid.GetDisplacementGrid()
            self.assertEqual(image.GetDimensions(), volume.GetImageData().GetDimensions())
            np.testing.assert_allclose(image.GetSpacing(), volume.GetSpacing(), atol=1e-6)
            np.testing.assert_allclose(image.GetOrigin(), volume.GetOrigin(), atol=1e-4)
        # moving -> fixed -> moving: a point of the fixed grid goes into moving space by the forward
        # resampling transform and comes back by the backward one
        toMoving = forward.GetTransformFromParent()
        toFixed = backward.GetTransformFromParent()
        errors = []
        bounds = [0.0] * 6
        parameters.fixedVolume.GetRASBounds(bounds)
        rng = np.random.default_rng(0)
        for _ in range(50):
            point = [rng.uniform(bounds[2 * i] * 0.6, bounds[2 * i + 1] * 0.6) for i in range(3)]
            back = toFixed.TransformPoint(toMoving.TransformPoint(point))
            errors.append(np.linalg.norm(np.subtract(back, point)))
        self.assertLess(float(np.mean(errors)), 0.5, "forward then backward should return within 0.5 mm")
        self.assertLess(report["ice_mean_mm"], 0.5)
        self.delayDisplay("Two consistent grid transforms")

    def test_RerunReplacesOutputsWithoutLeakingNodes(self):
        logic, parameters = self._parameters()
        logic.registerBlocking(parameters)
        count = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLGridTransformNode")
        forwardId = parameters.forwardTransform.GetID()
        logic.registerBlocking(parameters)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLGridTransformNode"), count)
        self.assertEqual(parameters.forwardTransform.GetID(), forwardId)

    def test_BadInputIsRefusedAndSceneUnchanged(self):
        logic, parameters = self._parameters()
        before = slicer.mrmlScene.GetNumberOfNodes()
        parameters.movingVolume = parameters.fixedVolume
        self.assertIn("same volume", logic.inputProblem(parameters))
        with self.assertRaises(ValueError):
            logic.startRegistration(parameters, lambda f, m: None, lambda d, e: None)
        with self.assertRaises(ValueError):
            logic.checkModelFile(__file__)  # a Python file is not a model file
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
