"""The scene tests: one body of code that pytest runs on slicer-core
(``Testing/Python/test_slicer_scene.py``) and ``InverseRegTest`` runs inside Slicer.

Each test makes its own fresh ``vtkMRMLScene`` (never the application's scene), so inside Slicer
the user's scene is not touched. :class:`RegisteredSceneTests` runs one real registration of a
small synthetic pair (the module's own command, in a subprocess, with the bundled model on CPU)
and loads it with the module's own code; it is skipped, with the reason, where torch is not
installed (Slicer's extension build machines have none), and nothing installs torch.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import unittest

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from . import ROLE_ATTRIBUTE
from .checks import input_problem, torch_available
from .folders import TemporaryFolders
from .results import (BACKWARD, FORWARD, REGISTERED, find_node, load_result, map_point, restore_interpolation)
from .runner import (CANCELLED, DONE, FAILED, RegistrationRunner, RegistrationWorker, register_command,
                     register_request)
from .views import (USER_TRANSFORM_ATTRIBUTE, checkerboard_volume, difference_volume, restore_user_transforms,
                    show_comparison, show_direction)
from .volumes import image_to_node, node_to_image, write_volume

#: where the library is (the folder holding InverseRegLib/): set by the caller (pytest's test
#: file, or InverseReg.py inside Slicer) before the tests run
LIBRARY_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: the Python that runs the registration process (PythonSlicer inside Slicer)
PYTHON = sys.executable
#: when set, the rendered views are also written there as PNGs (docs/figures)
FIGURES_DIR = os.environ.get("INVERSEREG_FIGURES")


def require_torch() -> None:
    if not torch_available():
        raise unittest.SkipTest("torch is not installed in this Python (Slicer's extension build machines have "
                                "none): the registration tests are skipped; install the PyTorch extension to run them")


def volume_node(scene, image: sitk.Image, name: str):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image_to_node(image, node)
    node.CreateDefaultDisplayNodes()
    node.GetDisplayNode().SetAutoWindowLevel(False)
    low, high = np.percentile(sitk.GetArrayViewFromImage(image), [1, 99])
    node.GetDisplayNode().SetWindowLevel(float(high - low), float(high + low) / 2)
    return node


def synthetic_pair():
    """A small synthetic brain pair, the moving image on a grid of its own (other size, spacing,
    origin and an oblique direction), so that each transform must land on its own volume's grid."""
    if LIBRARY_DIR not in sys.path:
        sys.path.insert(0, LIBRARY_DIR)
    from InverseRegLib.synthetic import make_pair
    fixed, moving, _, _ = make_pair(size=(48, 56, 48), spacing=(3.4, 3.4, 3.4), seed=2)
    angle = np.radians(8.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    grid = sitk.Image([44, 50, 40], sitk.sitkFloat32)
    grid.SetSpacing((3.6, 3.8, 4.0))
    grid.SetDirection(tuple((np.asarray(moving.GetDirection()).reshape(3, 3) @ rotation).ravel()))
    centre = np.asarray(moving.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in moving.GetSize()]))
    half = np.asarray(grid.GetDirection()).reshape(3, 3) @ ((np.asarray(grid.GetSize()) - 1) / 2.0 * np.asarray(grid.GetSpacing()))
    grid.SetOrigin(tuple(centre - half + np.array([2.0, -3.0, 1.5])))
    return fixed, sitk.Resample(moving, grid, sitk.Transform(), sitk.sitkLinear, 0.0)


def library_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = LIBRARY_DIR + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "2")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def node_counts(scene) -> dict:
    counts: dict = {}
    nodes = scene.GetNodes()
    for index in range(nodes.GetNumberOfItems()):
        name = nodes.GetItemAsObject(index).GetClassName()
        counts[name] = counts.get(name, 0) + 1
    return counts


