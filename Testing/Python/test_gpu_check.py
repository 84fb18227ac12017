"""``benchmarks/gpu_check.py``, the prepared device check, run here on the CPU on a small
synthetic pair: a lent GPU session has minutes, so the script must already work when it gets one."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu_check  # noqa: E402

from InverseRegLib.synthetic import make_pair  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu_check_data")
    fixed, moving, fixed_seg, moving_seg = make_pair(size=(40, 48, 40), spacing=(3.4, 3.4, 3.4), seed=3)
    for name, image in (("img_01", fixed), ("img_02", moving), ("seg_01", fixed_seg), ("seg_02", moving_seg)):
        sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))
    return folder


@pytest.mark.slow
def test_the_check_runs_whole_commands_and_reads_their_reports(data, tmp_path):
    out = tmp_path / "out"
    code = gpu_check.main(["--data", str(data), "--pairs", "01:02", "--settings", "default,target", "--device", "cpu",
                           "--runs", "1", "--labels", "all", "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "gpu_check.json").read_text())
    assert [(r["setting"], r["device"], r["report_device"]) for r in rows] == [("default", "cpu", "cpu"),
                                                                                ("target", "cpu", "cpu")]
    default, target = rows
    for row in rows:
        assert row["median_seconds"] > 0 and 0 < row["dice_mean"] <= 1 and 0 < row["dice_mean_backward"] <= 1
        assert math.isfinite(row["ice_mean_mm"]) and math.isfinite(row["ice_moving_mean_mm"])
    # the target setting really ran the mutual-inverse steps, and reached what it asked for
    assert default["mutual_steps_run"] is None and target["mutual_steps_run"] > 0
    assert max(target["ice_mean_mm"], target["ice_moving_mean_mm"]) <= 0.01 * 1.05
    assert (out / "target_cpu_01-02.json").is_file()


def test_a_failing_command_stops_the_check_with_its_reason(data, tmp_path):
    # no GPU here (the suite hides it): register refuses, and the check says why instead of a table
    with pytest.raises(RuntimeError, match="CUDA|cuda"):
        gpu_check.main(["--data", str(data), "--pairs", "01:02", "--settings", "default", "--device", "cuda",
                        "--runs", "1", "--labels", "all", "--out", str(tmp_path / "out")])


def test_unknown_settings_are_refused(data, tmp_path):
    with pytest.raises(SystemExit):
        gpu_check.main(["--data", str(data), "--settings", "fastest", "--out", str(tmp_path / "out")])
