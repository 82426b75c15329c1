"""The DVC pipeline end to end: real git, real DVC, the tiny config on the CPU."""

import csv
import io
import json

import pytest
import torch
import yaml
from helpers import ALL_STAGES, TINY, make_repo, merge, run, stages_run

from ddpm import Autoguided, generate, load_model

pytestmark = pytest.mark.slow


def test_repro_runs_every_stage_and_writes_every_output(tiny_repo):
    repo, output = tiny_repo
    assert stages_run(output) == ALL_STAGES
    for path in ["data/prepared/train.pt", "data/prepared/test.pt", "models/classifier/classifier.pt",
                 "models/uncond/model.pt", "models/uncond/model-guide.pt", "models/cond/model.pt",
                 "models/cond/grids/epoch_002.png",
                 "checkpoints/uncond/last.pt", "plots/loss_uncond.csv", "plots/fid_vs_steps.csv",
                 "plots/fid_vs_steps.png", "metrics/classifier.json", "metrics/train_uncond.json"]:
        assert (repo / path).is_file(), path
    assert not (repo / "models/cond/model-guide.pt").exists()  # guided by its own label-free prediction
    for variant, tags in [("uncond", ["ddim5_eta0", "ddim10_eta0", "ddim5_eta0_ag1", "ddim10_eta0_ag1"]),
                          ("cond", ["ddim5_eta0_w1", "ddim10_eta0_w1"])]:
        for tag in tags:
            data = torch.load(repo / f"samples/{variant}/ddim/{tag}.pt", weights_only=True)
            assert data["images"].shape == (40, 1, 28, 28) and data["images"].dtype == torch.uint8
            assert (repo / f"samples/{variant}/ddim/{tag}.png").is_file()


def test_dpmsolver_samples_are_those_of_generate(tiny_repo):
    repo, _ = tiny_repo
    model, diffusion, _ = load_model(repo / "models/uncond/model.pt")
    expected = generate(model, diffusion, 40, (1, 28, 28), seed=0, method="dpmsolver", steps=5)
    assert torch.equal(torch.load(repo / "samples/uncond/dpmsolver/dpmsolver5.pt", weights_only=True)["images"],
                       expected)
    setting, _ = json.loads((repo / "samples/uncond/dpmsolver/index.json").read_text())
    assert (setting["method"], setting["steps"], setting["spacing"]) == ("dpmsolver", 5, "uniform")


def test_autoguided_samples_are_those_of_the_model_guided_by_its_halfway_snapshot(tiny_repo):
    repo, _ = tiny_repo
    model, diffusion, meta = load_model(repo / "models/uncond/model.pt")
    guide, _, guide_meta = load_model(repo / "models/uncond/model-guide.pt")
    assert (meta["steps"], guide_meta["steps"]) == (12, 6)  # train_uncond.guide_at 0.5 of 12 steps
    expected = generate(Autoguided(model, guide, 1.0), diffusion, 40, (1, 28, 28), seed=0, method="dpmsolver", steps=5)
    samples = repo / "samples/uncond/dpmsolver"
    assert torch.equal(torch.load(samples / "dpmsolver5_ag1.pt", weights_only=True)["images"], expected)
    assert not torch.equal(torch.load(samples / "dpmsolver5.pt", weights_only=True)["images"], expected)
    index = json.loads((samples / "index.json").read_text())
    assert [(s["tag"], s["autoguidance"]) for s in index] == [("dpmsolver5", 0.0), ("dpmsolver5_ag1", 1.0)]


def test_prepared_data_matches_params(tiny_repo):
    repo, _ = tiny_repo
    info = json.loads((repo / "data/prepared/info.json").read_text())
    assert info["dataset"] == "glyphs" and info["train_count"] == 300 and info["test_count"] == 100
    assert info["train_histogram"] == [30] * 10
    assert len(info["content_hash"]) == 64


def test_training_metrics_and_loss_curve(tiny_repo):
    repo, _ = tiny_repo
    metrics = json.loads((repo / "metrics/train_cond.json").read_text())
    assert metrics["steps"] == 2 * 6  # 2 epochs of ceil(300 / 50) steps
    assert metrics["images_per_second"] > 0
    lines = (repo / "plots/loss_cond.csv").read_text().splitlines()
    assert lines[0] == "step,loss,lr"
    assert [int(line.split(",")[0]) for line in lines[1:]] == list(range(1, 13))


def test_trained_model_loads_and_is_conditional(tiny_repo):
    repo, _ = tiny_repo
    model, diffusion, meta = load_model(repo / "models/cond/model.pt")
    assert model.config.num_classes == 10 and diffusion.timesteps == 40
    assert meta["variant"] == "cond" and meta["steps"] == 12


