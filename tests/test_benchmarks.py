"""The quality-per-compute benchmark and the MNIST-format split it runs on, end to end at a tiny size."""

import csv
import json
import math
import shutil
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, run
from mlflow import MlflowClient
from PIL import Image

from ddpm import load_model, safe_load
from ddpm.data import load_dataset, read_idx

MNIST_T10K = ROOT.parent / "shared/data/mnist-t10k"


def test_budget_benchmark_writes_a_row_and_an_mlflow_run_per_ddim_steps(tmp_path):
    db = tmp_path / "mlflow.db"
    results = tmp_path / "results.csv"
    overrides = ["device=cpu", "data.name=glyphs", "data.limit=200", "data.test_limit=100", "diffusion.timesteps=50",
                 "diffusion.prediction=v", "model.base_channels=8", "model.num_heads=2", "classifier.epochs=1",
                 "classifier.width=8", "train.batch_size=32", "train.min_snr_gamma=5",
                 "train_uncond.steps=2", "train_cond.steps=2"]  # the benchmark's budget ends training, not these

    def budget(*args: str, check: bool = True):
        return run([sys.executable, "-m", "benchmarks.budget", "--num-samples", "20", "--results", str(results),
                    "--classifier", str(tmp_path / "classifier.pt"), *args,
                    *[arg for item in overrides for arg in ("-S", item)]],
                   cwd=ROOT, env={"MLFLOW_TRACKING_URI": f"sqlite:///{db}"}, check=check)

    results.write_text("name,fid,ratio\nolder,1.5,3.0\n")  # a table from before the recall columns
    proc = budget("--minutes", "0.05", "--ddim-steps", "2", "5", "--name", "smoke")
    assert "classifier test accuracy" in proc.stdout  # trained once, then kept
    assert (tmp_path / "classifier.pt").is_file()
    proc = budget("--steps", "3", "--ddim-steps", "2", "--name", "equal-steps", "--save-model", str(tmp_path / "m.pt"))
    assert "classifier test accuracy" not in proc.stdout
    model, diffusion, meta = load_model(tmp_path / "m.pt")
    assert diffusion.prediction == "v" and meta["steps"] == 3 and model.config.base_channels == 8
    older, *rows, fixed = list(csv.DictReader(results.open()))
    assert (older["name"], older["fid"], older["recall"], older["interval"]) == ("older", "1.5", "", "")
    proc = budget("--model", str(tmp_path / "m.pt"), "--ddim-steps", "2", "--spacing", "uniform", "trailing",
                  "--name", "rescored")
    assert "train 25 min" not in proc.stderr  # no training (the default budget), only sampling
    rescored = list(csv.DictReader(results.open()))[len(rows) + 2:]
    assert [(r["name"], r["spacing"]) for r in rescored] == [("rescored", "uniform"), ("rescored", "trailing")]
    for r in rescored:  # the saved model's own training numbers
        assert [r[k] for k in ("steps", "minutes", "images_per_s")] == [fixed[k] for k in ("steps", "minutes",
                                                                                             "images_per_s")]
    assert rescored[0]["fid"] == fixed["fid"]  # the same model, sampler and seed as when it was trained
    assert rescored[1]["fid"] != fixed["fid"]
    budget("--model", str(tmp_path / "m.pt"), "--method", "dpmsolver", "--ddim-steps", "2", "--name", "solver")
    solver = list(csv.DictReader(results.open()))[-1]
    assert (solver["name"], solver["method"], solver["ddim_steps"]) == ("solver", "dpmsolver", "2")
    # DPM-Solver++(2M) with 2 steps is DDIM's 2 steps (up to float rounding)
    assert float(solver["fid"]) == pytest.approx(float(fixed["fid"]), rel=1e-3)
    # post-hoc EMA: params.yaml's 8 snapshots of each profile, spread over the 3 steps, the last at the end
    snapshots = safe_load(tmp_path / "m-posthoc.pt", ("snapshots",))["snapshots"]
    assert [(s["t"], s["sigma_rel"]) for s in snapshots] == [(t, w) for t in (1, 2, 3) for w in (0.05, 0.1)]
    budget("--model", str(tmp_path / "m.pt"), "--ddim-steps", "2", "--sigma-rel", "null", "0.05", "--name", "posthoc")
    fixed_ema, posthoc = list(csv.DictReader(results.open()))[-2:]
    assert (fixed_ema["sigma_rel"], posthoc["sigma_rel"]) == ("", "0.05")
    assert fixed_ema["fid"] == fixed["fid"] and posthoc["fid"] != fixed["fid"]  # other weights, the same samplers
    budget("--steps", "3", "--ddim-steps", "2", "--sigma-rel", "0.05", "--name", "posthoc-trained")
    assert list(csv.DictReader(results.open()))[-1]["fid"] == posthoc["fid"]  # the snapshots in memory, as saved
    budget("--model", str(tmp_path / "m.pt"), "--ddim-steps", "2", "--precision", "bf16", "--name", "bf16")
    assert (fixed["sample_precision"], list(csv.DictReader(results.open()))[-1]["sample_precision"]) == ("fp32", "bf16")
    shutil.copy(tmp_path / "m.pt", tmp_path / "lone.pt")
    bad = budget("--model", str(tmp_path / "lone.pt"), "--sigma-rel", "0.05", check=False)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == (
        f"error: --sigma-rel: {tmp_path / 'lone-posthoc.pt'}: no such file; --save-model keeps the post-hoc EMA "
        "snapshots beside the model")
    budget("--steps", "30", "--ddim-steps", "2", "--guidance", "0", "5", "--name", "cond",
           "--save-model", str(tmp_path / "cond.pt"), "-S", "train.lr=0.01")  # enough for the labels to matter
    cond = list(csv.DictReader(results.open()))[-2:]
    assert [(r["name"], r["guidance"], r["steps"]) for r in cond] == [("cond", "0.0", "30"), ("cond", "5.0", "30")]
    assert load_model(tmp_path / "cond.pt")[0].config.num_classes >= 2
    assert all(0 <= float(r["accuracy"]) <= 1 for r in cond)
    for interval in (("0", "1e-6"), ("0", "1e9")):  # no step's noise level in it; every step's
        budget("--model", str(tmp_path / "cond.pt"), "--ddim-steps", "2", "--guidance", "5", "--guidance-interval",
               *interval, "--name", "interval")
    nowhere, everywhere = list(csv.DictReader(results.open()))[-2:]
    assert (nowhere["interval"], everywhere["interval"]) == ("0 1e-06", "0 1e+09")
    assert (nowhere["fid"], everywhere["fid"]) == (cond[0]["fid"], cond[1]["fid"])  # unguided; guided throughout
    for model_file, extra in (("cond.pt", ()), ("m.pt", ("--guidance", "1"))):
        bad = budget("--model", str(tmp_path / model_file), *extra, "--ddim-steps", "2", check=False)
        assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == (
            f"error: {tmp_path / model_file}: a class-conditional model needs --guidance, an unconditional one "
            "takes none")
    assert len(list(csv.DictReader(results.open()))) == len(rows) + 13  # the refused runs wrote no row
    budget("--steps", "4", "--ddim-steps", "2", "--autoguidance", "0", "3", "--name", "auto",
           "--save-model", str(tmp_path / "auto.pt"), "-S", "train_uncond.guide_at=0.5", "-S", "train.lr=0.01")
    auto = list(csv.DictReader(results.open()))[-2:]
    assert [(r["name"], r["guidance"]) for r in auto] == [("auto", "0.0"), ("auto", "3.0")]
    assert auto[0]["fid"] != auto[1]["fid"]  # the guide reaches the sampler
    assert load_model(tmp_path / "auto-guide.pt")[2]["steps"] == 2  # the EMA weights halfway through 4 steps
    budget("--model", str(tmp_path / "auto.pt"), "--ddim-steps", "2", "--autoguidance", "3", "--name", "auto-again")
    assert list(csv.DictReader(results.open()))[-1]["fid"] == auto[1]["fid"]
    assert (fixed["name"], fixed["steps"], fixed["ddim_steps"], fixed["guidance"]) == ("equal-steps", "3", "2", "")
    assert 0 <= float(fixed["minutes"]) < 5 and float(fixed["images_per_s"]) > 0  # the time the 3 steps took
    assert [(r["name"], r["method"], int(r["ddim_steps"]), r["spacing"]) for r in rows] == [
        ("smoke", "ddim", 2, "uniform"), ("smoke", "ddim", 5, "uniform")]
    for r in rows:
        assert int(r["steps"]) >= 1 and float(r["images_per_s"]) > 0 and float(r["sample_s"]) >= 0
        fid, floor = float(r["fid"]), float(r["floor"])
        assert math.isfinite(fid) and fid > 0 and floor > 0  # kept to 5 significant digits, however small
        assert float(r["ratio"]) == pytest.approx(fid / floor, rel=1e-2)
        assert 0 <= float(r["recall"]) <= 1 and 0 <= float(r["precision"]) <= 1 and r["interval"] == ""
        assert r["accuracy"] == ""  # an unconditional model asks for no class
        assert "diffusion.prediction=v" in r["overrides"]
    assert rows[0]["steps"] == rows[1]["steps"]  # one training, sampled twice

    client = MlflowClient(f"sqlite:///{db}")
    budget_experiment = client.get_experiment_by_name("budget")
    assert budget_experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # a runs table in the UI
    experiment = budget_experiment.experiment_id

    def named(name: str) -> list:
        return [r for r in client.search_runs([experiment]) if r.data.params["name"] == name]
    guided = named("cond")
    assert sorted(r.info.run_name for r in guided) == ["cond: DDIM-2 η=0, w=0", "cond: DDIM-2 η=0, w=5"]
    assert sorted(r.data.params["guidance"] for r in guided) == ["0.0", "5.0"]
    assert sorted(r.data.metrics["accuracy"] for r in guided) == sorted(float(r["accuracy"]) for r in cond)
    grids = []
    for r in guided:
        (tmp_path / r.info.run_id).mkdir()
        grid = Image.open(client.download_artifacts(r.info.run_id, "samples.png", str(tmp_path / r.info.run_id)))
        grids.append(torch.tensor(np.asarray(grid), dtype=torch.float32))
    difference = (grids[0] - grids[1]).abs().mean()
    assert difference > 1, difference  # the guidance weight reaches the sampler (in 8-bit levels)
    runs = named("smoke")
    assert sorted(r.data.params["ddim_steps"] for r in runs) == ["2", "5"]
    posthoc_runs = named("posthoc")
    assert sorted(r.data.params.get("sigma_rel", "fixed") for r in posthoc_runs) == ["0.05", "fixed"]
    assert sorted(r.info.run_name for r in posthoc_runs) == ["posthoc: DDIM-2 η=0",
                                                             "posthoc: DDIM-2 η=0, EMA σ_rel=0.05"]
    fid_by_steps = {r["ddim_steps"]: float(r["fid"]) for r in rows}
    for mlrun in runs:
        assert mlrun.data.params["diffusion.prediction"] == "v" and mlrun.data.params["train.min_snr_gamma"] == "5.0"
        assert mlrun.data.params["method"] == "ddim"
        assert mlrun.data.metrics["fid"] == pytest.approx(fid_by_steps[mlrun.data.params["ddim_steps"]], abs=1e-3)
        assert 0 <= mlrun.data.metrics["recall"] <= 1
        assert [a.path for a in client.list_artifacts(mlrun.info.run_id)] == ["samples.png"]


