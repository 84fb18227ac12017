"""Resume with validation on: a resumed run remembers its best validation score, so
``best_model.pt`` ends as the best model of the whole run, never a later, worse one.

Two kinds of evidence: real validation Dice (``best_model.pt`` must hold the weights of the
snapshot of the step with the highest score in val.csv, whatever the scores turn out to be), and
scripted scores that put the best step before the resume point, where a run that forgot its best
score would overwrite the best model with a worse one.
"""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from InverseRegLib import train as train_module
from InverseRegLib.cli import main
from InverseRegLib.modelfile import load_model
from training_data import interrupt_training_at, train_argv, write_subjects


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_subjects(tmp_path_factory.mktemp("resume_data") / "data")


def weights(path: Path) -> dict:
    payload = torch.load(path, weights_only=True)
    return payload["state_dict"] if "state_dict" in payload else payload["model"]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def val_scores(run: Path) -> dict[int, float]:
    with (run / "val.csv").open() as handle:
        return {int(row["step"]): float(row["dice"]) for row in csv.DictReader(handle)}


def scripted_scores(monkeypatch, scores: list[float]) -> None:
    """Validation returns these scores, one per call, in order (the bookkeeping under test does
    not care how a score was computed)."""
    queue = list(scores)
    monkeypatch.setattr(train_module, "validation_dice", lambda *args, **kwargs: queue.pop(0))


def test_resumed_run_keeps_the_best_model_of_real_validation(data, tmp_path):
    """4 steps with validation every step, stopped after step 2 and resumed: best_model.pt is
    bit for bit the uninterrupted run's, and it is the snapshot of the best step in val.csv."""
    reference = tmp_path / "reference"
    assert main(train_argv(data, reference, 4, "--checkpoint-every", "2")) == 0
    run = tmp_path / "run"
    assert main(train_argv(data, run, 2, "--checkpoint-every", "2")) == 0
    assert main([*train_argv(data, run, 4, "--checkpoint-every", "2"), "--resume"]) == 0
    scores = val_scores(run)
    assert scores == val_scores(reference) and sorted(scores) == [1, 2, 3, 4]
    best_step = max(scores, key=scores.get)
    assert same_weights(run / "best_model.pt", reference / "best_model.pt")
    assert same_weights(run / "best_model.pt", run / "snapshots" / f"model_step{best_step:06d}.pt")
    best = load_model(run / "best_model.pt").training
    assert best["steps"] == best_step and best["val_dice_model_grid"] == pytest.approx(scores[best_step], abs=1e-5)
    assert load_model(run / "model.pt").training["best_val_dice_model_grid"] == pytest.approx(scores[best_step], abs=1e-5)


def test_a_resumed_run_does_not_replace_the_best_model_with_a_worse_one(data, tmp_path, monkeypatch):
    """Best score at step 2, the checkpoint at step 2, later scores lower: after the resume,
    best_model.pt must still be step 2's model (a run that forgot its best score would write
    step 3's, then step 4's)."""
    run = tmp_path / "run"
    scripted_scores(monkeypatch, [0.50, 0.70])
    assert main(train_argv(data, run, 2, "--checkpoint-every", "2")) == 0
    scripted_scores(monkeypatch, [0.60, 0.65])
    assert main([*train_argv(data, run, 4, "--checkpoint-every", "2"), "--resume"]) == 0
    assert val_scores(run) == {1: 0.5, 2: 0.7, 3: 0.6, 4: 0.65}
    best = load_model(run / "best_model.pt").training
    assert best["steps"] == 2 and best["val_dice_model_grid"] == 0.70
    assert same_weights(run / "best_model.pt", run / "snapshots" / "model_step000002.pt")
    assert load_model(run / "model.pt").training["best_val_dice_model_grid"] == 0.70


def test_a_better_model_saved_after_the_last_checkpoint_is_kept(data, tmp_path, monkeypatch):
    """The run stops after step 3 wrote a better best_model.pt (0.9) but before the next
    checkpoint (which still says 0.6). The resumed run redoes step 3; where the redone score
    differs (another device, non-deterministic kernels: here 0.85), the better model on disk
    must not be overwritten by a worse one."""
    run = tmp_path / "run"
    scripted_scores(monkeypatch, [0.5, 0.6, 0.9])
    real_loss = interrupt_training_at(monkeypatch, 4)
    assert main(train_argv(data, run, 4, "--checkpoint-every", "2")) == 130
    assert torch.load(run / "checkpoint.pt", weights_only=True)["best_val"] == 0.6
    saved = weights(run / "best_model.pt")
    assert load_model(run / "best_model.pt").training["val_dice_model_grid"] == 0.9
    monkeypatch.setattr(train_module, "registration_loss", real_loss)
    scripted_scores(monkeypatch, [0.85, 0.7])
    assert main([*train_argv(data, run, 4, "--checkpoint-every", "2"), "--resume"]) == 0
    best = load_model(run / "best_model.pt").training
    assert best["val_dice_model_grid"] == 0.9 and best["steps"] == 3
    assert all(torch.equal(saved[k], v) for k, v in weights(run / "best_model.pt").items())
    assert load_model(run / "model.pt").training["best_val_dice_model_grid"] == 0.9
