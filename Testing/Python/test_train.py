"""Training: a short run lowers the loss, writes its log, checkpoint and a loadable model;
``--resume`` continues bit for bit; a different run is refused; DDP with 2 gloo processes.

The data are tiny synthetic phantoms (40^3 voxels of 4 mm, affinely displaced from each other by
up to ~2 model voxels) and ``--spacing 10`` makes the model grid 16 x 16 x 16.
"""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from InverseRegLib import train as train_module
from InverseRegLib.cli import main
from InverseRegLib.data import discover_subjects, load_on_grid, split_subjects, training_grid
from InverseRegLib.errors import InverseRegError
from InverseRegLib.intensity import DEFAULT_NORMALIZATION
from InverseRegLib.losses import registration_loss
from InverseRegLib.model import InverseNet
from InverseRegLib.modelfile import load_model
from InverseRegLib.presets import get_preset
from inversereg_testlib import file_hashes, free_port
from training_data import interrupt_training_at, write_subjects

#: (translation mm, isotropic scale) of each subject relative to the phantom
#: length of the short run: the loss on all pairs is noisy over the first ~60 steps at this lr
#: (measured on the 6 pairs: -1.43 at the start, -1.37 to -1.54 between steps 40 and 70, -1.61 at 100)
STEPS = 100


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    """``data3``: 3 subjects img_XX/seg_XX; ``data4``: the same plus a fourth (for validation)."""
    root = tmp_path_factory.mktemp("data")
    dirs = {"data3": root / "data3", "data4": write_subjects(root / "data4")}
    dirs["data3"].mkdir()
    for k in range(3):
        for kind in ("img", "seg"):
            shutil.copy(dirs["data4"] / f"{kind}_{k:02d}.nii.gz", dirs["data3"])
    return dirs


def train_args(data, run, steps, *extra):
    return ["train", str(data), "-o", str(run), "--steps", str(steps), "--spacing", "10", "--quiet",
            "--device", "cpu", "--checkpoint-every", "2", *[str(e) for e in extra]]


def read_log(run: Path) -> list[dict]:
    with (run / "log.csv").open() as handle:
        return list(csv.DictReader(handle))


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def assert_same_weights(a: Path, b: Path) -> None:
    """Identical network weights in two model files or checkpoints (``state_dict`` / ``model``)."""
    def weights(path):
        payload = torch.load(path, weights_only=True)
        return payload["state_dict"] if "state_dict" in payload else payload["model"]

    state_a, state_b = weights(a), weights(b)
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


@pytest.fixture(scope="module")
def short_run(data_dirs, tmp_path_factory):
    """100 steps of the default preset, lr 1e-3, no augmentation: deterministic pairs."""
    run = tmp_path_factory.mktemp("short") / "run"
    assert main(train_args(data_dirs["data3"], run, STEPS, "--lr", "1e-3", "--augment", "0", "--synth", "0")) == 0
    return run


