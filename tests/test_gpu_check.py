"""benchmarks.gpu_check: its toy run on the CPU reports every measurement, a run out of budget keeps
what it measured, `dvc repro` stages are timed, cut at the budget, and report their error line, and a bad
flag is refused in one line before any work."""

import json
import math
import subprocess
import sys
import time

import pytest
import yaml
from helpers import ALL_STAGES, ROOT, merge, run

from benchmarks import gpu_check as check
from benchmarks.gpu_measure import SIZES
from benchmarks.gpu_pipeline import repro
from benchmarks.gpu_report import MARGIN_S, Report
from stages.pipeline.params import validate
from stages.sample import settings


def gpu_check(out, *args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--tiny", "--out", str(out), *args],
               ROOT)


def positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_tiny_run_reports_every_measurement(tmp_path):
    gpu_check(tmp_path, "--budget-s", "1800")  # time enough on a busy machine: this test is not of the budget
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    md = (tmp_path / "gpu_check.md").read_text()
    assert [row["precision"] for row in report["matmul"]] == ["fp32", "tf32", "bf16", "fp16"]
    assert report["matmul"][1]["note"] == "cuda only"
    assert all(positive(row["tflops"]) for row in report["matmul"] if row["precision"] != "tf32")

    rows = {row["variant"]: row for row in report["train"]}
    assert list(rows) == ["fp32", "tf32", "bf16", "fp16", "auto, channels-last", "auto, compiled"]
    for name in ("fp32", "bf16", "fp16"):  # CPU autocast runs bf16 and fp16
        assert rows[name]["precision"] == name and "note" not in rows[name]
        assert positive(rows[name]["images_per_s"]) and positive(rows[name]["gflops"])
    assert all(rows[name]["note"].startswith("cuda only") for name in ["tf32", "auto, channels-last", "auto, compiled"])

    many, few = SIZES["tiny"]["sample_steps"]
    assert [(row["sampler"], row["steps"], row["guidance"], row["precision"]) for row in report["sample"]] == [
        (sampler, steps, guidance, "fp32") for sampler in ("DDIM", "DPM-Solver++(2M)") for steps in (many, few)
        for guidance in ("none", "cfg (2 evals/step)")] + [("DDIM", many, "cfg (2 evals/step)", p)
                                                          for p in ("tf32", "bf16", "fp16")]
    assert report["sample"][-3]["note"] == "cuda only"  # tf32
    assert all(positive(row["images_per_s"]) for row in report["sample"] if row["precision"] != "tf32")
    cifar = {row["run"]: row for row in report["cifar10"]}  # the cifar10 profile's UNet, at 8 channels here
    assert list(cifar) == ["train, batch 8", f"sample DDIM-{few}, 4 images"]
    assert positive(cifar["train, batch 8"]["images_per_s"]) and positive(cifar["train, batch 8"]["gflops"])
    assert positive(cifar["train, batch 8"]["hours_for_800000_steps"])
    assert positive(cifar[f"sample DDIM-{few}, 4 images"]["minutes_for_50000_images"])
    for title in ("## torch.mm", "## Training steps", "## Sampling", "## The cifar10 profile (32x32x3)",
                  "## Pipeline: `dvc repro`", "| fp16 | fp16 |"):
        assert title in md

    stages = {row["stage"]: row for row in report["stages"]}
    assert set(stages) == ALL_STAGES | {"total"} and all(row.get("note") is None for row in stages.values())
    assert all(positive(row["seconds"]) for row in stages.values())
    p = validate(merge(yaml.safe_load((ROOT / "params.yaml").read_text()), report["meta"]["params"]))
    assert {(row["model"], row["sampler"]) for row in report["fid"]} == {  # a row per sampler setting it ran
        (variant, s.tag) for variant in ("uncond", "cond") for method in p.sample.methods
        for s in settings(method, p, p.diffusion.timesteps, variant == "cond")}
    # TINY's training: 2 epochs of 300 images in batches of 50
    assert all(positive(row["fid_over_floor"]) and row["train_steps"] == 12 for row in report["fid"])
    assert report["complete"] and "## Pipeline: FID over the floor" in md


