"""InverseReg: one-click inverse-consistent deformable registration in 3D Slicer.

The module is glue. What it does to the scene lives in ``InverseRegScene/`` (Qt-free, tested on
Slicer's own MRML core by pytest and by InverseRegTest); every numeric step lives in InverseRegLib.
Heavy imports (torch, InverseRegLib, SimpleITK, numpy) happen on use, never at module load, so a
missing PyTorch cannot break Slicer's start-up or this module's GUI.
"""
import os
import sys
from typing import Annotated, Optional, Union

import qt
import slicer
import vtk
from slicer import (vtkMRMLGridTransformNode, vtkMRMLLabelMapVolumeNode, vtkMRMLMarkupsFiducialNode,
                    vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

_HERE = os.path.dirname(os.path.abspath(__file__))
#: the folder that holds InverseRegLib/: beside InverseReg.py once installed by the extension
#: (see InverseReg/CMakeLists.txt), one level up in a source checkout added to the module paths
MODULE_DIR = _HERE if os.path.isdir(os.path.join(_HERE, "InverseRegLib")) else os.path.dirname(_HERE)


def _importLibrary() -> None:
    if MODULE_DIR not in sys.path:
        sys.path.insert(0, MODULE_DIR)


def _restoreInterpolationAfterImport(caller, event) -> None:
    """Slicer's transform reader makes every loaded grid cubic; the module's grids are linear
    (as ITK applies the files), so a loaded scene maps points as the saved one did."""
    _importLibrary()
    from InverseRegScene.results import restore_interpolation
    restore_interpolation(caller)


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
        # after every scene load or import (also when the module's panel was never opened)
        slicer.app.connect("startupCompleted()", self._observeSceneImports)

    @staticmethod
    def _observeSceneImports() -> None:
        slicer.mrmlScene.AddObserver(slicer.vtkMRMLScene.EndImportEvent, _restoreInterpolationAfterImport)


@parameterNodeWrapper
class InverseRegParameterNode:
    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    affine: Annotated[str, Choice(["affine", "rigid", "none"])] = "affine"
    quality: Annotated[str, Choice(["fast", "best"])] = "fast"
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    # the library's default (InverseRegLib.pipeline.DEFAULT_PASSES); not imported at module load
    networkPasses: Annotated[int, WithinRange(1, 5)] = 2
    refineSteps: Annotated[int, WithinRange(0, 500)] = 0
    # joint steps making each field the other's inverse in both orders (0 = off; InverseRegLib.mutual)
    mutualInverseSteps: Annotated[int, WithinRange(0, 1000)] = 0
    # stop those steps once both orders' mean error is at most this many mm (0 = run them all;
    # set with 0 steps: at most the command's cap, as --mutual-target alone)
    mutualInverseTarget: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    modelPath: str = ""
    forwardTransform: vtkMRMLGridTransformNode
    backwardTransform: vtkMRMLGridTransformNode
    fixedLabels: vtkMRMLLabelMapVolumeNode
    movingLabels: vtkMRMLLabelMapVolumeNode
    # after registration (saved with the scene, so a reloaded scene offers the same choices)
    carrySource: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]
    pointsToMove: vtkMRMLMarkupsFiducialNode
    pointsOn: Annotated[str, Choice(["fixed", "moving"])] = "fixed"
    fixedPoints: vtkMRMLMarkupsFiducialNode
    movingPoints: vtkMRMLMarkupsFiducialNode
    jacobianBackward: bool = False
    jacobianLog: bool = False


class InverseRegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._process = None
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/InverseReg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        for combo, items in ((self.ui.affineComboBox, ["affine", "rigid", "none"]),
                             (self.ui.qualityComboBox, ["fast", "best"]),
                             (self.ui.deviceComboBox, ["auto", "cuda", "cpu"]),
                             (self.ui.pointsOnComboBox, ["fixed", "moving"])):
            combo.clear()
            combo.addItems(items)
        self.logic = InverseRegLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.differenceButton.connect("clicked()", lambda: self.onComparison("difference"))
        self.ui.differenceBeforeButton.connect("clicked()", lambda: self.onComparison("differenceBefore"))
        self.ui.restoreButton.connect("clicked()", self.onRestore)
        self.ui.blendButton.connect("clicked()", lambda: self.onComparison("blend"))
        self.ui.checkerboardButton.connect("clicked()", lambda: self.onComparison("checkerboard"))
        self.ui.backwardViewCheckBox.connect("toggled(bool)", self.onDirectionToggled)
        self.ui.carryButton.connect("clicked()", self.onCarry)
        self.ui.movePointsButton.connect("clicked()", self.onMovePoints)
        self.ui.pointErrorButton.connect("clicked()", self.onPointError)
        self.ui.jacobianButton.connect("clicked()", self.onShowJacobian)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.cancelRegistration()
        if self.logic:
            self.logic.stopWorker()
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
            self._process = self.logic.startRegistration(self._parameterNode)
            self._timer = qt.QTimer()
            self._timer.setInterval(200)
            self._timer.connect("timeout()", self._poll)
            self._timer.start()
            self.ui.applyButton.text = "Cancel"
            self.ui.applyButton.enabled = True
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Starting..."

    def _poll(self) -> None:
        """Drives the Qt-free runner from the GUI thread (InverseRegScene.runner)."""
        process = self._process
        if process is None:
            return
        process.poll()
        self.ui.progressBar.value = int(round(100 * process.fraction))
        self.ui.statusLabel.text = process.message
        if process.finished:
            self._stopTimer()
            self._process = None
            self._resetButton()
            self.onFinished(process)

    def _stopTimer(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None

    def cancelRegistration(self) -> None:
        if self._process is not None:
            self._stopTimer()
            self.logic.cancelRegistration(self._process)
            self._process = None
            self._resetButton()
            self.ui.statusLabel.text = "Cancelled; the scene is unchanged."

    def _resetButton(self) -> None:
        self.ui.applyButton.text = "Register"
        self._checkCanApply()

    def onFinished(self, process) -> None:
        if process.error:
            self.logic.discardRun(process)
            self.ui.statusLabel.text = f"Failed: {process.error}"
            slicer.util.errorDisplay(f"Registration failed: {process.error}")
            return
        with slicer.util.tryWithErrorDisplay("Could not load the registration result.", waitCursor=True):
            report, messages = self.logic.applyResult(self._parameterNode, process.output)
            self.ui.backwardViewCheckBox.checked = False
            messages += self.logic.showComparison(self._parameterNode, "difference")
            self.ui.progressBar.value = 100
            self.ui.statusLabel.text = " ".join(
                [f"Done on {report['device'].upper()} in {report['seconds_total']:.1f} s "
                 f"(network {report['seconds_network']:.2f} s, "
                 f"{report.get('passes', 1)} pass(es), {report.get('precision', 'float32')})."] + messages)
            self.ui.summaryLabel.text = self.logic.summaryText(report)

    def onDirectionToggled(self, backward: bool) -> None:
        with slicer.util.tryWithErrorDisplay("Could not switch the direction.", waitCursor=True):
            self._say(self.logic.showComparison(self._parameterNode, self.logic.comparisonMode, forward=not backward))

    def onComparison(self, mode: str) -> None:
        with slicer.util.tryWithErrorDisplay(f"Could not show the {mode} view.", waitCursor=True):
            self._say(self.logic.showComparison(self._parameterNode, mode,
                                                forward=not self.ui.backwardViewCheckBox.checked))

    def onRestore(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not restore the transforms.", waitCursor=True):
            self._say(self.logic.restoreUserTransforms(self._parameterNode) or ["The volumes are as you had them."])

    # --- after registration ------------------------------------------------------------------
    def onCarry(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not carry it to the other volume.", waitCursor=True):
            self._say(self.logic.carryToOtherVolume(self._parameterNode))
            self._syncDirectionSwitch()

    def onMovePoints(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not move the points.", waitCursor=True):
            self._say(self.logic.carryMarkups(self._parameterNode))
            self._syncDirectionSwitch()

    def onPointError(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not measure the point error.", waitCursor=True):
            self.ui.pointErrorLabel.text = self.logic.markupsError(self._parameterNode)

    def onShowJacobian(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not show the Jacobian determinant.", waitCursor=True):
            self._say(self.logic.showJacobian(self._parameterNode))
            self._syncDirectionSwitch()

    def _syncDirectionSwitch(self) -> None:
        """The views may now show the other direction: the switch says so without switching again."""
        wasBlocked = self.ui.backwardViewCheckBox.blockSignals(True)
        self.ui.backwardViewCheckBox.checked = not self.logic.forwardShown
        self.ui.backwardViewCheckBox.blockSignals(wasBlocked)

    def _say(self, messages: list) -> None:
        if messages:
            self.ui.statusLabel.text = " ".join(messages)


class InverseRegLogic(ScriptedLoadableModuleLogic):
    """Turns parameters into calls of the scene layer (InverseRegScene) on slicer.mrmlScene;
    never touches widgets."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        _importLibrary()
        from InverseRegScene.folders import TemporaryFolders
        self.folders = TemporaryFolders()  # only these are ever deleted
        self.worker = None  # the persistent registration process (InverseRegScene.runner.RegistrationWorker)
        self.lastOutputDir = None  # the folder of the result in the scene
        self.comparisonMode = "difference"
        self.forwardShown = True  # which direction the slice views show (the panel's switch follows)

    def getParameterNode(self):
        return InverseRegParameterNode(super().getParameterNode())

    # --- checks --------------------------------------------------------------------------------
    def inputProblem(self, parameters) -> Optional[str]:
        """The first problem that prevents registering, as a sentence, or None."""
        from InverseRegScene.checks import input_problem
        return input_problem(parameters.fixedVolume, parameters.movingVolume,
                             parameters.fixedLabels, parameters.movingLabels)

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
        """Refuse a model file that is not ours before starting the process (needs torch)."""
        _importLibrary()
        from InverseRegLib.errors import InverseRegError
        from InverseRegLib.modelfile import load_model
        try:
            load_model(modelPath or None)
        except InverseRegError as error:
            raise ValueError(str(error)) from None

    # --- running -------------------------------------------------------------------------------
    @staticmethod
    def pythonSlicerExecutable() -> str:
        """Slicer's own Python launcher (Slicer puts it on PATH); sys.executable inside Slicer is the
        application itself, so it cannot stand in."""
        import shutil
        python = shutil.which("PythonSlicer")
        if not python:
            candidate = os.path.join(os.path.dirname(sys.executable), "PythonSlicer" + (".exe" if os.name == "nt" else ""))
            python = candidate if os.path.isfile(candidate) else None
        if not python:
            raise RuntimeError("PythonSlicer was not found on PATH, so the registration process cannot start; "
                               "run InverseReg from a regular Slicer installation.")
        return python

    @staticmethod
    def registrationOptions(parameters) -> dict:
        return dict(device=parameters.device, affine=parameters.affine, passes=int(parameters.networkPasses),
                    refine=int(parameters.refineSteps), quality=parameters.quality, model=parameters.modelPath,
                    mutual_inverse=int(parameters.mutualInverseSteps),
                    mutual_target=float(parameters.mutualInverseTarget))

    def startRegistration(self, parameters):
        """Export copies of the inputs to a new temporary folder and send the request to the
        persistent worker process (started on first use, and again after a cancel); returns a
        job with the runner interface (``poll``, ``finished``, ``error``, ``output``, ``cancel``)."""
        problem = self.inputProblem(parameters)
        if problem:
            raise ValueError(problem)
        from InverseRegScene.runner import RegistrationWorker
        from InverseRegScene.volumes import write_volume
        run = self.folders.create()
        try:
            # the volumes are exported as copies: the nodes and their storage stay as the user had them
            inputs = {}
            for key, node in (("fixed", parameters.fixedVolume), ("moving", parameters.movingVolume),
                              ("fixedLabels", parameters.fixedLabels), ("movingLabels", parameters.movingLabels)):
                if node is not None:
                    inputs[key] = os.path.join(run, f"{key}.nrrd")
                    write_volume(node, inputs[key])
            if self.worker is None:
                env = dict(os.environ)
                env["PYTHONPATH"] = MODULE_DIR + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
                env["PYTHONUNBUFFERED"] = "1"
                self.worker = RegistrationWorker(self.pythonSlicerExecutable(), env)
            return self.worker.submit(inputs["fixed"], inputs["moving"], os.path.join(run, "result"),
                                      fixed_labels=inputs.get("fixedLabels", ""),
                                      moving_labels=inputs.get("movingLabels", ""),
                                      **self.registrationOptions(parameters))
        except BaseException:
            self.folders.release(run)
            raise

    def cancelRegistration(self, process) -> None:
        """Cancel kills the worker (the scene is untouched); the next Register starts a new one."""
        process.cancel()
        self.discardRun(process)

    def discardRun(self, process) -> None:
        """Delete a run's temporary folder (failed or cancelled: the scene never saw it)."""
        self.folders.release(process.output)

    def stopWorker(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None

    def registerBlocking(self, parameters) -> dict:
        """Register and apply the result without a GUI (scripts); returns the report."""
        process = self.startRegistration(parameters)
        process.wait(timeout=3600)
        if process.error:
            self.discardRun(process)
            raise RuntimeError(process.error)
        return self.applyResult(parameters, process.output)[0]

    # --- results into the scene ----------------------------------------------------------------
    def applyResult(self, parameters, outputDir: str) -> tuple:
        """Create or update the two transform nodes and the registered volumes from ``outputDir``
        (a run of this module or a user's own result folder); returns ``(report, messages)``."""
        from InverseRegScene.results import load_result
        from InverseRegScene.views import show_direction
        forward, backward, report = load_result(slicer.mrmlScene, parameters.fixedVolume, parameters.movingVolume,
                                                outputDir, parameters.forwardTransform, parameters.backwardTransform)
        parameters.forwardTransform, parameters.backwardTransform = forward, backward
        if self.lastOutputDir and os.path.realpath(self.lastOutputDir) != os.path.realpath(outputDir):
            self.folders.release(self.lastOutputDir)  # deletes only a folder this module created
        self.lastOutputDir = outputDir
        messages = show_direction(slicer.mrmlScene, parameters.fixedVolume, parameters.movingVolume,
                                  forward, backward, forward=True)
        self.forwardShown = True
        return report, messages

    def releaseOutputs(self) -> None:
        """Delete the temporary folders this module created (the scene holds copies of what it needs)."""
        self.folders.release_all()
        self.lastOutputDir = None

    def showComparison(self, parameters, mode: str, forward: bool = True) -> list:
        """``difference``, ``differenceBefore``, ``blend`` or ``checkerboard``; returns messages."""
        from InverseRegScene.views import show_comparison
        messages = show_comparison(slicer.mrmlScene, parameters.fixedVolume, parameters.movingVolume,
                                   parameters.forwardTransform, parameters.backwardTransform, mode, forward)
        self.comparisonMode = mode
        self.forwardShown = forward
        return messages

    def restoreUserTransforms(self, parameters) -> list:
        from InverseRegScene.views import restore_user_transforms
        return restore_user_transforms(slicer.mrmlScene, [parameters.fixedVolume, parameters.movingVolume])

    # --- after registration (InverseRegScene.carry) ---------------------------------------------
    def carryToOtherVolume(self, parameters) -> list:
        """Carry ``carrySource`` (a segmentation or label map on either volume) onto the other
        volume and show it there; returns messages."""
        from InverseRegScene.carry import carry_to_other_volume
        carried, onto = carry_to_other_volume(slicer.mrmlScene, parameters.carrySource, parameters.fixedVolume,
                                              parameters.movingVolume, parameters.forwardTransform,
                                              parameters.backwardTransform)
        return [f"'{carried.GetName()}' is on '{onto.GetName()}'."] + self._showOn(parameters, carried, onto)

    def carryMarkups(self, parameters) -> list:
        """Move ``pointsToMove`` (placed on the volume ``pointsOn`` names) onto the other volume
        and show them there; returns messages."""
        from InverseRegScene.carry import carry_markups_between
        source, onto = ((parameters.fixedVolume, parameters.movingVolume) if parameters.pointsOn == "fixed"
                        else (parameters.movingVolume, parameters.fixedVolume))
        moved = carry_markups_between(slicer.mrmlScene, parameters.pointsToMove, source, parameters.fixedVolume,
                                      parameters.movingVolume, parameters.forwardTransform,
                                      parameters.backwardTransform)
        return ([f"{moved.GetNumberOfControlPoints()} point(s) moved: '{moved.GetName()}'."]
                + self._showOn(parameters, moved, onto))

    def _showOn(self, parameters, node, onto) -> list:
        from InverseRegScene.carry import show_on_volume
        messages = show_on_volume(slicer.mrmlScene, node, onto, parameters.fixedVolume, parameters.movingVolume,
                                  parameters.forwardTransform, parameters.backwardTransform)
        self.forwardShown = onto.GetID() == parameters.fixedVolume.GetID()
        return messages

    def markupsError(self, parameters) -> str:
        """The target registration error line for ``fixedPoints`` and ``movingPoints``."""
        from InverseRegScene.carry import markups_registration_error, registration_error_sentence
        return registration_error_sentence(markups_registration_error(
            parameters.fixedPoints, parameters.movingPoints, parameters.forwardTransform, parameters.backwardTransform))

    def showJacobian(self, parameters) -> list:
        """Overlay det J of the forward (or, with ``jacobianBackward``, backward) field; returns messages."""
        from InverseRegScene.carry import show_jacobian
        _, messages = show_jacobian(slicer.mrmlScene, parameters.fixedVolume, parameters.movingVolume,
                                    parameters.forwardTransform, parameters.backwardTransform,
                                    backward_direction=bool(parameters.jacobianBackward),
                                    log=bool(parameters.jacobianLog))
        self.forwardShown = not parameters.jacobianBackward
        return messages

    @staticmethod
    def summaryText(report: dict) -> str:
        lines = [f"Folding (det J <= 0): forward {report['folding_percent_forward']:.3f} %, "
                 f"backward {report['folding_percent_backward']:.3f} %",
                 f"Inverse consistency: mean {report['ice_mean_mm']:.3f} mm, 95% {report['ice_p95_mm']:.3f} mm"]
        if report.get("mutual_target_mm") is not None:
            verdict = "reached" if report.get("mutual_reached_target") else "not reached"
            lines.append(f"Mutual-inverse target {report['mutual_target_mm']:g} mm {verdict} after "
                         f"{report.get('mutual_steps_run', 0)} of at most {report.get('mutual_steps', 0)} steps")
        if report.get("dice_mean") is not None:
            lines.append(f"Dice {report['dice_mean_before']:.3f} -> {report['dice_mean']:.3f} "
                         f"(backward {report['dice_mean_backward']:.3f}); BIR {report['bir']:.3f}")
        return "\n".join(lines)


class InverseRegTest(ScriptedLoadableModuleTest):
    """Runs InverseRegScene/tests.py inside Slicer: the same test code pytest runs on slicer-core
    (Testing/Python/test_slicer_scene.py). Each test makes its own scene, so the application's
    scene is not touched. The registration tests skip, with the reason, where torch is absent."""

    def runTest(self):
        _importLibrary()
        from InverseRegScene import tests
        tests.LIBRARY_DIR = MODULE_DIR
        tests.PYTHON = InverseRegLogic.pythonSlicerExecutable()
        self.delayDisplay("Running the InverseReg scene tests")
        result = tests.run_all()
        for case, reason in result.skipped:
            self.delayDisplay(f"Skipped {case}: {reason}")
        problems = [f"{case}: {trace}" for case, trace in result.failures + result.errors]
        self.assertEqual(problems, [], "\n".join(problems))
        self.assertGreater(result.testsRun, 0)
        self.delayDisplay(f"{result.testsRun} scene tests ran, {len(result.skipped)} skipped")
