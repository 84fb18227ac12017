"""``inversereg study`` (issue 15, item 4): many pairs, one folder each, a summary table, resume,
failures recorded and skipped over, and ``torchrun`` splitting the pairs over 2 CPU processes.

Pairs are tiny synthetic ones (32 x 36 x 32 voxels of 5 mm) through the small untrained test
network, one pass, no affine: seconds each.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

import InverseRegLib.study as study
from InverseRegLib.cli import main
from InverseRegLib.synthetic import make_pair
from inversereg_testlib import file_hashes, free_port

FAST = ["--device", "cpu", "--no-affine", "--passes", "1", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A template, three subjects, their label maps and a pairs CSV (relative paths)."""
    folder = tmp_path_factory.mktemp("study_data")
    for i in range(3):
        fixed, moving, fixed_seg, moving_seg = make_pair(size=(32, 36, 32), spacing=(5.0, 5.0, 5.0), seed=i)
        if i == 0:
            sitk.WriteImage(fixed, str(folder / "template.nii.gz"))
            sitk.WriteImage(fixed_seg, str(folder / "template_seg.nii.gz"))
        sitk.WriteImage(moving, str(folder / f"sub{i}.nii.gz"))
        sitk.WriteImage(moving_seg, str(folder / f"sub{i}_seg.nii.gz"))
    return folder


def write_pairs(path: Path, rows: list[str]) -> Path:
    path.write_text("fixed,moving,fixed_seg,moving_seg,name\n" + "".join(r + "\n" for r in rows))
    return path


def read_summary(outdir: Path) -> dict[str, dict]:
    with (outdir / "summary.csv").open() as handle:
        return {row["pair"]: row for row in csv.DictReader(handle)}


def test_template_study_writes_folders_and_summary(data, tmp_path, model_file, capsys, monkeypatch):
    """Every subject onto the template: a complete register folder each (carried labels too), and
    summary.csv whose numbers are each pair's report's; without tqdm, plain progress lines."""
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if tqdm were not installed
    out = tmp_path / "study"
    argv = ["study", "-o", str(out), "--template", str(data / "template.nii.gz"),
            *[str(data / f"sub{i}.nii.gz") for i in range(3)], "--template-seg", str(data / "template_seg.nii.gz"),
            "--subject-segs", *[str(data / f"sub{i}_seg.nii.gz") for i in range(3)], "--model", str(model_file),
            *[a for a in FAST if a != "--quiet"]]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert [line for line in captured.err.splitlines() if line.startswith("study [")] == \
        [f"study [{i + 1}/3] sub{i}: done in" + line.split("done in")[1]
         for i, line in enumerate(l for l in captured.err.splitlines() if l.startswith("study ["))]
    summary = read_summary(out)
    assert list(summary) == ["sub0", "sub1", "sub2"]
    for name, row in summary.items():
        report = json.loads((out / name / "report.json").read_text(encoding="utf-8"))
        assert row["status"] == "ok" and row["message"] == ""
        assert float(row["dice_mean"]) == report["dice_mean"] and float(row["ice_mean_mm"]) == report["ice_mean_mm"]
        assert float(row["seconds"]) == report["seconds_total"]
        assert report["study_inputs"]["moving"] == str(data / f"{name}.nii.gz")
        assert (out / name / "moving_seg_warped.nii.gz").is_file() and (out / name / "forward.nii.gz").is_file()


def test_missing_file_fails_one_pair_and_resume_skips_finished_ones(data, tmp_path, model_file, capsys, monkeypatch):
    """A CSV naming a missing file: one line naming it, that pair failed in the summary, the
    others done, exit status 1. A rerun leaves the finished pairs untouched (not registered
    again) and retries the failed one; once the file exists it succeeds and its error is gone."""
    pairs = write_pairs(tmp_path / "pairs.csv", [
        f"{data / 'template.nii.gz'},{data / 'sub0.nii.gz'},{data / 'template_seg.nii.gz'},{data / 'sub0_seg.nii.gz'},a",
        f"{data / 'template.nii.gz'},late.nii.gz,,,b",
        f"{data / 'template.nii.gz'},{data / 'sub2.nii.gz'},,,c"])
    out = tmp_path / "study"
    argv = ["study", "--pairs", str(pairs), "-o", str(out), "--model", str(model_file), *FAST]
    assert main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "pair 'b' failed" in err[0] and str(tmp_path / "late.nii.gz") in err[0], err
    summary = read_summary(out)
    assert [summary[n]["status"] for n in "abc"] == ["ok", "failed", "ok"]
    assert "not found" in summary["b"]["message"] and summary["a"]["dice_mean"] and not summary["c"]["dice_mean"]
    finished = file_hashes(out / "a", out / "c")

    calls = []
    real = study.register_pair
    monkeypatch.setattr(study, "register_pair", lambda pair, *a, **k: (calls.append(pair.name), real(pair, *a, **k))[1])
    assert main(argv) == 1
    capsys.readouterr()
    assert calls == ["b"] and file_hashes(out / "a", out / "c") == finished

    (tmp_path / "late.nii.gz").write_bytes((data / "sub1.nii.gz").read_bytes())
    assert main(argv) == 0
    assert calls == ["b", "b"] and not (out / "b" / "error.txt").exists()
    assert [read_summary(out)[n]["status"] for n in "abc"] == ["ok"] * 3
    assert file_hashes(out / "a", out / "c") == finished


