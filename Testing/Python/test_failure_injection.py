"""Failure injection for every file the tools write: a failure at any point leaves the old
complete result or the new complete one, never a mixture, and no temporary files.

The failures are real exceptions raised from the real writers at the k-th call (``os.replace``,
which every atomic writer and the folder swap go through; ``sitk.WriteImage``;
``sitk.WriteTransform``; ``os.fdopen`` of the text writer), for every k a successful run makes,
plus a writer that leaves half a file behind (a full disk) and Ctrl-C (KeyboardInterrupt).

- ``register`` outputs (fields, warped images, affine.tfm, report.json): after any failure the
  folder holds byte for byte what it held before (an earlier run, or nothing); after a success,
  report.json's ``files`` record matches the files beside it and no stale file of another run
  (an old ``affine.tfm``) is left;
- ``evaluate``'s pairs.csv / labels.csv / summary.json: the same;
- training (checkpoint.pt, snapshots, best_model.pt, model.pt, config.json, log.csv, val.csv):
  every model file present is complete and loadable, no temporary file is left, and continuing
  the run (``--resume``, or starting again when no checkpoint was written) ends with exactly the
  weights and logs of an uninterrupted run.
"""
from __future__ import annotations

import csv
import dataclasses
import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from InverseRegLib import evaluate as evaluate_module
from InverseRegLib.cli import main
from InverseRegLib.evaluate import evaluate_folder
from InverseRegLib.modelfile import load_model
from InverseRegLib.outputs import STAGING_PREFIX, write_result
from InverseRegLib.pipeline import register
from InverseRegLib.synthetic import make_pair
from inversereg_testlib import file_hashes, small_model
from training_data import interrupt_training_at, train_argv, write_subjects


class Injected(OSError):
    """The failure the tests inject (an OSError, like a full disk or a lost network share)."""


class FailAt:
    """Wraps a real function; its ``k``-th call raises ``error`` instead (k = 0: never)."""

    def __init__(self, real, k: int = 0, error: BaseException | None = None, when=None):
        self.real, self.k, self.calls = real, k, 0
        self.error = error if error is not None else Injected(errno.ENOSPC, "injected failure")
        self.when = when or (lambda *args, **kwargs: True)

    def __call__(self, *args, **kwargs):
        if self.when(*args, **kwargs):
            self.calls += 1
            if self.calls == self.k:
                raise self.error
        return self.real(*args, **kwargs)


def half_written_image(real_writer, image, path, *args, **kwargs):
    """A writer that dies half-way: some bytes of a real file under the name, then an error."""
    real_writer(image, str(path), *args, **kwargs)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    raise Injected(errno.ENOSPC, "No space left on device")


#: (module, attribute) of every writer a failure is injected into
TARGETS = {"os.replace": (os, "replace"), "sitk.WriteImage": (sitk, "WriteImage"),
           "sitk.WriteTransform": (sitk, "WriteTransform"), "os.fdopen": (os, "fdopen")}


