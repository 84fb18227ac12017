"""Every command-line option of ``register``, ``train`` and ``evaluate`` exercised end to end,
each with an effect that a parse-but-drop or a value mapped to another would change; the program
run the way users run it (a subprocess on a terminal, default progress bar); Ctrl-C.

Where an effect can be judged outside the library it is: Dice recomputed from SimpleITK's
resampling of the label map through the written field, the model id from the model file's
bytes, the affine's linear part from SimpleITK's reading of affine.tfm.
"""
from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import math
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from InverseRegLib.cli import main
from InverseRegLib.modelfile import load_model
from InverseRegLib.synthetic import make_pair
from InverseRegLib.modelfile import ModelGridSpec
from inversereg_testlib import small_model, write_model_file
from test_contract import identity_network_model, translation_network_model, T_PER_PASS
from training_data import write_subjects

ENV = dict(os.environ, OMP_NUM_THREADS="1")

#: a coarse model grid (16^3 voxels of 12 mm, RAS-stored like the test grids) that keeps each
#: registration in these tests well under a second; the options' effects do not need more
COARSE = ModelGridSpec((16, 16, 16), (12.0, 12.0, 12.0), (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))


@pytest.fixture(scope="module")
def files(tmp_path_factory, small_pair):
    """The small pair with its label maps as files, and three model files."""
    folder = tmp_path_factory.mktemp("cli_options")
    fixed, moving, fixed_seg, moving_seg, _ = small_pair
    paths = {}
    for name, image in (("fixed.nii.gz", fixed), ("moving.nii.gz", moving), ("fixed_seg.nii.gz", fixed_seg),
                        ("moving_seg.nii.gz", moving_seg)):
        paths[name] = folder / name
        sitk.WriteImage(image, str(paths[name]))
    paths["smooth.pt"] = write_model_file(folder / "smooth.pt", small_model("default", 2e4, grid=COARSE))
    paths["shift.pt"] = write_model_file(folder / "shift.pt", translation_network_model())
    identity = identity_network_model()
    identity.grid = COARSE
    paths["identity.pt"] = write_model_file(folder / "identity.pt", identity)
    return paths


def register_cli(capsys, files, outdir, *options, model="smooth.pt"):
    argv = ["register", files["fixed.nii.gz"], files["moving.nii.gz"], "-o", outdir, "--model", files[model],
            "--device", "cpu", *options]
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads((Path(outdir) / "report.json").read_text(encoding="utf-8")), out, err


def field(outdir, name="forward") -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(Path(outdir) / f"{name}.nii.gz")))