@pytest.mark.parametrize("args, message", [
    (["-S", "diffusion.prediction=x0"], "diffusion.prediction = 'x0' is out of range"),
    (["-S", "train.lr"], "error: -S train.lr: expected KEY=VALUE, e.g. train.lr=1e-3"),
    (["--guidance", "1", "-0.5"], "error: --guidance -0.5 is out of range; allowed: a finite number >= 0"),
    (["--guidance", "inf"], "error: --guidance inf is out of range; allowed: a finite number >= 0"),
    (["--autoguidance", "1", "-S", "train_uncond.guide_at=0", "-S", "sample.autoguidance=[0]", "-S",
      "visualize.autoguidance=0"],
     "error: --autoguidance: the model needs a guide model; set -S train_uncond.guide_at=F"),
    (["--autoguidance", "1", "--guidance", "1"], "error: --autoguidance: the unconditional model's; the "
                                                 "class-conditional one takes --guidance"),
    (["--guidance", "1", "--guidance-interval", "3", "0.3"],
     "error: --guidance-interval 3 0.3 is out of range; allowed: [low, high] with 0 <= low < high"),
    (["--sigma-rel", "null", "0.5"],
     "error: --sigma-rel 0.5 is out of range; allowed: null (the fixed-decay EMA) or a number in (0, 0.2887)"),
    (["--sigma-rel", "0.05", "-S", "train.posthoc_sigma_rels=[]", "-S", "train.posthoc_snapshots=0"],
     "error: --sigma-rel: set -S train.posthoc_sigma_rels=[...] to keep the snapshots it needs"),
])
def test_budget_benchmark_refuses_bad_input_before_training(tmp_path, args, message):
    proc = run([sys.executable, "-m", "benchmarks.budget", "--results", str(tmp_path / "r.csv"), *args],
               cwd=ROOT, check=False, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert proc.returncode == 1 and "train " not in proc.stderr  # no training bar
    assert message in proc.stderr
    assert not (tmp_path / "r.csv").exists()


@pytest.mark.skipif(not MNIST_T10K.is_dir(), reason="needs shared/data/mnist-t10k beside the checkout")
def test_mnist_split_is_read_back_through_the_mnist_loading_path(tmp_path):
    out = tmp_path / "split"
    proc = run([sys.executable, "-m", "benchmarks.mnist_split", str(MNIST_T10K), str(out), "--train", "8000"],
               cwd=ROOT)
    assert "train: 8000 images" in proc.stdout and "t10k: 2000 images" in proc.stdout
    ds = load_dataset("mnist", root=out, raw_dir=tmp_path / "raw")
    source = read_idx(MNIST_T10K / "t10k-images-idx3-ubyte.gz")
    assert ds.train_images.shape == (8000, 1, 28, 28) and ds.test_images.shape == (2000, 1, 28, 28)
    assert torch.equal(ds.train_images[:, 0], source[:8000]) and torch.equal(ds.test_images[:, 0], source[8000:])
    assert ds.class_names == tuple("0123456789") and len(ds.train_labels.unique()) == 10

    bad = run([sys.executable, "-m", "benchmarks.mnist_split", str(MNIST_T10K), str(tmp_path / "bad"),
               "--train", "10000"], cwd=ROOT, check=False)
    assert bad.returncode != 0 and "--train must be in [1, 9999], got 10000" in bad.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_eval_table_scores_a_pipeline_model_as_the_evaluate_stage_did(tiny_repo):
    repo, _ = tiny_repo
    proc = run([sys.executable, str(ROOT / "benchmarks/eval_table.py"), "--model", "models/cond/model.pt",
                "--data", "data/prepared", "--classifier", "models/classifier/classifier.pt", "--num-samples", "40",
                "--steps", "5", "--dpmsolver-steps", "5", "--guidance", "1", "--no-ddpm", "--device", "cpu"], repo)
    header, *rows = proc.stdout.splitlines()[1:]
    assert header.split()[:3] == ["setting", "FID", "xfloor"]
    fid = {line[:20].strip(): float(line[20:].split()[0]) for line in rows}
    assert list(fid) == ["floor (real train)", "ddim5_eta0_w1", "dpmsolver5_w1"]
    # the same samples (seed, labels and sampler) as the committed repro's; an experiment in the
    # workspace (tiny_experiments) may have rewritten metrics/eval.json since
    ev = json.loads(run(["git", "show", "HEAD:metrics/eval.json"], repo).stdout)
    assert fid["floor (real train)"] == pytest.approx(ev["floor"]["classifier"]["fid"], abs=2e-3)
    for tag in ("ddim5_eta0_w1", "dpmsolver5_w1"):
        assert fid[tag] == pytest.approx(ev["cond"][tag]["fid"], abs=2e-3), tag


@pytest.mark.slow
def test_eval_table_scores_the_autoguided_unconditional_model_as_the_evaluate_stage_did(tiny_repo, tmp_path):
    repo, _ = tiny_repo
    table = [sys.executable, str(ROOT / "benchmarks/eval_table.py"), "--data", "data/prepared", "--classifier",
             "models/classifier/classifier.pt", "--num-samples", "40", "--no-ddpm", "--steps", "5",
             "--device", "cpu"]
    proc = run([*table, "--model", "models/uncond/model.pt", "--dpmsolver-steps", "5", "--autoguidance", "0", "1"],
               repo)
    fid = {line[:20].strip(): float(line[20:].split()[0]) for line in proc.stdout.splitlines()[2:]}
    assert list(fid) == ["floor (real train)", "ddim5_eta0", "ddim5_eta0_ag1", "dpmsolver5", "dpmsolver5_ag1"]
    ev = json.loads(run(["git", "show", "HEAD:metrics/eval.json"], repo).stdout)
    for tag in list(fid)[1:]:
        assert fid[tag] == pytest.approx(ev["uncond"][tag]["fid"], abs=2e-3), tag
    assert fid["dpmsolver5_ag1"] != fid["dpmsolver5"]  # the guide reaches the sampler

    # refused in one line, before any scoring: on the conditional model, without a guide model, negative
    lone = tmp_path / "model.pt"  # an unconditional model with no guide model beside it
    shutil.copy(repo / "models/uncond/model.pt", lone)
    for model, weights, words in (("models/cond/model.pt", ["1"], "--autoguidance needs an unconditional model"),
                                  (lone, ["1"], f"--autoguidance needs the guide model {tmp_path / 'model-guide.pt'}"),
                                  ("models/uncond/model.pt", ["-1"],
                                   "--autoguidance -1 is out of range; allowed: a finite number >= 0")):
        bad = run([*table, "--model", str(model), "--autoguidance", *weights], repo, check=False)
        assert bad.returncode == 2 and words in bad.stderr.splitlines()[-1] and not bad.stdout, bad.stderr