def listing(folder: Path) -> set[str]:
    """Every entry under ``folder``, hidden ones included, as relative paths."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} | {
        str(p.relative_to(folder)) for p in folder.rglob(".*")}


def assert_no_temporary_files(folder: Path) -> None:
    leftovers = sorted(name for name in listing(folder) if any(part.startswith(".") for part in Path(name).parts))
    assert not leftovers, f"temporary files left: {leftovers}"


def count_calls(monkeypatch, action) -> dict[str, int]:
    """How often a successful ``action()`` calls each target."""
    counters = {}
    for name, (module, attribute) in TARGETS.items():
        counters[name] = FailAt(getattr(module, attribute))
        monkeypatch.setattr(module, attribute, counters[name])
    action()
    for name, (module, attribute) in TARGETS.items():
        monkeypatch.setattr(module, attribute, counters[name].real)
    return {name: counter.calls for name, counter in counters.items()}


def injections(counts: dict[str, int]):
    """(target, k, exception) for every call of every target, plus Ctrl-C at two points."""
    cases = [(name, k, None) for name, n in counts.items() for k in range(1, n + 1)]
    cases.append(("os.replace", 1, KeyboardInterrupt()))
    cases.append(("os.replace", counts["os.replace"], KeyboardInterrupt()))
    return cases


# --- register: fields, warped images, affine.tfm, report.json ---------------------------------

@pytest.fixture(scope="module")
def two_results():
    """Two different registrations of one small pair, with an affine part each (so affine.tfm
    is written), as an earlier and a later run into the same folder."""
    fixed, moving, _, _ = make_pair(size=(24, 28, 24), spacing=(6.8, 6.8, 6.8), seed=3)
    runs = []
    for seed, shift in ((0, (1.0, 2.0, -1.5)), (1, (-2.0, 0.5, 1.0))):
        result = register(fixed, moving, small_model("default", 5e4, seed=seed), "cpu", None, passes=1)
        runs.append(dataclasses.replace(result, affine=sitk.TranslationTransform(3, shift)))
    return runs


def assert_report_describes_the_folder(outdir: Path) -> None:
    report = json.loads((outdir / "report.json").read_text(encoding="utf-8"))
    names = {p.name for p in outdir.iterdir()}
    assert names == {*report["files"], "report.json"}, "a file beside report.json that it does not describe"
    for name, record in report["files"].items():
        data = (outdir / name).read_bytes()
        assert len(data) == record["bytes"]
        assert hashlib.sha256(data).hexdigest() == record["sha256"], name


@pytest.mark.parametrize("new_has_affine", [True, False], ids=["new-with-affine", "new-without-affine"])
def test_register_outputs_are_all_old_or_all_new(two_results, tmp_path, monkeypatch, new_has_affine):
    old, new = two_results
    if not new_has_affine:
        new = dataclasses.replace(new, affine=None)
    template = tmp_path / "template"
    write_result(old, template, [])
    assert_report_describes_the_folder(template)
    old_files = file_hashes(template)

    def fresh(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for path in template.iterdir():
            (folder / path.name).write_bytes(path.read_bytes())
        return folder

    counts = count_calls(monkeypatch, lambda: write_result(new, fresh("count"), []))
    assert counts["os.replace"] >= 10 and counts["sitk.WriteImage"] == 4
    assert counts["sitk.WriteTransform"] == (1 if new_has_affine else 0)
    cases = injections(counts) + [("sitk.WriteImage", k, "half") for k in (1, 4)]
    for index, (target, k, error) in enumerate(cases):
        folder = fresh(f"case{index}")
        before = file_hashes(folder)
        module, attribute = TARGETS[target]
        if error == "half":
            real = getattr(module, attribute)
            calls = {"n": 0}

            def writer(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == k:
                    half_written_image(real, *args, **kwargs)
                return real(*args, **kwargs)
            monkeypatch.setattr(module, attribute, writer)
            expected = Injected
        else:
            monkeypatch.setattr(module, attribute, FailAt(getattr(module, attribute), k, error))
            expected = type(error) if error is not None else Injected
        with pytest.raises(expected):
            write_result(new, folder, [])
        monkeypatch.undo()
        case = f"{target} failing at call {k} ({error or 'OSError'})"
        assert {Path(p).name: h for p, h in file_hashes(folder).items()} == \
            {Path(p).name: h for p, h in old_files.items()}, case
        assert file_hashes(folder) == before, case
        assert_no_temporary_files(folder)
    # and the same write without a failure replaces the old run completely
    folder = fresh("success")
    write_result(new, folder, [])
    assert_report_describes_the_folder(folder)
    assert (folder / "affine.tfm").exists() == new_has_affine
    assert_no_temporary_files(folder)


def test_a_failed_first_run_leaves_no_files(two_results, tmp_path, monkeypatch):
    """Into an empty folder: a failure at the last rename (report.json) leaves it empty."""
    _, new = two_results
    counts = count_calls(monkeypatch, lambda: write_result(new, tmp_path / "count", []))
    for k in range(1, counts["os.replace"] + 1):
        folder = tmp_path / f"empty{k}"
        monkeypatch.setattr(os, "replace", FailAt(os.replace, k))
        with pytest.raises(Injected):
            write_result(new, folder, [])
        monkeypatch.undo()
        assert listing(folder) == set(), f"os.replace failing at call {k}"


def test_the_report_names_every_file_and_nothing_else(two_results, tmp_path):
    """The defect issue 16 saw: new fields beside an old report.json. After a run with an affine
    and one without, report.json describes exactly the files in the folder."""
    old, new = two_results
    write_result(old, tmp_path, [])
    write_result(dataclasses.replace(new, affine=None), tmp_path, [])
    assert not (tmp_path / "affine.tfm").exists()
    assert_report_describes_the_folder(tmp_path)
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    forward = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "forward.nii.gz")))
    np.testing.assert_allclose(forward, sitk.GetArrayFromImage(new.forward))
    assert report["model_id"] == new.report["model_id"]


# --- evaluate: pairs.csv, labels.csv, summary.json ---------------------------------------------

@pytest.fixture(scope="module")
def eval_data(tmp_path_factory, model_file):
    folder = tmp_path_factory.mktemp("eval_data")
    fixed, moving, fixed_seg, moving_seg = make_pair(size=(24, 28, 24), spacing=(6.8, 6.8, 6.8), seed=4)
    for name, image, seg in (("a", fixed, fixed_seg), ("b", moving, moving_seg)):
        sitk.WriteImage(image, str(folder / f"img_{name}.nii.gz"))
        sitk.WriteImage(seg, str(folder / f"seg_{name}.nii.gz"))
    return folder, load_model(model_file)


def test_evaluation_tables_are_all_old_or_all_new(eval_data, tmp_path, monkeypatch):
    data, model = eval_data
    real_register = evaluate_module.register
    cache = {}

    def register_once(fixed, moving, *args, **kwargs):  # the real registration, computed once per pair
        key = (sitk.GetArrayViewFromImage(fixed).tobytes(), sitk.GetArrayViewFromImage(moving).tobytes(),
               repr(args[6:]))  # (labels,): the one argument the two evaluations differ in
        if key not in cache:
            cache[key] = real_register(fixed, moving, *args, **kwargs)
        return cache[key]

    monkeypatch.setattr(evaluate_module, "register", register_once)
    old_dir = tmp_path / "old"
    evaluate_folder(data, old_dir, model, "cpu", None, labels=[2, 41])
    old_files = {Path(p).name: h for p, h in file_hashes(old_dir).items()}
    assert set(old_files) == {"pairs.csv", "labels.csv", "summary.json"}

    def new_run(folder):
        return evaluate_folder(data, folder, model, "cpu", None, labels=[2])

    def fresh(name):
        folder = tmp_path / name
        folder.mkdir()
        for path in old_dir.iterdir():
            (folder / path.name).write_bytes(path.read_bytes())
        return folder

    counts = count_calls(monkeypatch, lambda: new_run(fresh("count")))
    assert counts["os.replace"] >= 6
    for index, (target, k, error) in enumerate(injections(counts)):
        folder = fresh(f"case{index}")
        module, attribute = TARGETS[target]
        monkeypatch.setattr(module, attribute, FailAt(getattr(module, attribute), k, error))
        with pytest.raises(type(error) if error is not None else Injected):
            new_run(folder)
        monkeypatch.setattr(module, attribute, getattr(module, attribute).real)
        assert {Path(p).name: h for p, h in file_hashes(folder).items()} == old_files, (target, k)
        assert_no_temporary_files(folder)
    folder = fresh("success")
    summary = new_run(folder)
    on_disk = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    assert on_disk == summary and set(on_disk["files"]) == {"pairs.csv", "labels.csv"}
    with (folder / "labels.csv").open() as handle:
        assert {row["label"] for row in csv.DictReader(handle)} == {"2"}


# --- training: checkpoint.pt, snapshots, best_model.pt, model.pt, config.json, logs ------------

STEPS = 3


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    return write_subjects(tmp_path_factory.mktemp("train_data") / "data")


@pytest.fixture(scope="module")
def uninterrupted(train_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main(train_argv(train_data, run, STEPS, "--checkpoint-every", "2")) == 0
    return run


def weights(path: Path) -> dict:
    payload = torch.load(path, weights_only=True)
    return payload["state_dict"] if "state_dict" in payload else payload["model"]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def rows(path: Path) -> list[dict]:
    with path.open() as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


@pytest.mark.parametrize("destination,nth", [("config.json", 1), ("model_step000002.pt", 1), ("best_model.pt", 1),
                                             ("checkpoint.pt", 1), ("checkpoint.pt", 2), ("model.pt", 1)])
def test_a_failed_training_write_leaves_complete_files_and_resumes_exactly(
        train_data, uninterrupted, tmp_path, monkeypatch, destination, nth):
    """The ``nth`` rename onto ``destination`` fails (an atomic write's last step); then the run
    is continued the way a user would, and must end as the uninterrupted run did."""
    run = tmp_path / "run"
    monkeypatch.setattr(os, "replace", FailAt(os.replace, nth, when=lambda src, dst: Path(dst).name == destination))
    with pytest.raises(Injected):
        main(train_argv(train_data, run, STEPS, "--checkpoint-every", "2"))
    monkeypatch.undo()
    assert_no_temporary_files(run)
    for path in [*run.glob("*.pt"), *run.glob("snapshots/*.pt")]:
        load_model(path) if path.name != "checkpoint.pt" else torch.load(path, weights_only=True)
    assert not (run / destination).exists() or destination == "checkpoint.pt" and nth == 2
    again = [*train_argv(train_data, run, STEPS, "--checkpoint-every", "2")]
    if (run / "checkpoint.pt").exists():
        again.append("--resume")
    assert main(again) == 0
    for name in ("model.pt", "best_model.pt", "checkpoint.pt", "snapshots/model_step000003.pt"):
        assert same_weights(run / name, uninterrupted / name), name
    assert rows(run / "log.csv") == rows(uninterrupted / "log.csv")
    assert rows(run / "val.csv") == rows(uninterrupted / "val.csv")
    assert json.loads((run / "config.json").read_text(encoding="utf-8")) == json.loads((uninterrupted / "config.json").read_text(encoding="utf-8")) \
        | {"run_dir": str(run)}
    assert_no_temporary_files(run)


def test_a_log_row_cut_short_by_a_crash_is_dropped_on_resume(train_data, uninterrupted, tmp_path, monkeypatch):
    """A crash in the middle of appending to log.csv leaves part of a row: the resumed run must
    drop it (it redoes that step) instead of keeping a damaged row or stopping."""
    run = tmp_path / "run"
    interrupt_training_at(monkeypatch, 3)
    assert main(train_argv(train_data, run, STEPS, "--checkpoint-every", "2")) == 130  # Ctrl-C's status
    monkeypatch.undo()
    with (run / "log.csv").open("a") as handle:
        handle.write("3,-1.2")  # the start of step 3's row, no newline
    with (run / "val.csv").open("a") as handle:
        handle.write("3")
    assert main([*train_argv(train_data, run, STEPS, "--checkpoint-every", "2"), "--resume"]) == 0
    assert rows(run / "log.csv") == rows(uninterrupted / "log.csv")
    assert rows(run / "val.csv") == rows(uninterrupted / "val.csv")
    assert same_weights(run / "model.pt", uninterrupted / "model.pt")


def test_staging_prefix_is_hidden():
    """The staging folder is a hidden name, so the no-temporary-files checks above see it."""
    assert STAGING_PREFIX.startswith(".")


def test_a_persistent_failure_never_deletes_the_previous_result(two_results, tmp_path, monkeypatch):
    """Every rename fails from the k-th on (the disk went read-only mid-swap), so the rollback
    cannot put everything back: the folder then holds no report.json (not a result), and every
    previous file is still somewhere in the folder (beside it or in the staging folder), never
    deleted."""
    old, new = two_results
    write_result(old, tmp_path / "template", [])
    previous = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "template").iterdir()}
    real = os.replace
    for k in range(6, 12):  # the renames that move the previous files aside and the new ones in
        folder = tmp_path / f"case{k}"
        folder.mkdir()
        for path in (tmp_path / "template").iterdir():
            (folder / path.name).write_bytes(path.read_bytes())
        calls = {"n": 0}

        def broken(src, dst):
            calls["n"] += 1
            if calls["n"] >= k:
                raise Injected(errno.EROFS, "Read-only file system")
            return real(src, dst)

        monkeypatch.setattr(os, "replace", broken)
        with pytest.raises(Injected):
            write_result(new, folder, [])
        monkeypatch.undo()
        kept = {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}
        assert previous <= kept, f"a previous file was deleted (renames failing from call {k})"
        if not (folder / "report.json").exists():
            continue
        assert_report_describes_the_folder(folder)  # if a report is there, it is the whole truth


def test_when_one_previous_file_cannot_be_put_back_its_report_is_not_either(two_results, tmp_path, monkeypatch):
    """The swap fails at the first new file moved in, and then putting back the previous
    forward.nii.gz fails too: every other previous file is put back, but not the previous
    report.json (it would describe a forward.nii.gz that is not there); the previous forward
    field is kept in the staging folder, not deleted."""
    old, new = two_results
    folder = tmp_path / "out"
    write_result(old, folder, [])
    previous = {p.name: p.read_bytes() for p in folder.iterdir()}
    real = os.replace

    def broken(src, dst):
        src, dst = Path(src), Path(dst)
        moving_in = src.parent.name == "new" and dst.parent == folder
        putting_back = src.parent.name == "old" and dst.name == "forward.nii.gz"
        if (moving_in and dst.name == "forward.nii.gz") or putting_back:
            raise Injected(errno.EIO, "injected")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(Injected):
        write_result(new, folder, [])
    monkeypatch.undo()
    visible = {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")}
    assert "report.json" not in visible and "forward.nii.gz" not in visible
    assert visible == {k: v for k, v in previous.items() if k not in ("report.json", "forward.nii.gz")}
    kept = [p for p in folder.glob(".*/old/*")]
    assert {p.name for p in kept} >= {"forward.nii.gz", "report.json"}
    assert next(p for p in kept if p.name == "forward.nii.gz").read_bytes() == previous["forward.nii.gz"]