class SceneBasicsTests(unittest.TestCase):
    """No registration needed: folders, user transforms, checks, the runner, failures."""

    def setUp(self):
        self.scene = slicer.vtkMRMLScene()
        fixed, moving = synthetic_pair()
        self.fixed = volume_node(self.scene, fixed, "fixed")
        self.moving = volume_node(self.scene, moving, "moving")

    def test_release_deletes_only_folders_the_module_created(self):
        # defect 1: a user's own result folder and its enclosing folder survive; only the
        # module's own temporary run folders are deleted
        work = tempfile.mkdtemp(prefix="InverseReg-user-")
        try:
            users_results = os.path.join(work, "results")
            os.makedirs(users_results)
            keep = os.path.join(work, "notes.txt")
            with open(keep, "w") as handle:
                handle.write("the user's own file")
            folders = TemporaryFolders()
            run = folders.create()
            self.assertFalse(folders.release(users_results))
            self.assertTrue(os.path.isfile(keep) and os.path.isdir(users_results))
            self.assertTrue(folders.release(os.path.join(run, "result")))
            self.assertFalse(os.path.exists(run))
            self.assertTrue(os.path.isfile(keep) and os.path.isdir(users_results))
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _module_transforms(self):
        forward = self.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "forward")
        forward.SetAttribute(ROLE_ATTRIBUTE, FORWARD)
        backward = self.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "backward")
        backward.SetAttribute(ROLE_ATTRIBUTE, BACKWARD)
        return forward, backward

    def test_user_transforms_are_named_and_put_back(self):
        # defect 7: showing a direction replaces the user's parent transforms only visibly, and
        # restoring puts them back
        forward, backward = self._module_transforms()
        users = [self.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name) for name in ("my rigid", "my shift")]
        self.fixed.SetAndObserveTransformNodeID(users[0].GetID())
        self.moving.SetAndObserveTransformNodeID(users[1].GetID())
        messages = show_direction(self.scene, self.fixed, self.moving, forward, backward, forward=True)
        self.assertEqual(len(messages), 2, messages)
        self.assertTrue(any("my rigid" in m for m in messages) and any("my shift" in m for m in messages))
        self.assertIsNone(self.fixed.GetTransformNodeID())
        self.assertEqual(self.moving.GetTransformNodeID(), forward.GetID())
        # switching direction must not record the module's own transform as the user's
        self.assertEqual(show_direction(self.scene, self.fixed, self.moving, forward, backward, forward=False), [])
        self.assertEqual(self.fixed.GetTransformNodeID(), backward.GetID())
        restore_user_transforms(self.scene, [self.fixed, self.moving])
        self.assertEqual(self.fixed.GetTransformNodeID(), users[0].GetID())
        self.assertEqual(self.moving.GetTransformNodeID(), users[1].GetID())
        self.assertIsNone(self.fixed.GetAttribute(USER_TRANSFORM_ATTRIBUTE))

    def test_restore_without_user_transforms_takes_volumes_off_the_module_transforms(self):
        forward, backward = self._module_transforms()
        show_direction(self.scene, self.fixed, self.moving, forward, backward, forward=True)
        restore_user_transforms(self.scene, [self.fixed, self.moving])
        self.assertIsNone(self.moving.GetTransformNodeID())

    def test_checkerboard_and_difference_refuse_without_result_and_leave_nothing(self):
        # defect 5: no CLI node, no empty output volume when the comparison cannot be made
        before = node_counts(self.scene)
        with self.assertRaisesRegex(ValueError, "Register first"):
            checkerboard_volume(self.scene, self.fixed, self.moving)
        with self.assertRaisesRegex(ValueError, "Register first"):
            difference_volume(self.scene, self.fixed, self.moving, after=True)
        self.assertEqual(node_counts(self.scene), before)
        self.assertEqual(self.scene.GetNumberOfNodesByClass("vtkMRMLCommandLineModuleNode"), 0)

    def test_input_problems_are_sentences(self):
        self.assertIsNone(input_problem(self.fixed, self.moving))
        self.assertIn("same volume", input_problem(self.fixed, self.fixed))
        self.assertIn("Select a moving", input_problem(self.fixed, None))
        labels = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
        self.assertIn("both label maps", input_problem(self.fixed, self.moving, labels, None))
        self.assertIn("label map", input_problem(labels, self.moving))

    def test_command_passes_quality_only_when_best(self):
        fast = register_command("python", "f.nrrd", "m.nrrd", "out")
        self.assertNotIn("--quality", fast)
        best = register_command("python", "f.nrrd", "m.nrrd", "out", quality="best")
        self.assertEqual(best[best.index("--quality") + 1], "best")
        with self.assertRaises(ValueError):
            register_command("python", "f.nrrd", "m.nrrd", "out", quality="slow")

    def test_command_passes_mutual_inverse_only_when_asked(self):
        self.assertNotIn("--mutual-inverse", register_command("python", "f.nrrd", "m.nrrd", "out"))
        asked = register_command("python", "f.nrrd", "m.nrrd", "out", mutual_inverse=200)
        self.assertEqual(asked[asked.index("--mutual-inverse") + 1], "200")
        request = register_request("1", "f.nrrd", "m.nrrd", "out", mutual_inverse=200)
        self.assertEqual(request["options"]["mutual_inverse"], "200")
        with self.assertRaises(ValueError):
            register_command("python", "f.nrrd", "m.nrrd", "out", mutual_inverse=-1)
        # the target only when set; alone, the command's own cap of steps applies (as on the command
        # line); read back exactly as the panel's 3 decimals set it
        alone = register_command("python", "f.nrrd", "m.nrrd", "out", mutual_target=0.01)
        self.assertNotIn("--mutual-inverse", alone)
        self.assertEqual(float(alone[alone.index("--mutual-target") + 1]), 0.01)
        self.assertNotIn("--mutual-target", asked)
        targeted = register_command("python", "f.nrrd", "m.nrrd", "out", mutual_inverse=400, mutual_target=0.01)
        self.assertEqual(float(targeted[targeted.index("--mutual-target") + 1]), 0.01)
        request = register_request("1", "f.nrrd", "m.nrrd", "out", mutual_inverse=400, mutual_target=0.01)
        self.assertEqual(float(request["options"]["mutual_target"]), 0.01)
        with self.assertRaises(ValueError):
            register_command("python", "f.nrrd", "m.nrrd", "out", mutual_inverse=10, mutual_target=-0.5)

    def test_runner_reports_an_error_event_and_a_crash(self):
        failing = RegistrationRunner([PYTHON, "-c", "import json,sys; print(json.dumps({'event': 'progress', "
                                      "'fraction': 0.5, 'message': 'half'})); print(json.dumps({'event': 'error', "
                                      "'message': 'bad input'})); sys.exit(2)"], output="unused")
        self.assertEqual(failing.wait(timeout=60), FAILED)
        self.assertEqual((failing.fraction, failing.error), (0.5, "bad input"))
        crash = RegistrationRunner([PYTHON, "-c", "print('Traceback: boom'); raise SystemExit(3)"], output="unused")
        self.assertEqual(crash.wait(timeout=60), FAILED)
        self.assertIn("status 3", crash.error)
        self.assertIn("boom", crash.error)

    def test_cancel_kills_the_process(self):
        runner = RegistrationRunner([PYTHON, "-c", "import time; time.sleep(60)"], output="unused")
        runner.poll()
        self.assertFalse(runner.finished)
        runner.cancel()
        self.assertEqual(runner.state, CANCELLED)
        self.assertIsNotNone(runner.process.returncode)

    def test_exported_volume_reads_back_with_its_geometry(self):
        folder = tempfile.mkdtemp(prefix="InverseReg-export-")
        try:
            path = os.path.join(folder, "fixed.nrrd")
            write_volume(self.fixed, path)
            back = sitk.ReadImage(path)
            original = node_to_image(self.fixed)
            np.testing.assert_allclose(back.GetOrigin(), original.GetOrigin(), atol=1e-5)
            np.testing.assert_allclose(back.GetDirection(), original.GetDirection(), atol=1e-6)
            np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(original))
            # the same point in Slicer's RAS and in the file's LPS
            ras = [0.0] * 4
            matrix = vtk.vtkMatrix4x4()
            self.fixed.GetIJKToRASMatrix(matrix)
            matrix.MultiplyPoint([2.0, 3.0, 4.0, 1.0], ras)
            lps = back.TransformContinuousIndexToPhysicalPoint((2.0, 3.0, 4.0))
            np.testing.assert_allclose(np.multiply(ras[:3], [-1, -1, 1]), lps, atol=1e-5)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


