"""The ``inversereg`` command line: bad input gives one clear error line, exit status 2, and
nothing written over the inputs; ``--progress json``; ``evaluate``; ``demo``.

Most cases call :func:`InverseRegLib.cli.main` in-process (capsys); one runs the real
``python -m InverseRegLib`` in a subprocess.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from InverseRegLib.cli import main
from InverseRegLib.imageio import OUTPUT_NAMES
from inversereg_testlib import TEST_MODEL_ENV, file_hashes, trained_model_path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, small_pair, model_file):
    """A folder of good and bad inputs. Returns a dict name -> path."""
    folder = tmp_path_factory.mktemp("inputs")
    fixed, moving, fixed_seg, moving_seg, _ = small_pair
    paths = {"folder": folder, "model": model_file}

    def put(name, image):
        paths[name] = folder / name
        sitk.WriteImage(image, str(paths[name]))

    put("fixed.nii.gz", fixed)
    put("moving.nrrd", moving)  # another format on purpose
    put("fixed_seg.nii.gz", fixed_seg)
    put("moving_seg.nii.gz", moving_seg)
    put("flat2d.nii.gz", sitk.GetImageFromArray(np.random.default_rng(0).random((20, 24)).astype(np.float32)))
    volume = sitk.GetArrayFromImage(fixed)
    put("series4d.nii.gz", sitk.JoinSeries([fixed, moving, fixed]))
    put("vector.nii.gz", sitk.GetImageFromArray(np.stack([volume] * 3, axis=-1), isVector=True))
    # NaN and Inf in NRRD/MHA: ITK's NIfTI reader turns them into 0 before anyone can see them
    with_nan = volume.copy()
    with_nan[10, 10, 10] = np.nan
    put("nan.nrrd", sitk.GetImageFromArray(with_nan))
    with_inf = volume.copy()
    with_inf[12, 11, 10] = -np.inf
    put("inf.mha", sitk.GetImageFromArray(with_inf))
    put("constant.mha", sitk.GetImageFromArray(np.full((20, 22, 24), 7, dtype=np.int16)))
    paths["text.nii.gz"] = folder / "text.nii.gz"
    paths["text.nii.gz"].write_text("not an image\n")

    models = tmp_path_factory.mktemp("models")
    (models / "text.pt").write_text("definitely not a model\n")
    torch.save({"weights": torch.zeros(4)}, models / "foreign.pt")
    data = Path(model_file).read_bytes()
    (models / "truncated.pt").write_bytes(data[: len(data) * 2 // 3])
    payload = torch.load(model_file, weights_only=True)
    payload["preset"]["decoder_channels"] = [32, 16, 8]
    torch.save(payload, models / "mismatch.pt")
    for name in ("text", "foreign", "truncated", "mismatch"):
        paths[f"model_{name}"] = models / f"{name}.pt"
    return paths


def run(capsys, argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("inversereg: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def register_args(inputs, outdir, fixed=None, moving=None, model=None, *extra):
    return ["register", fixed or inputs["fixed.nii.gz"], moving or inputs["moving.nrrd"], "-o", outdir,
            "--model", model or inputs["model"], "--no-affine", "--device", "cpu", "--progress", "none", *extra]


BAD_IMAGES = [  # (file, words the error line must contain)
    ("missing.nii.gz", ["not found", "missing.nii.gz"]),
    ("flat2d.nii.gz", ["2D", "flat2d.nii.gz", "3D volume is needed"]),
    ("series4d.nii.gz", ["4D", "series4d.nii.gz"]),
    ("vector.nii.gz", ["3 components per voxel", "scalar"]),
    ("nan.nrrd", ["NaN", "nan.nrrd"]),
    ("inf.mha", ["infinite", "inf.mha"]),
    ("constant.mha", ["constant", "constant.mha"]),
    ("text.nii.gz", ["cannot read", "text.nii.gz"]),
]


@pytest.mark.parametrize("role", ["fixed", "moving"])
@pytest.mark.parametrize("name,needles", BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
def test_bad_image_one_error_line_exit_2_inputs_untouched(capsys, inputs, tmp_path, name, needles, role):
    bad = inputs["folder"] / name
    before = file_hashes(inputs["folder"])
    outdir = tmp_path / "out"
    args = register_args(inputs, outdir, fixed=bad if role == "fixed" else None, moving=bad if role == "moving" else None)
    code, out, err = run(capsys, args)
    assert code == 2
    line = assert_one_error_line(err, *needles)
    assert role in line  # says which input is wrong
    assert file_hashes(inputs["folder"]) == before
    assert not outdir.exists() or not any(outdir.iterdir())


MODEL_ERRORS = [
    ("model_text", "not a PyTorch file or corrupt"),
    ("model_foreign", "not an InverseReg model file"),
    ("model_truncated", "not a PyTorch file or corrupt"),
    ("model_mismatch", "does not match its preset"),
]


@pytest.mark.parametrize("key,needle", MODEL_ERRORS, ids=[m[0] for m in MODEL_ERRORS])
def test_wrong_model_file(capsys, inputs, tmp_path, key, needle):
    before = file_hashes(inputs["folder"], inputs[key])
    code, _, err = run(capsys, register_args(inputs, tmp_path / "out", model=inputs[key]))
    assert code == 2
    assert_one_error_line(err, needle, Path(inputs[key]).name)
    assert file_hashes(inputs["folder"], inputs[key]) == before


def test_missing_model_file(capsys, inputs, tmp_path):
    code, _, err = run(capsys, register_args(inputs, tmp_path / "out", model=tmp_path / "none.pt"))
    assert code == 2
    assert_one_error_line(err, "model file not found", "none.pt")


def test_output_dir_that_is_a_file(capsys, inputs, tmp_path):
    target = tmp_path / "occupied"
    target.write_text("keep me\n")
    before = file_hashes(inputs["folder"], target)
    code, _, err = run(capsys, register_args(inputs, target))
    assert code == 2
    assert_one_error_line(err, "not a folder", "occupied")
    assert file_hashes(inputs["folder"], target) == before


def test_output_that_would_overwrite_an_input(capsys, inputs, tmp_path):
    """An input named forward.nii.gz inside the output folder is refused before anything runs."""
    outdir = tmp_path / "out"
    outdir.mkdir()
    victim = outdir / "forward.nii.gz"
    victim.write_bytes(inputs["fixed.nii.gz"].read_bytes())
    before = file_hashes(outdir, inputs["folder"])
    code, _, err = run(capsys, register_args(inputs, outdir, moving=victim))
    assert code == 2
    assert_one_error_line(err, "would overwrite an input", "forward.nii.gz")
    assert file_hashes(outdir, inputs["folder"]) == before
    # and the same for a label map given as an input
    seg_victim = outdir / "moving_warped.nii.gz"
    seg_victim.write_bytes(inputs["fixed_seg.nii.gz"].read_bytes())
    before = file_hashes(outdir)
    code, _, err = run(capsys, register_args(inputs, outdir, None, None, None, "--fixed-seg", seg_victim,
                                             "--moving-seg", inputs["moving_seg.nii.gz"]))
    assert code == 2
    assert_one_error_line(err, "would overwrite an input")
    assert file_hashes(outdir) == before


def test_segmentation_options_go_together(capsys, inputs, tmp_path):
    code, _, err = run(capsys, register_args(inputs, tmp_path / "out", None, None, None,
                                             "--fixed-seg", inputs["fixed_seg.nii.gz"]))
    assert code == 2
    assert_one_error_line(err, "--fixed-seg and --moving-seg go together")


def test_progress_json_error_event(capsys, inputs, tmp_path):
    args = register_args(inputs, tmp_path / "out", fixed=inputs["folder"] / "constant.mha")
    args[args.index("--progress") + 1] = "json"
    code, out, err = run(capsys, args)
    assert code == 2
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1]["event"] == "error" and "constant" in events[-1]["message"]
    assert_one_error_line(err, "constant")


def test_register_progress_json_and_outputs(capsys, inputs, tmp_path):
    """A good run: every stdout line is a JSON event, fractions never go back, the last is
    ``done`` with the report also written to report.json; inputs untouched; outputs complete
    and free of temporary files."""
    before = file_hashes(inputs["folder"])
    outdir = tmp_path / "out"
    args = register_args(inputs, outdir, None, None, None, "--fixed-seg", inputs["fixed_seg.nii.gz"],
                         "--moving-seg", inputs["moving_seg.nii.gz"], "--passes", "2")
    args[args.index("--progress") + 1] = "json"
    code, out, err = run(capsys, args)
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines() if line.strip()]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and events[-1]["event"] == "done" and len(events) == len(progress) + 1
    fractions = [e["fraction"] for e in progress]
    assert fractions == sorted(fractions) and 0.0 <= fractions[0] and fractions[-1] == 1.0
    done = events[-1]
    assert Path(done["outdir"]) == outdir.resolve()
    assert json.loads((outdir / "report.json").read_text(encoding="utf-8")) == done["report"]
    assert done["report"]["dice_mean"] is not None and done["report"]["affine"] is None
    assert done["report"]["passes"] == 2
    written = sorted(p.name for p in outdir.iterdir())
    assert written == sorted(["forward.nii.gz", "backward.nii.gz", "moving_warped.nii.gz", "fixed_warped.nii.gz",
                              "moving_seg_warped.nii.gz", "fixed_seg_warped.nii.gz", "report.json"])
    assert set(written) <= set(OUTPUT_NAMES)
    forward = sitk.ReadImage(str(outdir / "forward.nii.gz"))
    fixed = sitk.ReadImage(str(inputs["fixed.nii.gz"]))
    assert forward.GetSize() == fixed.GetSize() and forward.GetNumberOfComponentsPerPixel() == 3
    assert file_hashes(inputs["folder"]) == before


def test_real_subprocess_bad_input(inputs, tmp_path):
    """``python -m InverseRegLib`` as a user runs it: one stderr line, exit status 2."""
    args = [sys.executable, "-m", "InverseRegLib", *[str(a) for a in register_args(
        inputs, tmp_path / "out", fixed=inputs["folder"] / "series4d.nii.gz")]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert_one_error_line(done.stderr, "4D", "series4d.nii.gz")
    assert done.stdout == ""


def test_evaluate_folder(capsys, inputs, tmp_path):
    """``inversereg evaluate`` over a labelled folder of 2 subjects: 2 ordered pairs."""
    data = tmp_path / "data"
    data.mkdir()
    for subject, image, seg in (("a", "fixed.nii.gz", "fixed_seg.nii.gz"), ("b", "moving.nrrd", "moving_seg.nii.gz")):
        sitk.WriteImage(sitk.ReadImage(str(inputs[image])), str(data / f"img_{subject}.nii.gz"))
        (data / f"seg_{subject}.nii.gz").write_bytes(inputs[seg].read_bytes())
    outdir = tmp_path / "eval"
    code, out, err = run(capsys, ["evaluate", data, "-o", outdir, "--model", inputs["model"], "--no-affine",
                                  "--device", "cpu", "--labels", "2,41"])
    assert code == 0, err
    summary = json.loads((outdir / "summary.json").read_text(encoding="utf-8"))
    assert summary["pairs"] == 2 and "dice_mean" in summary
    assert summary["passes"] == 2 and summary["refine_steps"] == 0 and summary["affine"] is None
    with (outdir / "pairs.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["fixed"], r["moving"]) for r in rows] == [("a", "b"), ("b", "a")]
    with (outdir / "labels.csv").open() as handle:
        labels = list(csv.DictReader(handle))
    assert sorted({r["label"] for r in labels}) == ["2", "41"] and len(labels) == 4


@pytest.mark.slow
def test_demo_writes_outputs_and_overview(capsys, tmp_path):
    """``inversereg demo`` with the bundled model (or $INVERSEREG_TEST_MODEL): registers the
    built-in pair and writes the outputs plus a readable overview.png."""
    path = trained_model_path()
    outdir = tmp_path / "demo"
    argv = ["demo", "-o", outdir, "--quiet", "--device", "cpu"]
    if os.environ.get(TEST_MODEL_ENV):
        argv += ["--model", path]
    code, out, err = run(capsys, argv)
    assert code == 0, err
    for name in ("forward.nii.gz", "backward.nii.gz", "moving_warped.nii.gz", "fixed_warped.nii.gz",
                 "report.json", "overview.png"):
        assert (outdir / name).is_file(), name
    import matplotlib.image
    picture = matplotlib.image.imread(str(outdir / "overview.png"))
    assert picture.ndim == 3 and picture.shape[0] > 400 and picture.shape[1] > 600
    assert picture[..., :3].std() > 0.05  # not a blank page
    report = json.loads((outdir / "report.json").read_text(encoding="utf-8"))
    assert report["dice_mean"] > report["dice_mean_before"]
    assert "demo finished in" in out and "Dice: before" in out
