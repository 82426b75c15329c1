"""The GPU check's pipeline run: `dvc repro` of a copy of the project, each stage's seconds (from `dvc repro`'s
output as it runs, stopped when the budget is up) and each model and sampler's FID over its floor; a failing
stage's error line instead where one fails."""

import contextlib
import importlib.util
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.gpu_report import Report
from benchmarks.mnist_split import main as split_mnist
from benchmarks.project import copy_project, merge

TRACKING_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DDPM_TRACKING", "DDPM_MODEL_NAME",
                      "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_ROOT")


def make_repo(path: Path, params: dict, mnist: Path | None) -> None:
    """A copy of the project at `path` with `params`, and the MNIST test split as a data.root folder (else
    the offline glyphs dataset)."""
    if mnist:
        split_mnist([str(mnist), str(path.parent / "mnist-t10k-split")])
        params = merge(params, {"data": {"name": "mnist", "root": str(path.parent / "mnist-t10k-split")}})
    else:
        params = merge(params, {"data": {"name": "glyphs"}})
    copy_project(path, params, environment())


def environment() -> dict:
    """This interpreter's bin/ first on PATH, without the user's tracking targets, no progress bars."""
    env = {k: v for k, v in os.environ.items() if k not in TRACKING_VARIABLES}
    if torch.get_num_threads() == 1:  # --tiny
        env["OMP_NUM_THREADS"] = "1"
    return {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1", "DVC_NO_ANALYTICS": "1", "TQDM_DISABLE": "1"}


def repro(r: Report, repo: Path, log: Path) -> bool:
    """Run `dvc repro` in `repo`, adding a row per stage as the next one starts; stop it when the budget
    is up. A failing stage's row gets its last line of output. True if every stage ran."""
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=environment(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines = queue.Queue()

    def read():  # in a thread, so that the budget is checked while a stage is silent
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    stage, start, tail, cut = None, time.monotonic(), [], False
    with log.open("w") as f:
        while proc.poll() is None or not lines.empty():
            if r.left() <= 0 and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # the stages end their MLflow runs as FAILED
                cut = True
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            f.write(line)
            tail = [*tail[-40:], line.rstrip()]
            if match := re.match(r"Running stage '([^']+)'", line):
                if stage:
                    r.add("stages", {"stage": stage, "seconds": time.monotonic() - start, "note": None})
                stage, start = match.group(1), time.monotonic()
    proc.wait()
    if stage:
        note = "cut: budget" if cut else None if proc.returncode == 0 else error_line(tail)
        r.add("stages", {"stage": stage, "seconds": time.monotonic() - start, "note": note})
    elif proc.returncode:  # stopped before its first stage: by the budget, or DVC itself failed
        r.add("stages", {"stage": "(dvc)", "note": "cut: budget" if cut else error_line(tail)})
    return proc.returncode == 0


def error_line(tail: list[str]) -> str:
    """The failing stage's own last line (its one-line error, or a traceback's last line), else DVC's."""
    failed = next((i for i, line in enumerate(tail) if line.startswith("ERROR: failed to reproduce")), None)
    before = [line for line in tail[:failed] if line.strip() and not line.startswith(("ERROR", "WARNING"))]
    return (before[-1] if failed and before else next((x for x in reversed(tail) if x.strip()), "failed"))[:300]


def pipeline(r: Report, params: dict, mnist: Path | None) -> bool:
    """`dvc repro` of a copy of the project with `params`: stage rows, FID rows; True if it all ran."""
    if importlib.util.find_spec("dvc") is None:
        r.add("stages", {"stage": "(all)", "note": f"not run: {sys.executable} cannot import dvc"})
        return False
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    try:
        make_repo(work / "repo", params, mnist)
        start = time.monotonic()
        ok = repro(r, work / "repo", r.out / "pipeline.log")
        r.add("stages", {"stage": "total", "seconds": time.monotonic() - start, "note": None if ok else "incomplete"})
        if (work / "repo/metrics/eval.json").is_file():  # also when only the last stage (visualize) was cut
            fid_rows(r, work / "repo/metrics")
        return ok
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fid_rows(r: Report, metrics: Path) -> None:
    results = json.loads((metrics / "eval.json").read_text())
    floor = results["floor"]["classifier"]["fid"]
    for variant in ("uncond", "cond"):
        train = json.loads((metrics / f"train_{variant}.json").read_text())
        for tag, scores in results.get(variant, {}).items():
            r.data["fid"].append({"model": variant, "sampler": tag, "fid": scores["fid"], "floor": floor,
                                  "fid_over_floor": scores["fid"] / floor, "train_steps": train["steps"],
                                  "train_images_per_s": train["images_per_second"]})
    r.write()