class RegisteredSceneTests(unittest.TestCase):
    """One real registration (subprocess), loaded into fresh scenes by the module's own code."""

    folders = TemporaryFolders("InverseReg-test-")

    @classmethod
    def setUpClass(cls):
        require_torch()
        cls.fixed_image, cls.moving_image = synthetic_pair()
        scene = slicer.vtkMRMLScene()
        fixed = volume_node(scene, cls.fixed_image, "fixed")
        moving = volume_node(scene, cls.moving_image, "moving")
        run = cls.folders.create()
        inputs = {name: os.path.join(run, f"{name}.nrrd") for name in ("fixed", "moving")}
        write_volume(fixed, inputs["fixed"])
        write_volume(moving, inputs["moving"])
        cls.output = os.path.join(run, "result")
        runner = RegistrationRunner(register_command(PYTHON, inputs["fixed"], inputs["moving"], cls.output,
                                                     device="cpu", affine="none"), cls.output, env=library_env())
        state = runner.wait(timeout=600)
        if state != DONE:
            raise AssertionError(f"the registration process failed: {runner.error}")
        cls.report = runner.report
        with open(os.path.join(cls.output, "report.json")) as handle:
            assert json.load(handle) == cls.report

    @classmethod
    def tearDownClass(cls):
        cls.folders.release_all()

    def setUp(self):
        self.scene = slicer.vtkMRMLScene()
        self.fixed = volume_node(self.scene, self.fixed_image, "fixed")
        self.moving = volume_node(self.scene, self.moving_image, "moving")
        self.forward, self.backward, _ = load_result(self.scene, self.fixed, self.moving, self.output)

    def _foreground_points(self, volume, count=200, seed=0):
        """RAS points in the volume's foreground (intensity above 10 %), off the voxel centres
        (where linear and cubic interpolation of a grid on that volume would agree)."""
        image = node_to_image(volume)
        array = sitk.GetArrayViewFromImage(image)
        k, j, i = np.nonzero(array > 0.1 * array.max())
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(k), size=min(count, len(k)), replace=False)
        jitter = rng.uniform(-0.45, 0.45, size=(len(pick), 3))
        points = [image.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in np.add((i[n], j[n], k[n]), d)))
                  for n, d in zip(pick, jitter)]
        return np.asarray(points) * np.array([-1.0, -1.0, 1.0])

    def test_each_grid_matches_its_volume_and_forward_then_backward_returns(self):
        for node, volume in ((self.forward, self.fixed), (self.backward, self.moving)):
            grid = node.GetTransformFromParent()
            self.assertIsInstance(grid, slicer.vtkOrientedGridTransform)
            self.assertEqual(grid.GetInterpolationMode(), vtk.VTK_LINEAR_INTERPOLATION)  # linear, as ITK applies the files
            image = grid.GetDisplacementGrid()
            self.assertEqual(image.GetDimensions(), volume.GetImageData().GetDimensions())
            np.testing.assert_allclose(image.GetSpacing(), volume.GetSpacing(), atol=1e-6)
            np.testing.assert_allclose(image.GetOrigin(), volume.GetOrigin(), atol=1e-4)
            direction, volume_direction = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
            volume.GetIJKToRASDirectionMatrix(volume_direction)
            direction.DeepCopy(grid.GetGridDirectionMatrix())
            for r in range(3):
                for c in range(3):
                    self.assertAlmostEqual(direction.GetElement(r, c), volume_direction.GetElement(r, c), places=6)
        errors, moved = [], []
        for point in self._foreground_points(self.fixed):
            in_moving = map_point(self.forward, point)
            moved.append(np.linalg.norm(in_moving - point))
            errors.append(np.linalg.norm(map_point(self.backward, in_moving) - point))
        self.assertGreater(float(np.mean(moved)), 0.3, "the registration should move points")
        # the library's own measure of the same thing, on the fixed foreground
        self.assertLess(float(np.mean(errors)), max(1.5 * self.report["ice_mean_mm"], 0.05))

    def test_registration_roles_name_the_moved_volume(self):
        moving_role = slicer.vtkMRMLTransformNode.GetMovingNodeReferenceRole()
        fixed_role = slicer.vtkMRMLTransformNode.GetFixedNodeReferenceRole()
        self.assertEqual(self.forward.GetNodeReferenceID(moving_role), self.moving.GetID())
        self.assertEqual(self.forward.GetNodeReferenceID(fixed_role), self.fixed.GetID())
        # the backward transform moves the fixed volume onto the moving one
        self.assertEqual(self.backward.GetNodeReferenceID(moving_role), self.fixed.GetID())
        self.assertEqual(self.backward.GetNodeReferenceID(fixed_role), self.moving.GetID())

    def test_hardening_the_moving_volume_gives_the_librarys_registered_image(self):
        hardened = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "hardened")
        image_to_node(node_to_image(self.moving), hardened)
        hardened.SetAndObserveTransformNodeID(self.forward.GetID())
        slicer.vtkSlicerTransformLogic().hardenTransform(hardened)
        self.assertIsNone(hardened.GetTransformNodeID())
        reference = sitk.Cast(node_to_image(self.fixed), sitk.sitkFloat32)
        # Slicer resamples onto a grid covering the transformed volume: bring it onto the fixed grid
        ours = sitk.Resample(sitk.Cast(node_to_image(hardened), sitk.sitkFloat32), reference, sitk.Transform(),
                             sitk.sitkLinear, 0.0)
        library = sitk.ReadImage(os.path.join(self.output, "moving_warped.nii.gz"), sitk.sitkFloat32)
        a, b = sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(library)
        inside = sitk.GetArrayFromImage(reference) > 0.1 * float(sitk.GetArrayViewFromImage(reference).max())
        scale = float(np.abs(b[inside]).mean())
        untouched = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(node_to_image(self.moving), sitk.sitkFloat32),
                                                         reference, sitk.Transform(), sitk.sitkLinear, 0.0))
        error, before = np.abs(a - b)[inside].mean() / scale, np.abs(untouched - b)[inside].mean() / scale
        self.assertLess(error, 0.04, f"mean |hardened - moving_warped| is {error:.3f} of the mean intensity")
        self.assertLess(error, 0.5 * before)

    def test_slicers_reader_takes_the_files_without_warning_and_maps_as_the_nodes(self):
        for name, node in (("forward.nii.gz", self.forward), ("backward.nii.gz", self.backward)):
            loaded = self.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", f"loaded {name}")
            storage = self.scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
            storage.SetFileName(os.path.join(self.output, name))
            self.assertEqual(storage.ReadData(loaded), 1)
            messages = storage.GetUserMessages()
            self.assertEqual(messages.GetNumberOfMessages(), 0,
                             [messages.GetNthMessageText(i) for i in range(messages.GetNumberOfMessages())])
            self.assertEqual(loaded.GetTransformFromParent().GetInterpolationMode(), vtk.VTK_CUBIC_INTERPOLATION)  # the reader's
            loaded.GetTransformFromParent().SetInterpolationModeToLinear()
            volume = self.fixed if name.startswith("forward") else self.moving
            for point in self._foreground_points(volume, 50):
                np.testing.assert_allclose(map_point(loaded, point), map_point(node, point), atol=1e-4)

    def _save_and_reload(self, kind: str, folder: str):
        scene = self.scene
        if kind == "mrml":
            nodes = scene.GetNodes()
            for index in range(nodes.GetNumberOfItems()):
                node = nodes.GetItemAsObject(index)
                if node.IsA("vtkMRMLStorableNode") and not node.IsA("vtkMRMLStorageNode") \
                        and not node.GetHideFromEditors() and node.GetStorageNode() is None:
                    if node.AddDefaultStorageNode():
                        storage = node.GetStorageNode()
                        storage.SetFileName(os.path.join(folder, f"{node.GetID()}{storage.GetDefaultWriteFileExtension() and '.' + storage.GetDefaultWriteFileExtension()}"))
                        self.assertEqual(storage.WriteData(node), 1, node.GetName())
            scene.SetURL(os.path.join(folder, "scene.mrml"))
            self.assertEqual(scene.Commit(), 1)
            loaded = slicer.vtkMRMLScene()
            loaded.SetURL(os.path.join(folder, "scene.mrml"))
            self.assertEqual(loaded.Connect(), 1)
        else:
            path = os.path.join(folder, "scene.mrb")
            loaded = slicer.vtkMRMLScene()
            for target in (scene, loaded):
                cache = slicer.vtkCacheManager()
                cache.SetRemoteCacheDirectory(tempfile.mkdtemp(prefix="cache-", dir=folder))
                io = slicer.vtkDataIOManager()
                io.SetCacheManager(cache)
                target.SetCacheManager(cache)
                target.SetDataIOManager(io)
            self.assertTrue(scene.WriteToMRB(path))
            self.assertTrue(loaded.ReadFromMRB(path))
        return loaded

    def _scene_round_trip(self, kind: str):
        parameters = self.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "InverseReg")
        parameters.SetAttribute("ModuleName", "InverseReg")
        parameters.SetParameter("quality", "best")
        for role, node in (("fixedVolume", self.fixed), ("movingVolume", self.moving),
                           ("forwardTransform", self.forward), ("backwardTransform", self.backward)):
            parameters.SetNodeReferenceID(role, node.GetID())
        composite = self.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName("Red")
        show_comparison(self.scene, self.fixed, self.moving, self.forward, self.backward, "difference")
        show_direction(self.scene, self.fixed, self.moving, self.forward, self.backward, forward=True)
        points = self._foreground_points(self.fixed, 80)
        expected = [map_point(self.forward, p) for p in points]
        counts = node_counts(self.scene)
        folder = tempfile.mkdtemp(prefix=f"InverseReg-{kind}-")
        try:
            loaded = self._save_and_reload(kind, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        forward = loaded.GetNodeByID(self.forward.GetID())
        backward = loaded.GetNodeByID(self.backward.GetID())
        self.assertEqual(forward.GetAttribute(ROLE_ATTRIBUTE), FORWARD)
        cubic = max(np.linalg.norm(map_point(forward, p) - e) for p, e in zip(points, expected))
        self.assertEqual(restore_interpolation(loaded), 2)
        linear = max(np.linalg.norm(map_point(forward, p) - e) for p, e in zip(points, expected))
        self.assertLess(linear, 0.01, f"reloaded forward transform moves points by up to {linear:.4f} mm")
        # what Slicer's reader alone gives (cubic), i.e. the defect the fix-up removes
        self.assertGreater(cubic, max(10 * linear, 0.01), f"cubic {cubic:.4f} mm, linear {linear:.6f} mm")
        print(f"reloaded ({kind}): up to {cubic:.4f} mm off with the reader's cubic, {linear:.2e} mm linear")
        moving_role = slicer.vtkMRMLTransformNode.GetMovingNodeReferenceRole()
        self.assertEqual(backward.GetNodeReferenceID(moving_role), self.fixed.GetID())
        self.assertEqual(loaded.GetNodeByID(self.moving.GetID()).GetTransformNodeID(), forward.GetID())
        node = loaded.GetNodeByID(parameters.GetID())
        self.assertEqual(node.GetParameter("quality"), "best")
        self.assertEqual(node.GetNodeReferenceID("forwardTransform"), forward.GetID())
        composite_loaded = loaded.GetNodeByID(composite.GetID())
        difference = find_node(self.scene, "difference")
        self.assertEqual(composite_loaded.GetBackgroundVolumeID(), difference.GetID())
        self.assertIsNotNone(loaded.GetNodeByID(difference.GetID()).GetImageData())
        after = node_counts(loaded)
        # saving adds storage nodes and loading the scene's own subject hierarchy (a singleton the
        # application always has); nothing else may appear or go missing
        strip = lambda c: {k: v for k, v in c.items() if "Storage" not in k  # noqa: E731
                           and k != "vtkMRMLSubjectHierarchyNode"}
        self.assertEqual(strip(after), strip(counts))

    def test_scene_saved_as_mrml_loads_back_the_same(self):
        self._scene_round_trip("mrml")

    def test_scene_saved_as_mrb_loads_back_the_same(self):
        self._scene_round_trip("mrb")

    def test_a_result_of_other_volumes_or_an_incomplete_folder_is_refused_and_nothing_is_added(self):
        counts = node_counts(self.scene)
        with self.assertRaisesRegex(ValueError, "not on the grid"):
            load_result(self.scene, self.moving, self.fixed, self.output)  # the volumes swapped
        small = volume_node(self.scene, sitk.Shrink(self.fixed_image, [2, 2, 2]), "small")
        counts = node_counts(self.scene)
        with self.assertRaisesRegex(ValueError, "not on the grid of the volume 'small'"):
            load_result(self.scene, small, self.moving, self.output)
        empty = tempfile.mkdtemp(prefix="InverseReg-empty-")
        try:
            with self.assertRaisesRegex(ValueError, "has no forward.nii.gz"):
                load_result(self.scene, self.fixed, self.moving, empty)
        finally:
            shutil.rmtree(empty, ignore_errors=True)
        self.assertEqual(node_counts(self.scene), counts)

    def test_rerun_updates_the_same_nodes(self):
        show_comparison(self.scene, self.fixed, self.moving, self.forward, self.backward, "checkerboard")
        counts = node_counts(self.scene)
        forward, backward, _ = load_result(self.scene, self.fixed, self.moving, self.output,
                                           self.forward, self.backward)
        self.assertEqual((forward.GetID(), backward.GetID()), (self.forward.GetID(), self.backward.GetID()))
        show_comparison(self.scene, self.fixed, self.moving, forward, backward, "checkerboard")
        self.assertEqual(node_counts(self.scene), counts)
        self.assertEqual(len([n for n in (find_node(self.scene, REGISTERED, self.moving),
                                          find_node(self.scene, REGISTERED, self.fixed)) if n]), 2)

    def test_worker_answers_requests_in_turn_and_a_cancel_ends_it(self):
        """The persistent worker the module uses: a bad request is answered and the worker lives
        on; a good one gives the result the one-shot command gave; cancel kills it; the next
        request starts a new one."""
        worker = RegistrationWorker(PYTHON, env=library_env())
        run = self.folders.create()
        try:
            inputs = [os.path.join(os.path.dirname(self.output), f"{name}.nrrd") for name in ("fixed", "moving")]
            bad = worker.submit(inputs[0], os.path.join(run, "missing.nrrd"), os.path.join(run, "bad"), device="cpu")
            self.assertEqual(bad.wait(timeout=300), FAILED)
            self.assertIn("missing.nrrd", bad.error)
            self.assertTrue(worker.alive)
            good = worker.submit(*inputs, os.path.join(run, "good"), device="cpu", affine="none")
            self.assertEqual(good.wait(timeout=300), DONE, good.error)
            self.assertGreater(good.fraction, 0.9)
            for key in ("ice_mean_mm", "folding_percent_forward", "model_id"):
                self.assertEqual(good.report[key], self.report[key], key)
            scene = slicer.vtkMRMLScene()
            fixed, moving = volume_node(scene, self.fixed_image, "fixed"), volume_node(scene, self.moving_image, "moving")
            forward, _, _ = load_result(scene, fixed, moving, good.output)
            for point in self._foreground_points(self.fixed, 20):
                np.testing.assert_allclose(map_point(forward, point), map_point(self.forward, point), atol=1e-4)
            slow = worker.submit(*inputs, os.path.join(run, "slow"), device="cpu", refine=200)
            slow.cancel()
            self.assertEqual(slow.state, CANCELLED)
            self.assertFalse(worker.alive)
            again = worker.submit(inputs[0], os.path.join(run, "missing.nrrd"), os.path.join(run, "again"), device="cpu")
            self.assertEqual(again.wait(timeout=300), FAILED)
            self.assertTrue(worker.alive)
        finally:
            worker.stop()
            self.folders.release(run)

    def test_difference_is_signed_and_smaller_after_registration(self):
        # defect 4: both signs of the misalignment are in the volume; Subtract compositing would
        # have shown only max(0, fixed - moving)
        for forward in (True, False):
            before = difference_volume(self.scene, self.fixed, self.moving, forward, after=False)
            values_before = sitk.GetArrayFromImage(node_to_image(before))
            after = difference_volume(self.scene, self.fixed, self.moving, forward, after=True)
            values_after = sitk.GetArrayFromImage(node_to_image(after))
            self.assertLess(values_before.min(), -0.1 * values_before.max())
            self.assertGreater(values_before.max(), 0)
            self.assertLess(np.abs(values_after).mean(), 0.85 * np.abs(values_before).mean())
            self.assertNotEqual(before.GetID(), after.GetID())

    def test_every_view_rendered_offscreen(self):
        from .render import SliceRenderer
        renderer = SliceRenderer(self.scene, size=(220, 240))
        pictures = {}
        for name, mode, forward in (("difference_before", "differenceBefore", True),
                                    ("difference_after", "difference", True), ("blend", "blend", True),
                                    ("checkerboard", "checkerboard", True),
                                    ("backward_blend", "blend", False),
                                    ("backward_difference_after", "difference", False)):
            show_comparison(self.scene, self.fixed, self.moving, self.forward, self.backward, mode, forward)
            renderer.fit()
            pictures[name] = renderer.rgba().astype(float)
            if FIGURES_DIR:
                renderer.save_png(os.path.join(FIGURES_DIR, f"slicer_{name}.png"))
        for name, picture in pictures.items():
            # something is drawn; after registration a difference has little left to draw (the
            # default's model-grid stage leaves the backward one at a pixel std of ~3.7), so there
            # the bar is "not blank" (a blank view has std 0) and the ink comparison below
            self.assertGreater(picture[..., :3].std(), 1.0 if name.endswith("difference_after") else 5.0, name)
        # distance of each pixel from white (the diverging table's colour at zero difference)
        ink = {k: (255.0 - pictures[k][..., :3]).sum(-1).mean() for k in ("difference_before", "difference_after")}
        self.assertLess(ink["difference_after"], 0.85 * ink["difference_before"], ink)
        # both signs appear: blue-ish (negative) and red-ish (positive) pixels, at least 0.1 % each
        rgb = pictures["difference_before"][..., :3]
        blue, red = ((rgb[..., 2] - rgb[..., 0]) > 40).mean(), ((rgb[..., 0] - rgb[..., 2]) > 40).mean()
        self.assertGreater(min(blue, red), 0.001, (blue, red))
        self.assertGreater(np.abs(pictures["blend"] - pictures["backward_blend"]).mean(), 1.0)

    # --- the panel's "After registration" section: the scene functions its Logic methods call ------

    def _labels_on(self, volume, name):
        """Two labels (darker and brighter tissue) drawn on ``volume``'s own grid."""
        from .carry import image_to_volume
        image = node_to_image(volume)
        values = sitk.GetArrayFromImage(image)
        labels = np.zeros(values.shape, np.int16)
        labels[values > 0.25 * values.max()] = 1
        labels[values > 0.6 * values.max()] = 2
        label_image = sitk.GetImageFromArray(labels)
        label_image.CopyInformation(image)
        return image_to_volume(self.scene, label_image, name, "vtkMRMLLabelMapVolumeNode"), label_image

    def test_panel_carries_label_maps_and_segmentations_to_the_other_volume(self):
        """carry_to_other_volume (Logic.carryToOtherVolume) on the module's own transform nodes:
        a label map on the moving volume lands on the fixed grid as SimpleITK carries it through
        forward.nii.gz (nearest neighbour, which differs only at boundaries), one on the fixed
        volume on the moving grid through backward.nii.gz; a segmentation goes by the volume it
        references; one on a third volume's grid is refused and adds nothing."""
        from InverseRegLib.errors import InverseRegError
        from .carry import carry_to_other_volume, show_on_volume, volume_to_image
        for source, target, field_file in ((self.moving, self.fixed, "forward.nii.gz"),
                                           (self.fixed, self.moving, "backward.nii.gz")):
            labels, label_image = self._labels_on(source, f"labels on {source.GetName()}")
            carried, onto = carry_to_other_volume(self.scene, labels, self.fixed, self.moving,
                                                  self.forward, self.backward)
            self.assertEqual(onto.GetID(), target.GetID())
            self.assertTrue(carried.IsA("vtkMRMLLabelMapVolumeNode"))
            got = volume_to_image(carried)
            reference = node_to_image(target)
            self.assertEqual(got.GetSize(), reference.GetSize())
            np.testing.assert_allclose(got.GetOrigin(), reference.GetOrigin(), atol=1e-4)
            field = sitk.Cast(sitk.ReadImage(os.path.join(self.output, field_file)), sitk.sitkVectorFloat64)
            expected = sitk.Resample(label_image, reference, sitk.DisplacementFieldTransform(field),
                                     sitk.sitkNearestNeighbor, 0, sitk.sitkInt16)
            a, b = sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(expected)
            self.assertTrue(set(np.unique(a)) <= {0, 1, 2})  # no new label values
            self.assertGreater(np.mean(a == b), 0.98, field_file)
            print(f"carried through {field_file}: {np.mean(a == b):.4f} of voxels as SimpleITK's nearest neighbour")
            self.assertGreater(np.count_nonzero(a == 2), 0.5 * np.count_nonzero(b == 2))
            # shown where it lies: over its volume, which the chosen direction leaves untransformed
            composite = self.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") if not self.scene.GetNumberOfNodesByClass(
                "vtkMRMLSliceCompositeNode") else self.scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode")
            show_on_volume(self.scene, carried, onto, self.fixed, self.moving, self.forward, self.backward)
            self.assertEqual((composite.GetBackgroundVolumeID(), composite.GetLabelVolumeID()),
                             (target.GetID(), carried.GetID()))
            self.assertIsNone(target.GetTransformNodeID())
            self.assertEqual(source.GetTransformNodeID(), (self.forward if target is self.fixed else self.backward).GetID())
        # a segmentation drawn on the moving volume (as Segment Editor references it)
        segmentation = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "atlas")
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(self.moving)
        labels, _ = self._labels_on(self.moving, "atlas labels")
        self.assertTrue(slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labels, segmentation))
        carried, onto = carry_to_other_volume(self.scene, segmentation, self.fixed, self.moving,
                                              self.forward, self.backward)
        self.assertEqual(onto.GetID(), self.fixed.GetID())
        self.assertTrue(carried.IsA("vtkMRMLSegmentationNode"))
        self.assertEqual(carried.GetSegmentation().GetNumberOfSegments(), 2)
        # a label map and a segmentation on a third volume's grid, and no result yet
        third_image = sitk.Shrink(self.fixed_image, [2, 2, 2])
        third = volume_node(self.scene, third_image, "third")
        third_labels, _ = self._labels_on(third, "labels on third")
        other = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "on third")
        other.SetReferenceImageGeometryParameterFromVolumeNode(third)
        self.assertTrue(slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(third_labels, other))
        counts = node_counts(self.scene)
        with self.assertRaisesRegex(InverseRegError, "on neither the fixed volume's nor the moving"):
            carry_to_other_volume(self.scene, third_labels, self.fixed, self.moving, self.forward, self.backward)
        with self.assertRaisesRegex(InverseRegError, "does not name the fixed or the moving volume"):
            carry_to_other_volume(self.scene, other, self.fixed, self.moving, self.forward, self.backward)
        with self.assertRaisesRegex(InverseRegError, "Register first"):
            carry_to_other_volume(self.scene, labels, self.fixed, self.moving, None, None)
        with self.assertRaisesRegex(InverseRegError, "neither a segmentation nor a label map"):
            carry_to_other_volume(self.scene, self.fixed, self.fixed, self.moving, self.forward, self.backward)
        self.assertEqual(node_counts(self.scene), counts)

    def _markups(self, name, ras, labels=None):
        node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        for k, p in enumerate(ras):
            node.AddControlPoint(float(p[0]), float(p[1]), float(p[2]), labels[k] if labels else f"P{k}")
        return node

    def _positions(self, node):
        out = np.zeros((node.GetNumberOfControlPoints(), 3))
        for k in range(len(out)):
            node.GetNthControlPointPosition(k, out[k])
        return out

    def test_panel_moves_points_both_ways_and_measures_the_error(self):
        """carry_markups_between (Logic.carryMarkups) moves points as SimpleITK's TransformPoint
        does with the field files; markups_registration_error (Logic.markupsError) on
        corresponding points: moving points made as forward(p) give 0 fixed-to-moving error and,
        moving to fixed, the inverse-consistency error of backward(forward(p))."""
        from InverseRegLib.errors import InverseRegError
        from .carry import carry_markups_between, markups_registration_error, registration_error_sentence
        flip = np.array([-1.0, -1.0, 1.0])
        on_fixed = self._markups("landmarks", self._foreground_points(self.fixed, 12, seed=3))
        moved = carry_markups_between(self.scene, on_fixed, self.fixed, self.fixed, self.moving,
                                      self.forward, self.backward)
        self.assertEqual(moved.GetName(), "landmarks on moving")
        forward_file = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(os.path.join(self.output, "forward.nii.gz")),
                                                                 sitk.sitkVectorFloat64))
        expected = np.array([forward_file.TransformPoint(tuple(p * flip)) for p in self._positions(on_fixed)]) * flip
        np.testing.assert_allclose(self._positions(moved), expected, atol=1e-4)
        self.assertGreater(np.abs(self._positions(moved) - self._positions(on_fixed)).max(), 0.5)
        on_moving = self._markups("moving landmarks", self._foreground_points(self.moving, 10, seed=4))
        back = carry_markups_between(self.scene, on_moving, self.moving, self.fixed, self.moving,
                                     self.forward, self.backward)
        backward_file = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(os.path.join(self.output, "backward.nii.gz")),
                                                                  sitk.sitkVectorFloat64))
        expected = np.array([backward_file.TransformPoint(tuple(p * flip)) for p in self._positions(on_moving)]) * flip
        np.testing.assert_allclose(self._positions(back), expected, atol=1e-4)
        # corresponding points, paired by label although listed in another order
        order = list(range(12))[::-1]
        partner = self._markups("partner", self._positions(moved)[order], [f"P{k}" for k in order])
        summary = markups_registration_error(on_fixed, partner, self.forward, self.backward)
        self.assertEqual(summary["pairs"], 12)
        self.assertLess(summary["fixed_to_moving"]["max_mm"], 1e-4)
        round_trip = np.array([map_point(self.backward, q) for q in self._positions(moved)])
        ice = np.linalg.norm(round_trip - self._positions(on_fixed), axis=1)
        self.assertAlmostEqual(summary["moving_to_fixed"]["mean_mm"], float(ice.mean()), delta=1e-3)
        self.assertAlmostEqual(summary["before"]["max_mm"],
                               float(np.linalg.norm(self._positions(moved) - self._positions(on_fixed), axis=1).max()),
                               delta=1e-6)
        line = registration_error_sentence(summary)
        print(line)
        self.assertIn("12 point pairs", line)
        self.assertIn(f"{summary['moving_to_fixed']['mean_mm']:.2f} mm mean", line)
        counts = node_counts(self.scene)
        with self.assertRaisesRegex(InverseRegError, "cannot pair"):
            markups_registration_error(on_fixed, on_moving, self.forward, self.backward)  # 12 and 10 points
        with self.assertRaisesRegex(InverseRegError, "same node"):
            markups_registration_error(on_fixed, on_fixed, self.forward, self.backward)
        with self.assertRaisesRegex(InverseRegError, "on both volumes"):
            markups_registration_error(on_fixed, None, self.forward, self.backward)
        with self.assertRaisesRegex(InverseRegError, "fixed or the moving volume"):
            carry_markups_between(self.scene, on_fixed, None, self.fixed, self.moving, self.forward, self.backward)
        empty = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "empty")
        counts = node_counts(self.scene)
        with self.assertRaisesRegex(InverseRegError, "no placed points"):
            carry_markups_between(self.scene, empty, self.fixed, self.fixed, self.moving, self.forward, self.backward)
        self.assertEqual(node_counts(self.scene), counts)

    def test_panel_shows_one_jacobian_over_its_volume(self):
        """show_jacobian (Logic.showJacobian): the library's det J of the chosen field over its own
        volume (untransformed) in every slice view; a second click replaces the first volume; a new
        registration removes it (it would be stale)."""
        from InverseRegLib.jacobian import jacobian_image
        from .carry import JACOBIAN, show_jacobian, volume_to_image
        from .results import nodes_with_role
        composites = []
        for name in ("Red", "Green", "Yellow"):
            composite = self.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
            composite.SetLayoutName(name)
            composites.append(composite)
        for backward, log, background in ((False, False, self.fixed), (True, True, self.moving)):
            node, messages = show_jacobian(self.scene, self.fixed, self.moving, self.forward, self.backward,
                                           backward_direction=backward, log=log, opacity=0.4)
            field = sitk.ReadImage(os.path.join(self.output, "backward.nii.gz" if backward else "forward.nii.gz"))
            expected = sitk.GetArrayFromImage(jacobian_image(sitk.Cast(field, sitk.sitkVectorFloat64), log))
            np.testing.assert_allclose(sitk.GetArrayFromImage(volume_to_image(node)), expected, atol=1e-5)
            self.assertEqual([n.GetID() for n in nodes_with_role(self.scene, JACOBIAN)], [node.GetID()])
            for composite in composites:
                self.assertEqual(composite.GetForegroundVolumeID(), node.GetID())
                self.assertEqual(composite.GetBackgroundVolumeID(), background.GetID())
                self.assertAlmostEqual(composite.GetForegroundOpacity(), 0.4)
            self.assertIsNone(background.GetTransformNodeID())  # the overlay's grid is where it is shown
            self.assertIn("3 slice view(s)", messages[-1])
        self.assertEqual(self.fixed.GetTransformNodeID(), self.backward.GetID())
        load_result(self.scene, self.fixed, self.moving, self.output, self.forward, self.backward)
        self.assertEqual(nodes_with_role(self.scene, JACOBIAN), [])


ALL_TEST_CASES = (SceneBasicsTests, RegisteredSceneTests)


def run_all(verbosity: int = 2) -> unittest.TestResult:
    """Run every scene test (what ``InverseRegTest`` does inside Slicer)."""
    suite = unittest.TestSuite(unittest.defaultTestLoader.loadTestsFromTestCase(case) for case in ALL_TEST_CASES)
    return unittest.TextTestRunner(verbosity=verbosity).run(suite)
