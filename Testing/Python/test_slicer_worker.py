"""``inversereg worker`` (InverseRegLib/worker.py): requests in, JSON events with ids out.

In-process (the worker's ``serve`` on string streams); the real subprocess, with a real
registration, is in ``InverseReg/InverseRegScene/tests.py`` (``test_worker_...``)."""
import io
import json

import pytest

from InverseRegLib.errors import InverseRegError
from InverseRegLib.worker import request_argv, serve


def test_request_becomes_the_register_command_line():
    argv = request_argv({"id": 1, "fixed": "f.nii", "moving": "m.nii", "output": "out",
                         "options": {"device": "cpu", "passes": 1, "fixed_seg": "fs.nii", "no_affine": True,
                                     "model": None}})
    assert argv == ["register", "f.nii", "m.nii", "-o", "out", "--device", "cpu", "--passes", "1",
                    "--fixed-seg", "fs.nii", "--no-affine", "--progress", "json"]
    with pytest.raises(InverseRegError, match="no moving, output"):
        request_argv({"fixed": "f.nii"})
    with pytest.raises(InverseRegError, match="set by the worker"):
        request_argv({"fixed": "f", "moving": "m", "output": "o", "options": {"progress": "bar"}})


def test_the_panels_mutual_inverse_request_parses_as_register_options():
    """The Slicer panel's request for mutual-inverse steps and a target (runner.register_request,
    string values) reaches register() as the CLI's own parser reads it: the target alone means the
    command's cap of steps, as on the command line."""
    import sys
    from pathlib import Path
    from InverseRegLib.cli import TARGET_ONLY_MAX_STEPS, _mutual_arg, build_parser
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "InverseReg"))
    from InverseRegScene.runner import register_request  # Qt-free, importable without Slicer
    for steps, target, expected in ((400, 0.01, {"mutual_steps": 400, "mutual_target_mm": 0.01}),
                                    (0, 0.01, {"mutual_steps": TARGET_ONLY_MAX_STEPS, "mutual_target_mm": 0.01}),
                                    (0, 0.0, {"mutual_steps": 0, "mutual_target_mm": None})):
        request = register_request("1", "f.nrrd", "m.nrrd", "out", mutual_inverse=steps, mutual_target=target)
        args = build_parser().parse_args(request_argv(request))
        assert _mutual_arg(args) == expected


def test_serve_answers_every_request_with_its_id_and_keeps_going(tmp_path):
    requests = "\n".join([
        "not json",
        json.dumps({"id": "a", "fixed": str(tmp_path / "nope.nii"), "moving": str(tmp_path / "nope2.nii"),
                    "output": str(tmp_path / "out")}),
        json.dumps({"id": "b", "fixed": "f", "moving": "m", "output": "o", "options": {"passes": "two"}}),
        json.dumps({"id": "c", "fixed": "f", "moving": "m", "output": "o", "options": {"no_such_flag": 1}}),
    ]) + "\n"
    out = io.StringIO()
    assert serve(io.StringIO(requests), out) == 0
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert events[0] == {"event": "ready"}
    assert events[1] == {"event": "error", "id": None, "message": "the request is not JSON"}
    by_id = {e["id"]: e for e in events[2:]}
    assert set(by_id) == {"a", "b", "c"} and all(e["event"] == "error" for e in by_id.values())
    assert "not found" in by_id["a"]["message"] and "nope.nii" in by_id["a"]["message"]
    assert "two" in by_id["b"]["message"]
    assert "no_such_flag" in by_id["c"]["message"] or "no-such-flag" in by_id["c"]["message"]