def test_short_run_writes_log_checkpoint_and_loadable_model(short_run):
    rows = read_log(short_run)
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    assert set(rows[0]) == {"step", "loss", "ncc_st", "ncc_ts", "cycle", "smooth", "seconds"}
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    checkpoint = torch.load(short_run / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == STEPS and {"model", "optimizer", "config"} <= set(checkpoint)
    model = load_model(short_run / "model.pt")
    assert model.grid.size == (16, 16, 16) and model.grid.spacing == (10.0, 10.0, 10.0)
    assert model.preset == get_preset("default") and model.normalization == DEFAULT_NORMALIZATION
    assert model.training["steps"] == STEPS and model.training["train_subjects"] == ["00", "01", "02"]
    assert_same_weights(short_run / "model.pt", short_run / "checkpoint.pt")
    assert not list(short_run.glob(".*"))  # no temporary files left behind


def test_short_run_lowers_the_loss(short_run, data_dirs):
    """The training objective on every ordered training pair, with the initial weights (same
    seed) and with the exported model: lower on average by a clear margin and on most pairs
    (measured: -1.43 -> -1.61 on average after 100 steps)."""
    subjects, _ = split_subjects(discover_subjects(data_dirs["data3"]), None)
    geometry = training_grid(subjects, 10.0)
    images = [torch.from_numpy(load_on_grid(s, geometry, DEFAULT_NORMALIZATION)[0])[None, None] for s in subjects]
    preset = get_preset("default")
    torch.manual_seed(0)  # the run's seed: the untrained network it started from
    initial = InverseNet(preset).eval()
    trained = load_model(short_run / "model.pt").network

    def losses(network):
        out = []
        with torch.no_grad():
            for i in range(len(images)):
                for j in range(len(images)):
                    if i != j:
                        u_st, u_ts, aux = network(images[i], images[j])
                        out.append(registration_loss(images[i], images[j], u_st, u_ts, aux, preset)[0].item())
        return np.array(out)

    before, after = losses(initial), losses(trained)
    assert after.mean() < before.mean() - 0.05, (before, after)
    assert np.count_nonzero(after < before) >= 4, (before, after)  # of 6 pairs
    # and the log says the same, comparing the first and the last 20 steps
    logged = np.array([float(r["loss"]) for r in read_log(short_run)])
    assert logged[-20:].mean() < logged[:20].mean() - 0.03


@pytest.fixture(scope="module")
def reference_run(data_dirs, tmp_path_factory):
    """4 uninterrupted steps with the default augmentation and label synthesis (so the resumed
    runs must also reproduce every random draw)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(train_args(data_dirs["data3"], run, 4, "--synth", "0.5")) == 0
    return run


def test_resume_continues_bit_for_bit(reference_run, data_dirs, tmp_path):
    run = tmp_path / "run"
    assert main(train_args(data_dirs["data3"], run, 2, "--synth", "0.5")) == 0
    assert len(read_log(run)) == 2
    assert main(train_args(data_dirs["data3"], run, 4, "--synth", "0.5", "--resume")) == 0
    assert_same_weights(run / "model.pt", reference_run / "model.pt")
    assert_same_weights(run / "checkpoint.pt", reference_run / "checkpoint.pt")
    optimizer_a = torch.load(run / "checkpoint.pt", weights_only=True)["optimizer"]["state"]
    optimizer_b = torch.load(reference_run / "checkpoint.pt", weights_only=True)["optimizer"]["state"]
    for index in optimizer_b:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer_a[index][key], optimizer_b[index][key])
    assert without_time(read_log(run)) == without_time(read_log(reference_run))


def test_resume_after_an_interruption_between_checkpoints(reference_run, data_dirs, tmp_path, monkeypatch):
    """The run is killed during step 4, after step 3 was logged but the last checkpoint is from
    step 2: the resumed run redoes step 3, and its log must not hold step 3 twice."""
    run = tmp_path / "run"
    real_loss = interrupt_training_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(train_module.TrainConfig(str(data_dirs["data3"]), str(run), steps=4, spacing=10.0,
                                                    checkpoint_every=2, synth=0.5, device="cpu"), progress=False)
    monkeypatch.setattr(train_module, "registration_loss", real_loss)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2
    assert len(read_log(run)) == 3
    assert main(train_args(data_dirs["data3"], run, 4, "--synth", "0.5", "--resume")) == 0
    assert_same_weights(run / "model.pt", reference_run / "model.pt")
    assert without_time(read_log(run)) == without_time(read_log(reference_run))


def test_restart_after_a_crash_before_the_first_checkpoint(reference_run, data_dirs, tmp_path, monkeypatch):
    """A run that stopped before writing any checkpoint may be started again (there is nothing
    to resume); its log then holds the new run's steps only, not the dead run's rows too."""
    run = tmp_path / "run"
    real_loss = interrupt_training_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(train_module.TrainConfig(str(data_dirs["data3"]), str(run), steps=4, spacing=10.0,
                                                    checkpoint_every=25, synth=0.5, device="cpu"), progress=False)
    monkeypatch.setattr(train_module, "registration_loss", real_loss)
    assert not (run / "checkpoint.pt").exists() and len(read_log(run)) == 1
    assert main(train_args(data_dirs["data3"], run, 2, "--synth", "0.5")) == 0
    assert without_time(read_log(run)) == without_time(read_log(reference_run))[:2]


def test_resume_with_another_setting_is_refused(reference_run, data_dirs, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint.pt", "log.csv", "config.json", "model.pt"):
        (run / name).write_bytes((reference_run / name).read_bytes())
    before = file_hashes(run)
    code = main(train_args(data_dirs["data3"], run, 6, "--synth", "0.5", "--resume", "--lr", "3e-4"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("inversereg: error: --resume: 'lr' differs") and "0.0001" in err[0]
    code = main(train_args(data_dirs["data3"], run, 6, "--resume"))  # synth 0.1 instead of 0.5
    assert code == 2 and "'synth' differs" in capsys.readouterr().err
    assert file_hashes(run) == before


def test_training_into_an_existing_run_without_resume_is_refused(reference_run, data_dirs, capsys):
    before = file_hashes(reference_run)
    code = main(train_args(data_dirs["data3"], reference_run, 4, "--synth", "0.5"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "already holds a training run" in err[0] and "--resume" in err[0]
    assert file_hashes(reference_run) == before


def test_resume_without_a_checkpoint_and_bad_folders_are_refused(data_dirs, tmp_path, capsys):
    assert main(train_args(data_dirs["data3"], tmp_path / "fresh", 2, "--resume")) == 2
    assert "no checkpoint" in capsys.readouterr().err
    occupied = tmp_path / "file"
    occupied.write_text("x")
    assert main(train_args(data_dirs["data3"], occupied, 2)) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(train_args(tmp_path / "nowhere", tmp_path / "run", 2)) == 2
    assert "data folder not found" in capsys.readouterr().err


def test_validation_dice_snapshots_and_best_model(data_dirs, tmp_path):
    run = tmp_path / "run"
    code = main(train_args(data_dirs["data4"], run, 2, "--val", "02", "03", "--val-every", "1", "--labels", "2,41"))
    assert code == 0
    with (run / "val.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["step"] for r in rows] == ["1", "2"] and all(0.0 < float(r["dice"]) <= 1.0 for r in rows)
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == ["model_step000001.pt", "model_step000002.pt"]
    best = load_model(run / "best_model.pt")
    assert best.training["val_subjects"] == ["02", "03"] and best.training["train_subjects"] == ["00", "01"]
    assert best.training["val_dice_model_grid"] == pytest.approx(max(float(r["dice"]) for r in rows), abs=1e-5)


@pytest.mark.slow
def test_ddp_two_gloo_processes(data_dirs, tmp_path):
    """``torchrun --nproc_per_node 2 -m InverseRegLib.cli train ...`` on CPU (gloo): both ranks
    train, rank 0 writes the log and the model, which records world_size 2."""
    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "InverseRegLib.cli", *train_args(data_dirs["data3"], run, 3, "--threads", "1")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("model written to") == 2  # both ranks finished
    model = load_model(run / "model.pt")
    assert model.training["world_size"] == 2 and model.training["steps"] == 3
    assert [int(r["step"]) for r in read_log(run)] == [1, 2, 3]


def test_init_starts_from_a_model_and_refuses_a_mismatched_one(short_run, data_dirs, tmp_path, capsys):
    """``--init`` loads an exported model's weights (step 0 of the new run equals the model), records
    where they came from, and refuses a model of another grid or preset with one line."""
    frozen = tmp_path / "frozen"  # lr 0: the weights stay what --init loaded
    assert main(train_args(data_dirs["data3"], frozen, 1, "--lr", "0", "--init", short_run / "model.pt")) == 0
    assert_same_weights(frozen / "model.pt", short_run / "model.pt")
    run = tmp_path / "finetune"
    assert main(train_args(data_dirs["data3"], run, 2, "--init", short_run / "model.pt")) == 0
    tuned = load_model(run / "model.pt")
    assert tuned.training["init_steps"] == STEPS and tuned.training["init_model"] == "model.pt"
    assert tuned.training["init_model_id"] == load_model(short_run / "model.pt").model_id
    original = load_model(short_run / "model.pt").network.state_dict()
    assert any(not torch.equal(value, original[name]) for name, value in tuned.network.state_dict().items())
    before = file_hashes(short_run)
    code = main(["train", str(data_dirs["data3"]), "-o", str(tmp_path / "other_grid"), "--steps", "1",
                 "--spacing", "8", "--quiet", "--device", "cpu", "--init", str(short_run / "model.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--init" in err[0] and "model grid" in err[0]
    code = main(train_args(data_dirs["data3"], tmp_path / "other_preset", 1, "--preset", "paper",
                           "--init", short_run / "model.pt"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "another preset" in err[0]
    assert file_hashes(short_run) == before


def test_init_with_other_loss_weights_is_a_recorded_fine_tune(short_run, data_dirs, tmp_path):
    """Same network, another objective (less smoothing, another NCC window): accepted, and the
    model file keeps both the new loss settings and the ones the weights came from."""
    source = load_model(short_run / "model.pt")
    run = tmp_path / "less_smooth"
    assert main(train_args(data_dirs["data3"], run, 1, "--lr", "0", "--weight-smooth", "0.25",
                           "--ncc-window", "7", "--init", short_run / "model.pt")) == 0
    assert_same_weights(run / "model.pt", short_run / "model.pt")
    tuned = load_model(run / "model.pt")
    assert tuned.preset.weights["smooth"] == 0.25 and tuned.preset.ncc_window == 7
    assert tuned.training["init_loss"] == {"weights": source.preset.weights,
                                           "ncc_window": source.preset.ncc_window}
    same = tmp_path / "same_loss"
    assert main(train_args(data_dirs["data3"], same, 1, "--lr", "0", "--init", short_run / "model.pt")) == 0
    assert "init_loss" not in load_model(same / "model.pt").training


def test_init_regrid_fine_tunes_across_grids_with_rescaled_heads(short_run, data_dirs, tmp_path):
    """``--init --init-regrid`` starts a run on another model grid (here 5 mm from a 10 mm model):
    every weight is the source model's except the two heads, scaled by old / new spacing along the
    output channel (channel c moves along grid axis c), so the initial fields keep their size in mm;
    the run records where it came from. lr 0 keeps the loaded weights."""
    run = tmp_path / "regrid"
    assert main(["train", str(data_dirs["data3"]), "-o", str(run), "--steps", "1", "--spacing", "5", "--quiet",
                 "--device", "cpu", "--lr", "0", "--init", str(short_run / "model.pt"), "--init-regrid"]) == 0
    source, tuned = load_model(short_run / "model.pt"), load_model(run / "model.pt")
    ratio = np.asarray(source.grid.spacing) / np.asarray(tuned.grid.spacing)
    assert np.allclose(ratio, 2.0) and tuple(tuned.grid.size) != tuple(source.grid.size)
    scaled = 0
    tuned_state = tuned.network.state_dict()
    for name, value in source.network.state_dict().items():
        if ".head." in f".{name}":
            factor = torch.as_tensor(ratio, dtype=value.dtype).view(-1, *([1] * (value.dim() - 1)))
            assert torch.allclose(tuned_state[name], value * factor)
            scaled += 1
        else:
            assert torch.equal(tuned_state[name], value), name
    assert scaled == 4  # weight and bias of both decoders' heads
    assert tuned.training["init_regrid"]["from_spacing"] == list(source.grid.spacing)


def test_resume_accepts_a_checkpoint_written_before_a_setting_existed(short_run, data_dirs, tmp_path):
    """A checkpoint whose saved config lacks a setting added later (here ``init_regrid``) resumes as
    if it had the default, instead of refusing as a different run."""
    run = tmp_path / "old_run"
    shutil.copytree(short_run, run)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    del state["config"]["init_regrid"]
    torch.save(state, run / "checkpoint.pt")
    assert main(train_args(data_dirs["data3"], run, STEPS + 1, "--lr", "1e-3", "--augment", "0", "--synth", "0",
                           "--resume")) == 0
    assert int(read_log(run)[-1]["step"]) == STEPS + 1


def test_cascade_trains_on_the_source_after_one_pass(short_run, data_dirs, tmp_path, capsys):
    """``--cascade P``: with probability P a step's source is first warped by one no-grad pass of
    the current network (what the default second registration pass sees). With a model whose
    fields move voxels and lr 0, every step's loss then differs from the plain run's;
    ``--cascade 0`` is the plain run bit for bit; the setting is recorded, checked on --resume,
    and an impossible probability is refused with one line."""
    payload = torch.load(short_run / "model.pt", weights_only=True)
    for name in ("decoder_st.head.weight", "decoder_ts.head.weight"):
        payload["state_dict"][name] = payload["state_dict"][name] * 3.0  # larger fields: a pass moves voxels
    moving_model = tmp_path / "moving.pt"
    torch.save(payload, moving_model)
    common = ("--lr", "0", "--augment", "0", "--synth", "0", "--init", moving_model)
    runs = {}
    for name, extra in (("plain", ()), ("zero", ("--cascade", "0")), ("cascade", ("--cascade", "1"))):
        runs[name] = tmp_path / name
        assert main(train_args(data_dirs["data3"], runs[name], 3, *common, *extra)) == 0
    plain, zero, cascade = (read_log(runs[n]) for n in ("plain", "zero", "cascade"))
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in plain]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in zero]
    for before, after in zip(plain, cascade):
        assert abs(float(before["loss"]) - float(after["loss"])) > 1e-2, (before, after)
    assert load_model(runs["cascade"] / "model.pt").training["cascade"] == 1.0
    assert "cascade" not in load_model(runs["plain"] / "model.pt").training
    code = main(train_args(data_dirs["data3"], runs["cascade"], 4, *common, "--resume"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cascade" in err[0]
    code = main(train_args(data_dirs["data3"], tmp_path / "bad", 1, "--cascade", "1.5"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--cascade" in err[0] and "between 0 and 1" in err[0]


def test_cosine_schedule_values():
    config = train_module.TrainConfig(data_dir="", run_dir="", steps=100, lr=1e-3, lr_schedule="cosine")
    rates = [train_module.learning_rate(config, step) for step in range(101)]
    assert rates[0] == pytest.approx(1e-3) and rates[50] == pytest.approx(5e-4) and rates[100] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    constant = train_module.TrainConfig(data_dir="", run_dir="", steps=100, lr=1e-3)
    assert {train_module.learning_rate(constant, step) for step in range(100)} == {1e-3}


def test_cosine_schedule_drives_the_optimiser(data_dirs, tmp_path, capsys):
    """``--lr-schedule cosine``: each step's Adam lr is the schedule's (the checkpoint's optimiser
    holds the last step's), so the weights differ from a constant-lr run after the first step;
    the setting is recorded, checked on --resume, and an unknown schedule is refused."""
    common = ("--lr", "1e-2", "--augment", "0", "--synth", "0")
    runs = {name: tmp_path / name for name in ("constant", "cosine")}
    assert main(train_args(data_dirs["data3"], runs["constant"], 4, *common)) == 0
    assert main(train_args(data_dirs["data3"], runs["cosine"], 4, *common, "--lr-schedule", "cosine")) == 0
    checkpoint = torch.load(runs["cosine"] / "checkpoint.pt", weights_only=True)
    expected = 1e-2 * 0.5 * (1 + np.cos(np.pi * 3 / 4))  # the lr of the last step, step index 3
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == pytest.approx(expected)
    constant_log, cosine_log = read_log(runs["constant"]), read_log(runs["cosine"])
    assert constant_log[0]["loss"] == cosine_log[0]["loss"]  # step 1 runs at the full lr either way
    assert constant_log[-1]["loss"] != cosine_log[-1]["loss"]
    assert load_model(runs["cosine"] / "model.pt").training["lr_schedule"] == "cosine"
    assert "lr_schedule" not in load_model(runs["constant"] / "model.pt").training
    code = main(train_args(data_dirs["data3"], runs["cosine"], 6, *common, "--resume"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "lr_schedule" in err[0]
    with pytest.raises(SystemExit):
        main(train_args(data_dirs["data3"], tmp_path / "bad", 1, "--lr-schedule", "linear"))
    with pytest.raises(InverseRegError, match="lr-schedule"):
        train_module.train(train_module.TrainConfig(data_dir=str(data_dirs["data3"]), run_dir=str(tmp_path / "x"),
                                                    steps=1, lr_schedule="step"), progress=False)


def test_weight_dice_adds_the_label_term(short_run, data_dirs, tmp_path, capsys, monkeypatch):
    """``--weight-dice W``: each step's loss is the plain loss plus W times the logged Dice term
    (the same pairs and draws: lr 0 runs side by side), the weight is recorded, with ``--cascade``
    the source's labels are warped by the same first pass as the source, and a training subject
    without its label map is refused in one line. (That the term pulls the field the right way:
    test_losses.py.)"""
    common = ("--lr", "0", "--augment", "0", "--synth", "0", "--labels", "2,41")
    plain, labelled = tmp_path / "plain", tmp_path / "labelled"
    assert main(train_args(data_dirs["data3"], plain, 3, *common)) == 0
    assert main(train_args(data_dirs["data3"], labelled, 3, *common, "--weight-dice", "2")) == 0
    for before, after in zip(read_log(plain), read_log(labelled)):
        assert "dice" not in before and 0.05 < float(after["dice"]) <= 2.0
        assert float(after["loss"]) == pytest.approx(float(before["loss"]) + 2.0 * float(after["dice"]), abs=2e-5)
    assert load_model(labelled / "model.pt").preset.weights["dice"] == 2.0

    payload = torch.load(short_run / "model.pt", weights_only=True)
    for name in ("decoder_st.head.weight", "decoder_ts.head.weight"):
        payload["state_dict"][name] = payload["state_dict"][name] * 3.0  # a first pass that moves voxels
    moving_model = tmp_path / "moving.pt"
    torch.save(payload, moving_model)
    calls = []
    real_warp = train_module.warp

    def recording_warp(image, displacement, *args, **kwargs):
        calls.append((image.shape[1], displacement))
        return real_warp(image, displacement, *args, **kwargs)

    monkeypatch.setattr(train_module, "warp", recording_warp)
    assert main(train_args(data_dirs["data3"], tmp_path / "cascade", 2, *common, "--weight-dice", "1",
                           "--cascade", "1", "--init", moving_model)) == 0
    monkeypatch.setattr(train_module, "warp", real_warp)
    assert [channels for channels, _ in calls] == [1, 2, 1, 2]  # per step: the image, then its 2 label channels
    for (_, image_field), (_, label_field) in zip(calls[0::2], calls[1::2]):
        assert label_field is image_field and float(image_field.abs().max()) > 0.1

    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(data_dirs["data3"], unlabelled)
    (unlabelled / "seg_01.nii.gz").unlink()
    code = main(train_args(unlabelled, tmp_path / "refused", 1, "--weight-dice", "1"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--weight-dice" in err[0] and "01" in err[0], err
