"""The default preset's and the trainer's settings, pinned against independent statements of
them: the model card (Resources/InverseReg-default.md), the README's presets table and training
paragraph, and the preset recorded inside the bundled model file. Changing a default in code
without the documents (or the other way round) fails here.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from InverseRegLib.cli import build_parser
from InverseRegLib.intensity import DEFAULT_NORMALIZATION
from InverseRegLib.presets import get_preset
from InverseRegLib.train import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
CARD = ROOT / "Resources" / "InverseReg-default.md"
README = ROOT / "README.md"


def card_row(name: str) -> str:
    """The value cell of the model card's table row ``| name | value |``."""
    match = re.search(rf"^\| {re.escape(name)} \| (.+) \|$", CARD.read_text(encoding="utf-8"), re.MULTILINE)
    assert match, f"model card has no '{name}' row"
    return match.group(1)


def test_default_preset_matches_the_model_card():
    preset = get_preset("default")
    weights, window = re.fullmatch(r"(\{.*\}), local NCC window (\d+) voxels", card_row("loss weights")).groups()
    assert preset.weights == json.loads(weights)
    assert preset.ncc_window == int(window)
    field, symmetric, squarings = re.fullmatch(r"`default`: (\w+) fields, symmetric=(\w+), (\d+) squarings",
                                               card_row("preset")).groups()
    assert preset.field_type == field and str(preset.symmetric) == symmetric
    assert preset.integration_steps == int(squarings)
    assert DEFAULT_NORMALIZATION == json.loads(card_row("intensity normalisation"))


def test_default_preset_matches_the_readme_presets_table():
    row = next(line for line in README.read_text(encoding="utf-8").splitlines() if line.startswith("| `default` |"))
    smooth = float(re.search(r"smoothness \(weight ([0-9.]+)", row).group(1))
    window = int(re.search(r"NCC both ways \((\d+)-voxel window\)", row).group(1))
    preset = get_preset("default")
    assert preset.weights["smooth"] == smooth and preset.ncc_window == window
    assert "φST = exp(v), φTS = exp(−v)" in row and preset.symmetric and preset.field_type == "velocity"


def test_default_preset_is_the_one_the_bundled_model_was_trained_with():
    from inversereg_testlib import trained_model_path
    from InverseRegLib.modelfile import load_model
    path = trained_model_path()
    shipped = load_model(path).preset
    assert shipped.to_dict() == get_preset("default").to_dict()


def test_trainer_defaults_match_the_documents_and_the_command_line():
    config = TrainConfig(data_dir="", run_dir="")
    readme = README.read_text(encoding="utf-8")
    # README: "uses Adam (lr 1e-4 unless `--lr`)"
    assert config.lr == float(re.search(r"uses Adam \(lr ([0-9.e-]+) unless `--lr`\)", readme).group(1))
    augmentation = card_row("augmentation")
    assert config.augment == float(re.search(r"with p=([0-9.]+) per image", augmentation).group(1))
    assert config.synth == float(re.search(r"random-contrast pairs with p=([0-9.]+)", augmentation).group(1))
    assert config.spacing == float(re.search(r" at (\d+)x\1x\1 mm", card_row("model grid")).group(1))
    assert config.preset == "default" and config.cascade == 0.0 and config.lr_schedule == "constant"
    # every default the command line gives equals the library's, so `inversereg train` and
    # TrainConfig(...) train the same run
    args = build_parser().parse_args(["train", "DATA", "-o", "RUN"])
    for key in ("preset", "steps", "lr", "seed", "spacing", "val_every", "checkpoint_every", "augment", "synth",
                "cascade", "lr_schedule", "device"):
        assert getattr(args, key) == getattr(config, key), key


@pytest.mark.parametrize("option,key", [("--weight-smooth", "smooth"), ("--weight-ncc", "ncc"),
                                        ("--weight-cycle", "cycle")])
def test_loss_weight_options_default_to_the_preset(option, key):
    """Unset loss-weight options must leave the preset's weights alone (None, not a number)."""
    args = build_parser().parse_args(["train", "DATA", "-o", "RUN"])
    assert getattr(args, option.removeprefix("--").replace("-", "_")) is None
    assert args.ncc_window is None