def test_model_and_device_are_used(capsys, files, tmp_path):
    report, _, _ = register_cli(capsys, files, tmp_path / "a", "--no-affine", "--progress", "none")
    assert report["model_id"] == hashlib.sha256(files["smooth.pt"].read_bytes()).hexdigest()[:12]
    assert Path(report["model_path"]) == files["smooth.pt"] and report["device"] == "cpu"
    code = main([str(a) for a in ["register", files["fixed.nii.gz"], files["moving.nii.gz"], "-o", tmp_path / "b",
                                  "--model", files["smooth.pt"], "--device", "tpu"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unknown device 'tpu'" in err[0]


def test_passes_multiply_a_known_translation(capsys, files, tmp_path):
    """The constant network moves points by T_PER_PASS per pass (test_contract.py)."""
    for passes in (1, 3):
        report, _, _ = register_cli(capsys, files, tmp_path / f"p{passes}", "--no-affine", "--passes", str(passes),
                                    "--polish", "0", "--progress", "none", model="shift.pt")
        assert report["passes"] == passes
        np.testing.assert_allclose(field(tmp_path / f"p{passes}").reshape(-1, 3).mean(0), passes * T_PER_PASS,
                                   atol=1e-4)


def test_polish_option_sets_the_model_grid_stage(capsys, files, tmp_path):
    """``--polish 0`` leaves the constant network's translation as it is; the default runs the
    stage (it then moves the field, since the translation is not the pair's answer); a negative
    count is one error line and exit status 2."""
    off, _, _ = register_cli(capsys, files, tmp_path / "off", "--no-affine", "--passes", "1", "--polish", "0",
                             "--progress", "none", model="shift.pt")
    on, _, _ = register_cli(capsys, files, tmp_path / "on", "--no-affine", "--passes", "1", "--progress", "none",
                            model="shift.pt")
    assert off["seconds_polish"] == 0 and on["seconds_polish"] > 0
    np.testing.assert_allclose(field(tmp_path / "off").reshape(-1, 3).mean(0), T_PER_PASS, atol=1e-4)
    assert np.abs(field(tmp_path / "on") - field(tmp_path / "off")).max() > 0.1
    code = main([str(a) for a in ["register", files["fixed.nii.gz"], files["moving.nii.gz"], "-o", tmp_path / "bad",
                                  "--model", files["shift.pt"], "--device", "cpu", "--polish", "-1"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--polish" in err[0]


def test_mutual_inverse_option_reaches_register(capsys, files, tmp_path):
    """``--mutual-inverse N`` runs that many joint steps (the report says so); a negative count is
    one error line and exit status 2, before anything is written."""
    report, _, _ = register_cli(capsys, files, tmp_path / "on", "--no-affine", "--passes", "1",
                                "--mutual-inverse", "3", "--progress", "none", model="shift.pt")
    assert report["mutual_steps"] == 3 and report["seconds_mutual"] > 0
    code = main([str(a) for a in ["register", files["fixed.nii.gz"], files["moving.nii.gz"], "-o", tmp_path / "bad",
                                  "--model", files["shift.pt"], "--device", "cpu", "--mutual-inverse", "-1"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--mutual-inverse" in err[0] and not (tmp_path / "bad").exists()


def test_mutual_target_alone_caps_the_steps_and_stops_them(capsys, files, tmp_path):
    """``--mutual-target MM`` alone asks for at most TARGET_ONLY_MAX_STEPS steps, stopped when both
    orders are within MM: the translation's exact inverse (without the model-grid stage) already
    is, so none runs (the report says so). A target of 0, or one with ``--mutual-inverse 0``, is one error line and exit 2."""
    from InverseRegLib.cli import TARGET_ONLY_MAX_STEPS
    report, out, _ = register_cli(capsys, files, tmp_path / "on", "--no-affine", "--passes", "1",
                                  "--polish", "0", "--mutual-target", "0.01", "--progress", "none", model="shift.pt")
    assert f"mutual-inverse target 0.01 mm reached after 0 of at most {TARGET_ONLY_MAX_STEPS} steps" in out
    assert report["mutual_steps"] == TARGET_ONLY_MAX_STEPS and report["mutual_target_mm"] == 0.01
    assert report["mutual_steps_run"] == 0 and report["mutual_reached_target"] is True
    for bad, says in ((["--mutual-target", "0"], "--mutual-target must be"),
                      (["--mutual-target", "0.01", "--mutual-inverse", "0"], "needs --mutual-inverse")):
        code = main([str(a) for a in ["register", files["fixed.nii.gz"], files["moving.nii.gz"], "-o",
                                      tmp_path / "bad", "--model", files["shift.pt"], "--device", "cpu", *bad]])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and says in err[0] and not (tmp_path / "bad").exists()


def test_precision_is_recorded_and_changes_the_network_arithmetic(capsys, files, tmp_path):
    full, _, _ = register_cli(capsys, files, tmp_path / "f32", "--no-affine", "--precision", "float32",
                              "--progress", "none")
    low, _, _ = register_cli(capsys, files, tmp_path / "bf16", "--no-affine", "--precision", "bfloat16",
                             "--progress", "none")
    assert full["precision"] == "float32" and low["precision"] == "bfloat16"
    a, b = field(tmp_path / "f32"), field(tmp_path / "bf16")
    size = float(np.linalg.norm(a, axis=-1).mean())
    difference = float(np.linalg.norm(a - b, axis=-1).mean())
    assert size > 0.5 and 0 < difference < 0.05 * size


def test_refine_steps_run_and_change_the_fields(capsys, files, tmp_path):
    plain, _, _ = register_cli(capsys, files, tmp_path / "r0", "--no-affine", "--passes", "1", "--progress", "none")
    refined, out, _ = register_cli(capsys, files, tmp_path / "r2", "--no-affine", "--passes", "1", "--refine", "2",
                                   "--progress", "json")
    assert plain["refine_steps"] == 0 and refined["refine_steps"] == 2
    messages = [json.loads(line).get("message", "") for line in out.splitlines() if line.strip()]
    assert any(m.startswith("refine 2/2") for m in messages)
    assert np.abs(field(tmp_path / "r0") - field(tmp_path / "r2")).max() > 1e-3


def test_label_maps_and_labels_give_the_dice_simpleitk_sees(capsys, files, tmp_path):
    outdir = tmp_path / "seg"
    report, _, _ = register_cli(capsys, files, outdir, "--no-affine", "--fixed-seg", files["fixed_seg.nii.gz"],
                                "--moving-seg", files["moving_seg.nii.gz"], "--labels", "2,41,4",
                                "--progress", "none")
    assert report["labels"] == [2, 41, 4] and sorted(report["dice_per_label"]) == ["2", "4", "41"]
    for seg, ref, name, key in (("moving_seg.nii.gz", "fixed_seg.nii.gz", "forward", "dice_per_label"),
                                ("fixed_seg.nii.gz", "moving_seg.nii.gz", "backward", "dice_per_label_backward")):
        reference = sitk.ReadImage(str(files[ref]))
        transform = sitk.DisplacementFieldTransform(sitk.ReadImage(str(outdir / f"{name}.nii.gz"), sitk.sitkVectorFloat64))
        warped = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(files[seg])), reference, transform,
                                                      sitk.sitkLabelLinear, 0))
        target = sitk.GetArrayFromImage(reference)
        for label in (2, 41, 4):
            a, b = warped == label, target == label
            dice = 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
            assert report[key][str(label)] == pytest.approx(dice, abs=0.01), (name, label)
    # "freesurfer" is the documented 28-structure set, restricted to labels the maps have
    report, _, _ = register_cli(capsys, files, tmp_path / "fs", "--no-affine", "--fixed-seg", files["fixed_seg.nii.gz"],
                                "--moving-seg", files["moving_seg.nii.gz"], "--labels", "freesurfer",
                                "--progress", "none")
    assert len(report["labels"]) == 28 and {2, 3, 41, 42} <= set(report["labels"])


def test_a_label_map_that_does_not_fit_its_image_is_refused(capsys, files, tmp_path):
    small = sitk.ReadImage(str(files["moving_seg.nii.gz"]))[2:-2, :, :]
    path = tmp_path / "cropped_seg.nii.gz"
    sitk.WriteImage(small, str(path))
    outdir = tmp_path / "out"
    code = main([str(a) for a in ["register", files["fixed.nii.gz"], files["moving.nii.gz"], "-o", outdir, "--model",
                                  files["smooth.pt"], "--device", "cpu", "--no-affine", "--progress", "none",
                                  "--fixed-seg", files["fixed_seg.nii.gz"], "--moving-seg", path]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "label map" in err[0] and "size of its image" in err[0]
    assert not outdir.exists() or not any(outdir.iterdir())


@pytest.fixture(scope="module")
def scaled_pair(tmp_path_factory):
    """A pair related by a known affine with 8 % scaling (not rigid), on different grids."""
    folder = tmp_path_factory.mktemp("scaled")
    fixed, _, _, _ = make_pair(size=(32, 36, 32), spacing=(5.0, 5.0, 5.0), seed=2)
    center = fixed.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in fixed.GetSize()])
    truth = sitk.AffineTransform(3)  # fixed -> moving
    truth.SetCenter(center)
    truth.SetMatrix(tuple((1.08 * np.eye(3)).ravel()))
    truth.SetTranslation((3.0, -2.0, 2.0))
    reference = sitk.Image([36, 32, 36], sitk.sitkFloat32)
    reference.SetSpacing((5.4, 5.2, 5.0))
    reference.SetOrigin(tuple(np.asarray(center) - np.array([36 * 2.7, 32 * 2.6, 36 * 2.5])))
    moving = sitk.Resample(fixed, reference, truth.GetInverse(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    paths = {"fixed.nii.gz": folder / "fixed.nii.gz", "moving.nii.gz": folder / "moving.nii.gz"}
    sitk.WriteImage(fixed, str(paths["fixed.nii.gz"]))
    sitk.WriteImage(moving, str(paths["moving.nii.gz"]))
    return paths


def linear_part(path: Path) -> np.ndarray:
    transform = sitk.ReadTransform(str(path))
    origin = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)))
    return np.stack([np.asarray(transform.TransformPoint(tuple(e))) - origin for e in np.eye(3)], axis=1)


def test_affine_modes_are_forwarded(capsys, files, scaled_pair, tmp_path):
    paths = {**scaled_pair, "identity.pt": files["identity.pt"]}
    determinants = {}
    for mode in ("affine", "rigid"):
        report, _, _ = register_cli(capsys, paths, tmp_path / mode, "--affine", mode, "--progress", "none",
                                    model="identity.pt")
        assert report["affine"] == mode
        matrix = linear_part(tmp_path / mode / "affine.tfm")
        determinants[mode] = np.linalg.det(matrix)
        if mode == "rigid":
            np.testing.assert_allclose(matrix @ matrix.T, np.eye(3), atol=1e-6)
    assert determinants["affine"] == pytest.approx(1.08**3, abs=0.04)
    assert determinants["rigid"] == pytest.approx(1.0, abs=1e-6)
    for options in (("--affine", "none"), ("--no-affine",)):
        outdir = tmp_path / options[-1].strip("-")
        report, _, _ = register_cli(capsys, paths, outdir, *options, "--polish", "0", "--progress", "none",
                                    model="identity.pt")
        assert report["affine"] is None and not (outdir / "affine.tfm").exists()
        assert np.abs(field(outdir)).max() < 1e-3  # identity network, no affine: no motion


def test_compression_changes_the_files_not_their_values(capsys, files, tmp_path):
    """``--compression``: stored (default), fast and small gzip; every reader gets the same voxels,
    the compressed files are smaller, and every output has the usual mode of a new file."""
    sizes, fields = {}, {}
    for compression in ("none", "fast", "small"):
        outdir = tmp_path / compression
        options = ("--compression", compression) if compression != "none" else ()
        report, _, _ = register_cli(capsys, files, outdir, *options, model="identity.pt")
        sizes[compression] = {name: info["bytes"] for name, info in report["files"].items()}
        fields[compression] = field(outdir)
        umask = os.umask(0)
        os.umask(umask)
        for path in outdir.iterdir():
            assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name
    for compression in ("fast", "small"):
        np.testing.assert_array_equal(fields[compression], fields["none"])
        for name in ("forward.nii.gz", "backward.nii.gz", "moving_warped.nii.gz"):
            assert sizes[compression][name] < sizes["none"][name], (compression, name)
    raw = (tmp_path / "none" / "forward.nii.gz").read_bytes()
    import gzip
    assert len(raw) > len(gzip.decompress(raw))  # stored: the data plus gzip's framing
    with pytest.raises(SystemExit):  # argparse refuses another name
        main(["register", str(files["fixed.nii.gz"]), str(files["moving.nii.gz"]), "-o", str(tmp_path / "x"),
              "--compression", "zstd"])
    capsys.readouterr()


def test_progress_none_prints_only_the_summary(capsys, files, tmp_path):
    _, out, err = register_cli(capsys, files, tmp_path / "n", "--no-affine", "--progress", "none")
    assert err == "" and "wrote " in out and not any(line.startswith("{") for line in out.splitlines())


def run_on_a_terminal(args: list[str], timeout: float = 300) -> tuple[int, str]:
    """Run ``args`` with stdin, stdout and stderr on a pseudo-terminal, as in a user's shell."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a sized window, as a terminal has
    process = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=ENV, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    os.close(master)
    return process.wait(timeout=30), b"".join(chunks).decode(errors="replace")


def test_default_progress_on_a_terminal_is_a_tqdm_bar(files, tmp_path):
    """``python -m InverseRegLib register`` with no --progress option, on a terminal."""
    outdir = tmp_path / "bar"
    code, text = run_on_a_terminal([sys.executable, "-m", "InverseRegLib", "register", str(files["fixed.nii.gz"]),
                                    str(files["moving.nii.gz"]), "-o", str(outdir), "--model", str(files["smooth.pt"]),
                                    "--no-affine", "--device", "cpu"])
    assert code == 0, text
    assert "\r" in text and "register:" in text and "100%|" in text  # a bar redrawn in place, finished
    assert "wrote " in text and (outdir / "report.json").is_file()
    assert "{\"event\"" not in text


def earlier_result(files, outdir) -> dict:
    """A complete result in ``outdir`` (the network's fields, no affine); its files' bytes by name."""
    assert main([str(a) for a in ["register", files["fixed.nii.gz"], files["moving.nii.gz"], "-o", outdir, "--model",
                                  files["smooth.pt"], "--device", "cpu", "--no-affine", "--progress", "none"]]) == 0
    return {p.name: p.read_bytes() for p in outdir.iterdir()}


@pytest.mark.parametrize("signal_number,status,line", [(signal.SIGINT, 130, "inversereg: interrupted"),
                                                       (signal.SIGTERM, 143, "inversereg: terminated")])
def test_a_signal_stops_register_cleanly(files, tmp_path, signal_number, status, line):
    """SIGINT (Ctrl-C) or SIGTERM (kill, a batch system's limit) during the work: its exit status,
    one line on stderr, the output folder as it was (here: an earlier complete result), no
    temporary files."""
    outdir = tmp_path / "out"
    before = earlier_result(files, outdir)
    args = [sys.executable, "-m", "InverseRegLib", "register", str(files["fixed.nii.gz"]), str(files["moving.nii.gz"]),
            "-o", str(outdir), "--model", str(files["smooth.pt"]), "--no-affine", "--device", "cpu",
            "--refine", "5000", "--progress", "json"]
    # as in a terminal: SIGINT at its default action (a test runner started in the background
    # would otherwise pass on "ignore SIGINT", and Python then never raises KeyboardInterrupt)
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for output in process.stdout:  # wait until it is refining: well inside the work
            if json.loads(output).get("message", "").startswith("refine "):
                break
        process.send_signal(signal_number)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == status, err
    assert err.strip().splitlines() == [line]
    assert {p.name: p.read_bytes() for p in outdir.iterdir()} == before


def test_sigterm_while_writing_rolls_the_folder_back(files, tmp_path):
    """The signal arriving in the middle of writing (here: from one of the files' writers): the
    staging folder is removed and the previous result is back, byte for byte."""
    from InverseRegLib.cli import Terminated, handle_sigterm
    from InverseRegLib.outputs import write_result
    from InverseRegLib.pipeline import register
    outdir = tmp_path / "out"
    before = earlier_result(files, outdir)
    result = register(sitk.ReadImage(str(files["fixed.nii.gz"])), sitk.ReadImage(str(files["moving.nii.gz"])),
                      load_model(str(files["identity.pt"])), "cpu", None)
    previous = signal.getsignal(signal.SIGTERM)
    handle_sigterm()
    try:
        with pytest.raises(Terminated):
            write_result(result, outdir, [], extra={"overview.png": lambda path: os.kill(os.getpid(), signal.SIGTERM)})
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert {p.name: p.read_bytes() for p in outdir.iterdir()} == before  # no staging folder either


# --- train ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    return write_subjects(tmp_path_factory.mktemp("options_train") / "data")


def test_every_train_option_reaches_the_run(train_data, tmp_path, capsys):
    run = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        code = main(["train", str(train_data), "-o", str(run), "--preset", "paper", "--steps", "3", "--lr", "5e-4",
                     "--seed", "7", "--spacing", "10", "--val", "02", "03", "--val-every", "2",
                     "--checkpoint-every", "1", "--augment", "0.3", "--synth", "0.2", "--cascade", "0.5",
                     "--lr-schedule", "cosine", "--weight-ncc", "0.9", "--weight-cycle", "0.8", "--weight-smooth",
                     "0.3", "--ncc-window", "3", "--labels", "2,41", "--threads", "2", "--quiet", "--device", "cpu"])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "train:" not in captured.err  # --quiet: no bar
    model = load_model(run / "model.pt")
    assert model.preset.name == "paper" and model.preset.field_type == "displacement"
    assert model.preset.weights == {"ncc": 0.9, "cycle": 0.8, "smooth": 0.3} and model.preset.ncc_window == 3
    assert tuple(model.grid.spacing) == (10.0, 10.0, 10.0)
    training = model.training
    assert (training["lr"], training["seed"], training["augment"], training["synth"], training["cascade"],
            training["lr_schedule"], training["device"]) == (5e-4, 7, 0.3, 0.2, 0.5, "cosine", "cpu")
    assert training["val_subjects"] == ["02", "03"] and training["train_subjects"] == ["00", "01"]
    assert training["steps"] == 3
    with (run / "log.csv").open() as handle:
        assert [row["step"] for row in csv.DictReader(handle)] == ["1", "2", "3"]
    with (run / "val.csv").open() as handle:
        assert [row["step"] for row in csv.DictReader(handle)] == ["2", "3"]  # every 2nd step, and the last
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 3
    # cosine schedule by hand: lr (1 + cos(pi * 2 / 3)) / 2 at the last step (index 2)
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-4 * (1 + math.cos(math.pi * 2 / 3)) / 2)


def test_train_labels_choose_the_validation_labels(train_data, tmp_path, capsys):
    scores = {}
    for labels in ("2", "41"):
        run = tmp_path / labels
        assert main(["train", str(train_data), "-o", str(run), "--steps", "1", "--spacing", "10", "--val", "02", "03",
                     "--labels", labels, "--quiet", "--device", "cpu"]) == 0
        with (run / "val.csv").open() as handle:
            scores[labels] = float(next(csv.DictReader(handle))["dice"])
    assert scores["2"] != scores["41"]


def test_train_shows_a_progress_bar_unless_quiet(train_data, tmp_path, capsys):
    assert main(["train", str(train_data), "-o", str(tmp_path / "run"), "--steps", "2", "--spacing", "10",
                 "--val", "02", "03", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "train:" in err and "2/2" in err


# --- evaluate ---------------------------------------------------------------------------------

def test_every_evaluate_option_reaches_the_summary(train_data, files, tmp_path, capsys):
    outdir = tmp_path / "eval"
    code = main(["evaluate", str(train_data), "-o", str(outdir), "--subjects", "00", "01", "--model",
                 str(files["smooth.pt"]), "--device", "cpu", "--no-affine", "--refine", "1", "--passes", "1",
                 "--labels", "2", "--precision", "float32", "--mutual-inverse", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads((outdir / "summary.json").read_text(encoding="utf-8"))
    assert (summary["pairs"], summary["passes"], summary["refine_steps"], summary["precision"], summary["affine"],
            summary["device"], summary["mutual_steps"]) == (2, 1, 1, "float32", None, "cpu", 2)
    assert summary["model_id"] == hashlib.sha256(files["smooth.pt"].read_bytes()).hexdigest()[:12]
    with (outdir / "pairs.csv").open() as handle:
        assert [(r["fixed"], r["moving"]) for r in csv.DictReader(handle)] == [("00", "01"), ("01", "00")]
    with (outdir / "labels.csv").open() as handle:
        assert {r["label"] for r in csv.DictReader(handle)} == {"2"}
    assert "evaluate" in captured.err  # its progress bar
    code = main(["evaluate", str(train_data), "-o", str(tmp_path / "rigid"), "--subjects", "00", "01", "--model",
                 str(files["identity.pt"]), "--device", "cpu", "--affine", "rigid", "--passes", "1"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "rigid" / "summary.json").read_text(encoding="utf-8"))["affine"] == "rigid"