def test_eval_metrics_cover_every_sampler(tiny_repo):
    repo, _ = tiny_repo
    ev = json.loads((repo / "metrics/eval.json").read_text())
    assert set(ev["uncond"]) == {"ddpm40", "ddim5_eta0", "ddim10_eta0", "dpmsolver5", "ddpm40_ag1", "ddim5_eta0_ag1",
                                 "ddim10_eta0_ag1", "dpmsolver5_ag1"}
    assert set(ev["cond"]) == {"ddpm40_w1", "ddim5_eta0_w1", "ddim10_eta0_w1", "dpmsolver5_w1"}
    for scores in [*ev["uncond"].values(), *ev["cond"].values()]:
        assert scores["fid"] >= 0 and scores["is_mean"] >= 1 - 1e-6
    assert 0 <= ev["cond"]["ddpm40_w1"]["cond_accuracy"] <= 1
    assert ev["protocol"]["num_real"] == 100 and ev["protocol"]["num_generated"] == 40
    # eval.csv: the network's precision while sampling beside precision/recall's precision, neither hiding the other
    table = list(csv.DictReader(io.StringIO(run(["git", "show", "HEAD:metrics/eval.csv"], repo).stdout)))
    assert len(table) == 12 and all(r["sample_precision"] == "fp32" and 0 <= float(r["precision"]) <= 1 for r in table)


def test_second_repro_runs_nothing(tiny_repo):
    """Nothing but init-from, which looks whether the model a train stage starts from changed outside DVC's view
    (here: none), and changes nothing."""
    repo, _ = tiny_repo
    proc = run(["dvc", "repro"], repo)
    assert stages_run(proc.stdout) == {"init-from"}
    assert json.loads(run(["dvc", "status", "--json"], repo).stdout) == {"init-from": ["always changed"]}


def test_changing_eta_reruns_only_the_ddim_stages_and_evaluation(tiny_experiments):
    assert stages_run(tiny_experiments["eta-half"]) == {"check", "init-from", "sample-ddim@uncond", "sample-ddim@cond",
                                                        "evaluate"}


SAMPLERS = ("ddpm", "ddim", "dpmsolver")
VARIANTS = ("uncond", "cond")


@pytest.mark.parametrize("section, key, value, changed", [
    ("sample", "guidance", [0.5, 1.0], {f"sample-{m}@cond" for m in SAMPLERS}),
    ("sample", "autoguidance", [0.5, 1.0], {f"sample-{m}@uncond" for m in SAMPLERS}),
    ("sample", "guidance_interval", [0.28, 5.42], {f"sample-{m}@cond" for m in SAMPLERS} | {"visualize"}),
    ("sample", "autoguidance_interval", [0.28, 5.42], {f"sample-{m}@uncond" for m in SAMPLERS} | {"visualize"}),
    ("sample", "precision", "bf16", {f"sample-{m}@{v}" for m in SAMPLERS for v in VARIANTS} | {"visualize"}),
    ("sample", "sigma_rel", [0.1], {f"sample-{m}@{v}" for m in SAMPLERS for v in VARIANTS}),
    ("visualize", "sigma_rel", 0.1, {"visualize"}),
    ("train_uncond", "guide_at", 0.25, {"train@uncond"}),
    ("train_cond", "p_uncond", 0.3, {"train@cond"}),
    ("train", "lr", 0.01, {"train@uncond", "train@cond"}),
])
def test_a_key_that_one_model_reads_changes_only_that_models_stages(tiny_repo, section, key, value, changed):
    repo, _ = tiny_repo
    params = repo / "params.yaml"
    original = params.read_text()
    try:
        params.write_text(yaml.safe_dump(merge(yaml.safe_load(original), {section: {key: value}})))
        status = json.loads(run(["dvc", "status", "--json"], repo).stdout)
    finally:
        params.write_text(original)
    assert set(status) == changed | {"check", "init-from"}, status  # init-from: always


def exp_params(repo, name: str) -> dict:
    """params.yaml of experiment `name`, as `dvc exp show` lists it."""
    for baseline in json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout):
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("name") == name:
                    return rev["data"]["params"]["params.yaml"]["data"]
    raise AssertionError(f"no experiment {name}")