def test_interrupted_study_resumes_and_other_options_redo(data, tmp_path, model_file, monkeypatch, capsys):
    """Ctrl-C during the second pair: the first pair's folder is complete and kept, the
    interrupted one has no report, summary.csv says so; the rerun does only what is missing. Other options (two
    passes) make every pair stale: all are registered again."""
    pairs = write_pairs(tmp_path / "pairs.csv", [f"{data / 'template.nii.gz'},{data / f'sub{i}.nii.gz'},,,p{i}"
                                                 for i in range(3)])
    out = tmp_path / "study"
    argv = ["study", "--pairs", str(pairs), "-o", str(out), "--model", str(model_file), *FAST]
    real = study.register_pair
    calls = []

    def interrupted(pair, *args, **kwargs):
        calls.append(pair.name)
        if pair.name == "p1":
            raise KeyboardInterrupt
        return real(pair, *args, **kwargs)

    monkeypatch.setattr(study, "register_pair", interrupted)
    assert main(argv) == 130
    assert calls == ["p0", "p1"] and (out / "p0" / "report.json").is_file() and not (out / "p1" / "report.json").exists()
    # the summary kept up to date after each pair says how far it got
    assert [row["status"] for row in read_summary(out).values()] == ["ok", "not run", "not run"]
    first = file_hashes(out / "p0")
    monkeypatch.setattr(study, "register_pair", lambda pair, *a, **k: (calls.append(pair.name), real(pair, *a, **k))[1])
    assert main(argv) == 0
    assert calls == ["p0", "p1", "p1", "p2"] and file_hashes(out / "p0") == first
    argv[argv.index("--passes") + 1] = "2"
    assert main(argv) == 0
    assert calls[4:] == ["p0", "p1", "p2"]
    assert json.loads((out / "p0" / "report.json").read_text(encoding="utf-8"))["passes"] == 2
    capsys.readouterr()


@pytest.mark.parametrize("needle", ["missing fixed", "two pairs are named 'x'", "not a plain folder name"])
def test_bad_pairs_files_are_refused_before_any_work(data, tmp_path, model_file, capsys, needle):
    """A CSV without the fixed column, two pairs of one name, a name that is a path: one line,
    exit 2, no study folder made."""
    path = tmp_path / "pairs.csv"
    template, sub = data / "template.nii.gz", data / "sub0.nii.gz"
    if needle.startswith("missing"):
        path.write_text("fixd,moving\na,b\n")
    elif "two pairs" in needle:
        write_pairs(path, [f"{template},{sub},,,x", f"{template},{sub},,,x"])
    else:
        write_pairs(path, [f"{template},{sub},,,../escape"])
    out = tmp_path / "study"
    code = main(["study", "--pairs", str(path), "-o", str(out), "--model", str(model_file), *FAST])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists()


@pytest.mark.slow
def test_torchrun_splits_pairs_over_two_processes(data, tmp_path, model_file):
    """``torchrun --nproc_per_node 2 -m InverseRegLib study``: rank r registers the pairs i with
    i % 2 == r (each exactly once, recorded in its report), and rank 0 writes one summary with
    every pair, after both are done."""
    pairs = write_pairs(tmp_path / "pairs.csv", [f"{data / 'template.nii.gz'},{data / f'sub{i % 3}.nii.gz'},,,p{i}"
                                                 for i in range(5)])
    out = tmp_path / "study"
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               PYTHONPATH=os.pathsep.join([str(Path(study.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "InverseRegLib", "study",
               "--pairs", str(pairs), "-o", str(out), "--model", str(model_file), *FAST]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = {f"p{i}": json.loads((out / f"p{i}" / "report.json").read_text(encoding="utf-8"))["study_rank"] for i in range(5)}
    assert ranks == {f"p{i}": f"{i % 2}/2" for i in range(5)}
    summary = read_summary(out)
    assert list(summary) == [f"p{i}" for i in range(5)] and {r["status"] for r in summary.values()} == {"ok"}
    # rank 0 reports all five, rank 1 its own two
    assert "5 pairs: 5 ok" in done.stdout and "2 pairs: 2 ok" in done.stdout


def test_study_runs_the_quality_and_mutual_inverse_asked_for(data, tmp_path, model_file, monkeypatch, capsys):
    """``--quality best`` and ``--mutual-inverse N`` reach every pair's registration (the study
    once ran fast whatever ``--quality`` said); a study recorded before these two options existed
    (its report without them) still counts as done under the defaults; a negative count is one
    error line before any work."""
    pairs = write_pairs(tmp_path / "pairs.csv", [f"{data / 'template.nii.gz'},{data / 'sub0.nii.gz'},,,p0"])
    out = tmp_path / "study"
    argv = ["study", "--pairs", str(pairs), "-o", str(out), "--model", str(model_file), *FAST]
    assert main(argv + ["--quality", "best", "--mutual-inverse", "2"]) == 0
    report = json.loads((out / "p0" / "report.json").read_text(encoding="utf-8"))
    assert report["quality"] == "best" and report["mutual_steps"] == 2 and report["seconds_fullres"] > 0
    assert main(argv) == 0  # other options: registered again, with the defaults
    path = out / "p0" / "report.json"
    report = json.loads(path.read_text(encoding="utf-8"))
    assert report["quality"] == "fast" and report["mutual_steps"] == 0
    for key in ("quality", "mutual_steps"):
        del report["study_options"][key]
    path.write_text(json.dumps(report), encoding="utf-8")
    calls = []
    real = study.register_pair
    monkeypatch.setattr(study, "register_pair", lambda pair, *a, **k: (calls.append(pair.name), real(pair, *a, **k))[1])
    assert main(argv) == 0 and calls == []
    capsys.readouterr()
    assert main(argv + ["--mutual-inverse", "-1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--mutual-inverse" in err[0] and calls == []