@pytest.mark.slow
def test_a_run_out_of_budget_stops_itself_and_keeps_what_it_measured(tmp_path):
    start = time.monotonic()
    gpu_check(tmp_path, "--budget-s", str(MARGIN_S + 4))
    assert time.monotonic() - start < MARGIN_S + 4 + 60  # the budget, and the imports before it starts
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert not report["complete"] and report["meta"]["elapsed_s"] < MARGIN_S + 4
    rows = [row for name in ("matmul", "train", "sample", "stages") for row in report[name]]
    assert positive(report["matmul"][0]["tflops"])  # what fitted was measured...
    assert any(str(row.get("note")).startswith(("not run: budget", "cut: budget")) for row in rows)  # ...the rest not
    # the pipeline was not started, or (on a fast machine, with seconds left) cut by the budget
    notes = [row["note"] for row in report["stages"] if row["stage"] != "total"]
    assert notes[-1] in ("not run: budget", "cut: budget") and set(notes[:-1]) <= {None}, report["stages"]
    assert "not run: budget" in (tmp_path / "gpu_check.md").read_text()


def test_a_measurement_that_outlasts_the_budget_is_cut(tmp_path):
    report = Report(tmp_path, MARGIN_S + 0.5, {"mode": "test", "params": {}})
    start = time.monotonic()
    report.measure("matmul", {"precision": "fp32"}, lambda: time.sleep(30) or {"tflops": 1.0}, estimate=0.1)
    report.measure("matmul", {"precision": "bf16"}, lambda: {"tflops": 1.0}, estimate=0.1)
    report.measure("matmul", {"precision": "fp16"}, lambda: 1 / 0, estimate=-1)
    assert time.monotonic() - start < 5
    assert json.loads((tmp_path / "gpu_check.json").read_text())["matmul"] == [
        {"precision": "fp32", "note": "cut: budget"}, {"precision": "bf16", "note": "not run: budget (0 s left)"},
        {"precision": "fp16", "note": "failed: ZeroDivisionError: division by zero"}]


def dvc_repo(path, second_cmd: str):
    """A git + DVC repo of two stages, the second after the first."""
    path.mkdir()
    (path / "fail.py").write_text("import sys\nprint('progress')\nsys.exit('error: boom')\n")
    (path / "dvc.yaml").write_text(f"stages:\n  first:\n    cmd: echo one > one.txt\n    outs: [one.txt]\n"
                                   f"  second:\n    cmd: {second_cmd}\n    deps: [one.txt]\n")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        run(cmd, path)
    return path


def test_repro_times_each_stage_and_reports_the_failing_ones_error_line(tmp_path):
    repo = dvc_repo(tmp_path / "repo", "python fail.py")
    report = Report(tmp_path / "out", 120, {"mode": "test", "params": {}})
    assert not repro(report, repo, tmp_path / "repro.log")
    first, second = report.data["stages"]
    assert (first["stage"], first["note"], second["stage"], second["note"]) == ("first", None, "second", "error: boom")
    assert positive(first["seconds"]) and positive(second["seconds"])
    assert "Running stage 'second'" in (tmp_path / "repro.log").read_text()


def test_repro_is_stopped_when_the_budget_is_up(tmp_path):
    repo = dvc_repo(tmp_path / "repo", "sleep 60")
    report = Report(tmp_path / "out", MARGIN_S + 4, {"mode": "test", "params": {}})
    start = time.monotonic()
    assert not repro(report, repo, tmp_path / "repro.log")
    assert time.monotonic() - start < 20
    assert [(row["stage"], row.get("note")) for row in report.data["stages"]] == [
        ("first", None), ("second", "cut: budget")]


@pytest.mark.parametrize("flag, value, problem", [
    ("--budget-s", "nan", "must be a number of seconds above 5, got nan"),
    ("--budget-s", "-5", "must be a number of seconds above 5, got -5"),
    ("--budget-s", "inf", "must be a number of seconds above 5, got inf"),
    ("--budget-s", "9 min", "expected a number of seconds, got '9 min'"),
    ("--device", "gpu", "expected cuda, cuda:N or cpu, got 'gpu'"),
    ("--mnist", "no-such-folder", "no-such-folder has no t10k-images-idx3-ubyte.gz"),
])
def test_a_bad_flag_is_refused_in_one_line_before_any_work(tmp_path, flag, value, problem):
    with pytest.raises(SystemExit) as stop:
        check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path / "out"), flag, value])
    assert stop.value.code == f"gpu_check: argument {flag}: {problem} (see --help)"
    assert not (tmp_path / "out").exists()