def test_a_profile_switch_reruns_train_sample_evaluate_and_keeps_your_values(tiny_repo, tiny_experiments):
    repo, _ = tiny_repo
    output = tiny_experiments["gpu"]
    assert stages_run(output) == ALL_STAGES - {"prepare", "classifier"}  # reference: the standard protocol's
    # the tiny project's own values (params.yaml edited by hand) and the -S override beat the profile's
    assert "kept model.base_channels = 8" in output and "kept sample.spacing = 'quadratic'" in output
    params = exp_params(repo, "gpu")
    assert params["profile"] == "gpu" and params["model"]["num_res_blocks"] == 2 and params["train"]["lr"] == 0.001
    assert params["model"]["base_channels"] == 8 and params["sample"]["spacing"] == "quadratic"
    diff = run(["dvc", "metrics", "diff", "--json", "HEAD", "gpu"], repo).stdout
    changes = json.loads(diff)["metrics/eval_summary.json"]
    # the fast protocol's numbers and the standard protocol's are never compared: each has one side only
    assert "fast-40.uncond.ddpm.fid" in changes and "standard-40.cond.ddim.fid" in changes
    assert all(c["new"] is None for k, c in changes.items() if k.startswith("fast-40."))
    assert all(c["old"] is None for k, c in changes.items() if k.startswith("standard-40."))
    assert {k.split(".")[0] for k in changes} == {"fast-40", "standard-40"}


def test_a_sweep_over_post_hoc_ema_lengths_is_one_experiment_that_retrains_nothing(tiny_repo, tiny_experiments):
    """`dvc exp run -S sample.sigma_rel=[...]`: the sample stages reconstruct each length from the snapshots
    that training kept (model-posthoc.pt), evaluate scores each, and `dvc plots` draws FID over the length."""
    repo, _ = tiny_repo
    assert stages_run(tiny_experiments["ema-sweep"]) == {"check", "init-from", "evaluate",
                                                         *(f"sample-{m}@{v}" for m in SAMPLERS for v in VARIANTS)}
    rev = next(ref for ref in run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo).stdout.split()
               if ref.endswith("/ema-sweep"))  # where DVC keeps the experiment's commit
    rows = list(csv.DictReader(io.StringIO(run(["git", "show", f"{rev}:plots/fid_vs_ema.csv"], repo).stdout)))
    assert {(r["series"], r["sigma_rel"]) for r in rows} == {
        (series, w) for series in ("uncond DPM-Solver++(2M)-5", "uncond DPM-Solver++(2M)-5, autoguidance w=1",
                                   "cond DPM-Solver++(2M)-5, w=1") for w in ("0.05", "0.1")}
    assert all(float(r["fid"]) >= 0 for r in rows)
    plots = json.loads(run(["dvc", "plots", "diff", "ema-sweep", "--json", "--targets", "plots/fid_vs_ema.csv"],
                           repo).stdout)
    (plot,) = plots["data"]["plots/fid_vs_ema.csv"]  # what `dvc plots diff` draws: a point per set
    points = [v for v in plot["content"]["data"]["values"] if v["rev"] == "ema-sweep"]
    assert sorted((v["series"], float(v["sigma_rel"])) for v in points) == sorted(
        (r["series"], float(r["sigma_rel"])) for r in rows)
    # the baseline, with the fixed-decay EMA only, has no such sets: its plot is the header alone
    assert (repo / "plots/fid_vs_ema.csv").read_text().splitlines() == [
        "series,variant,method,steps,sigma_rel,fid,fid_over_floor,recall"]


def test_params_error_is_one_line_before_any_work(tmp_path):
    repo = make_repo(tmp_path / "bad", {**TINY, "train": {**TINY["train"], "lrr": 0.1}})
    proc = run(["dvc", "repro"], repo, check=False)
    assert proc.returncode != 0
    assert "unknown key 'train.lrr' (did you mean 'train.lr'?)" in proc.stdout + proc.stderr
    assert not (repo / "data/prepared").exists()


@pytest.mark.parametrize("command", [["dvc", "repro"], ["dvc", "exp", "run", "-S", "+train.lrr=0.001"]])
def test_an_unknown_key_that_no_stage_reads_stops_the_next_run(tiny_repo, command):
    repo, _ = tiny_repo
    params = repo / "params.yaml"
    original = params.read_text()
    try:
        if command[1] == "repro":  # a hand edit
            params.write_text(yaml.safe_dump(merge(yaml.safe_load(original), {"sample": {"num_sampels": 10}})))
        proc = run(command, repo, check=False)
    finally:
        params.write_text(original)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert ("unknown key 'sample.num_sampels' (did you mean 'sample.num_samples'?)" in out
            or "unknown key 'train.lrr' (did you mean 'train.lr'?)" in out), out[-2000:]
    assert stages_run(out) == {"check"}


def test_missing_dataset_offline_is_a_clear_error(tmp_path):
    repo = make_repo(tmp_path / "nodata", {**TINY, "data": {"name": "mnist", "root": str(tmp_path / "nowhere")}})
    offline = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}  # refused at once
    proc = run(["python", "-m", "stages.prepare", "data/prepared"], repo, check=False, env=offline)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(err) == 1 and err[0].startswith("error:"), proc.stderr
    assert "mnist" in err[0] and "data/raw/mnist" in err[0]
    assert not (repo / "data/prepared").exists()


