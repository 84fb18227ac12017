"""modelfile.py: the exported model file holds everything needed, and anything else is refused
with one line saying what is wrong."""
from __future__ import annotations

import hashlib

import pytest
import torch

from InverseRegLib import __version__
from InverseRegLib.errors import InverseRegError
from InverseRegLib.modelfile import FORMAT, FORMAT_VERSION, load_model
from inversereg_testlib import SMALL_GRID, small_model, write_model_file


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = small_model("paper", 1e4, seed=3)
    path = write_model_file(tmp_path_factory.mktemp("export") / "model.pt", model)
    return model, path


def test_round_trip_keeps_weights_preset_grid_and_normalisation(exported):
    model, path = exported
    loaded = load_model(path)
    assert loaded.preset == model.preset
    assert loaded.grid.size == SMALL_GRID.size and loaded.grid.spacing == SMALL_GRID.spacing
    assert loaded.grid.direction == SMALL_GRID.direction
    assert loaded.normalization == model.normalization
    assert loaded.model_id == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert loaded.path == str(path) and not loaded.network.training
    original = model.network.state_dict()
    for key, value in loaded.network.state_dict().items():
        assert torch.equal(value, original[key]), key
    source, target = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        a, b = model.network(source, target)[:2], loaded.network(source, target)[:2]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_file_is_plain_data_with_the_documented_header(exported):
    _, path = exported
    payload = torch.load(path, weights_only=True)  # no pickled code
    assert payload["format"] == FORMAT and payload["format_version"] == FORMAT_VERSION
    assert payload["library_version"] == __version__
    assert {"preset", "grid", "normalization", "training", "state_dict"} <= set(payload)


def _refused(path, match):
    with pytest.raises(InverseRegError, match=match) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_and_folder(tmp_path):
    _refused(tmp_path / "nope.pt", "model file not found")
    _refused(tmp_path, "not a file")


def test_text_file_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    path.write_text("this is not a model\n")
    _refused(path, "not a PyTorch file or corrupt")


def test_truncated_copy_is_refused(exported, tmp_path):
    _, good = exported
    data = good.read_bytes()
    for fraction in (0.5, 0.95):
        path = tmp_path / f"truncated_{fraction}.pt"
        path.write_bytes(data[: int(len(data) * fraction)])
        _refused(path, "not a PyTorch file or corrupt")


def test_foreign_torch_files_are_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, path)
    _refused(path, "not an InverseReg model file")
    torch.save(torch.zeros(3), path)
    _refused(path, "not an InverseReg model file")
    # a pickled module needs code to load: refused, not executed (weights_only)
    torch.save(torch.nn.Linear(2, 2), path)
    _refused(path, "not a PyTorch file or corrupt")


def test_weights_that_do_not_match_the_preset_are_refused(exported, tmp_path):
    _, good = exported
    payload = torch.load(good, weights_only=True)
    payload["preset"]["encoder_channels"] = [16, 16, 16, 16]
    path = tmp_path / "mismatch.pt"
    torch.save(payload, path)
    _refused(path, "does not match its preset")
    payload = torch.load(good, weights_only=True)
    del payload["state_dict"]["decoder_ts.head.weight"]
    torch.save(payload, path)
    _refused(path, "does not match its preset")
    payload = torch.load(good, weights_only=True)
    del payload["grid"]
    torch.save(payload, path)
    _refused(path, "incomplete")


def test_newer_format_is_refused(exported, tmp_path):
    _, good = exported
    payload = torch.load(good, weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    path = tmp_path / "future.pt"
    torch.save(payload, path)
    _refused(path, "newer than this library")