def metric_leaves(tree) -> list:
    return [v for x in tree.values() for v in metric_leaves(x)] if isinstance(tree, dict) else [tree]


def test_dvc_metrics_are_a_screen_wide_and_the_details_have_every_setting(tiny_repo):
    repo, _ = tiny_repo
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    files = {path: entry["data"] for path, entry in shown[""]["data"].items()}
    assert set(files) == {"metrics/classifier.json", "metrics/train_uncond.json", "metrics/train_cond.json",
                          "metrics/eval_summary.json"}
    assert len(metric_leaves(files)) <= 30, metric_leaves(files)
    (key, summary), = files["metrics/eval_summary.json"].items()
    assert key == "fast-40" and summary["inception"] == "unavailable (offline)"  # tests/conftest.py: offline
    assert set(summary) == {"uncond", "cond", "floor", "inception"} and set(summary["cond"]) == {
        "best", "fid", "fid_over_floor", "is_mean", "cond_accuracy", "ddpm", "ddim", "dpmsolver"}
    details = json.loads((repo / "metrics/eval.json").read_text())
    table = (repo / "metrics/eval.csv").read_text().splitlines()
    for variant in ("uncond", "cond"):
        index = [json.loads((repo / f"samples/{variant}/{m}/index.json").read_text()) for m in SAMPLERS]
        tags = {s["tag"] for sets in index for s in sets}
        assert set(details[variant]) == tags and summary[variant]["best"] in tags
        assert {line.split(",")[1] for line in table if line.startswith(f"{variant},")} == tags
        assert summary[variant]["fid"] == pytest.approx(min(e["fid"] for e in details[variant].values()), rel=1e-5)


def test_dvc_plots_draw_one_line_per_model_sampler_and_guidance_weight(tiny_repo, tmp_path):
    repo, _ = tiny_repo
    shown = json.loads(run(["dvc", "plots", "show", "--json", "-o", str(tmp_path)], repo).stdout)["data"]

    def series(plot_id: str) -> dict[str, list]:
        (plot,) = shown[plot_id]
        assert plot["content"]["encoding"]["color"]["field"] == "series"
        out = {}
        for point in plot["content"]["data"]["values"]:
            out.setdefault(point["series"], []).append(float(point[plot["content"]["encoding"]["x"]["field"]]))
        return out

    eta = yaml.safe_load((repo / "params.yaml").read_text())["sample"]["eta"][0]  # an experiment may have set it
    steps = series("plots/fid_vs_steps.csv")  # TINY: ddim steps 5 and 10, dpmsolver 5; autoguidance 0, 1; w 1
    assert steps == {"uncond DDPM": [40.0], "uncond DDPM, autoguidance w=1": [40.0],
                     f"uncond DDIM η={eta:g}": [5.0, 10.0], f"uncond DDIM η={eta:g}, autoguidance w=1": [5.0, 10.0],
                     "uncond DPM-Solver++(2M)": [5.0], "uncond DPM-Solver++(2M), autoguidance w=1": [5.0],
                     "cond DDPM, w=1": [40.0], f"cond DDIM η={eta:g}, w=1": [5.0, 10.0],
                     "cond DPM-Solver++(2M), w=1": [5.0]}
    accuracy = series("Conditional model, conditional accuracy vs guidance weight w")
    assert accuracy == {"DDPM-40": [1.0], f"DDIM-5 η={eta:g}": [1.0], f"DDIM-10 η={eta:g}": [1.0],
                        "DPM-Solver++(2M)-5": [1.0]}
    assert {"plots/fid_vs_steps.png", "plots/cfg_tradeoff.png"} <= set(shown)


def test_the_models_are_dvc_artifacts_that_a_version_tag_registers(tiny_repo, tmp_path):
    """dvc.yaml's artifacts: a Git tag NAME@vX.Y.Z (as `gto register` writes) makes `dvc artifacts get` fetch it."""
    import dvc.api

    repo, _ = tiny_repo
    head = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    tags = ["ddpm-uncond@v0.1.0", "ddpm-cond@v0.1.0"]
    try:
        for tag in tags:
            run(["git", "tag", "-a", tag, "-m", "registered"], repo)
        for name, path in (("ddpm-uncond", "models/uncond"), ("ddpm-cond", "models/cond")):
            run(["dvc", "artifacts", "get", ".", name, "-o", str(tmp_path / name)], repo)
            assert (tmp_path / name / "model.pt").read_bytes() == (repo / path / "model.pt").read_bytes()
            assert dvc.api.artifacts_show(name, repo=str(repo)) == {"rev": head, "path": path}
        assert (tmp_path / "ddpm-uncond/model-guide.pt").is_file()  # autoguidance needs it
    finally:
        run(["git", "tag", "-d", *tags], repo, check=False)
