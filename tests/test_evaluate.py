"""Evaluation on real MNIST digits: the floor, sensitivity to corruption, IS, conditional accuracy,
agreement with torch-fidelity, and the reference + evaluate stages on a small workspace."""

import csv
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch_fidelity
import yaml
from mlflow.tracking import MlflowClient
from torchvision.transforms.functional import gaussian_blur

from ddpm import SamplerSetting, atomic_save, safe_load
from ddpm.classifier import Classifier, ClassifierConfig, accuracy, train_classifier
from ddpm.data import read_idx
from ddpm.metrics import (
    EXTRACTOR_NAME,
    PRC_BATCH_SIZE,
    Scorer,
    UInt8Dataset,
    conditional_accuracy,
    extract_features,
    make_extractor,
    metrics_from_features,
    reference_features,
)
from stages import evaluate, reference
from stages.pipeline import protocol
from stages.pipeline.results import sampler_tags
from stages.pipeline.run import run

ROOT = Path(__file__).resolve().parents[1]
MNIST = Path(__file__).resolve().parents[2] / "shared/data/mnist-t10k"
pytestmark = pytest.mark.skipif(not MNIST.is_dir(), reason=f"real MNIST test split not at {MNIST}")
TRAIN, HELD, REF = slice(0, 3000), slice(3000, 6000), slice(6000, 8000)  # classifier's, held out, reference


def corrupt(images: torch.Tensor, noise: float = 0.0, blur: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Gaussian pixel noise of std `noise` (in 0..255 units) and/or a Gaussian blur of std `blur` pixels."""
    x = images.float()
    if blur:
        k = 2 * round(3 * blur) + 1
        x = gaussian_blur(x, [k, k], [blur, blur])
    if noise:
        x = x + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return x.round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def mnist() -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(MNIST / "t10k-images-idx3-ubyte.gz").unsqueeze(1)  # (10000, 1, 28, 28) uint8
    return images, read_idx(MNIST / "t10k-labels-idx1-ubyte.gz").long()


@pytest.fixture(scope="module")
def classifier(mnist) -> Classifier:
    images, labels = mnist
    torch.manual_seed(0)
    model = Classifier(ClassifierConfig(width=8, feature_dim=32))
    train_classifier(model, images[TRAIN], labels[TRAIN], epochs=2, lr=1e-2, batch_size=50, seed=0, progress=False)
    return model.eval()


@pytest.fixture(scope="module")
def extractor(classifier):
    return make_extractor("classifier", classifier=classifier)


@pytest.fixture(scope="module")
def ref(mnist, extractor) -> dict:
    """Reference: 2000 held-out digits; floor: 500 digits the classifier was trained on (as in the pipeline)."""
    images, labels = mnist
    return reference_features(extractor, (images[REF], labels[REF]), (images[:500], labels[:500]))


def fid_kid(extractor, images, ref) -> tuple[float, float]:
    m = metrics_from_features(extract_features(extractor, images), ref["reference"], metrics=("fid", "kid"),
                              kid_subsets=20)
    return m["fid"], m["kid_mean"]


def test_another_real_subset_scores_near_the_floor_and_the_reference_itself_zero(mnist, extractor, ref):
    images, _ = mnist
    floor = metrics_from_features(ref["floor"], ref["reference"], metrics=("fid",))["fid"]
    other = fid_kid(extractor, images[HELD][:500], ref)[0]
    itself = metrics_from_features(ref["reference"], ref["reference"], metrics=("fid",))["fid"]
    mildly_noisy = fid_kid(extractor, corrupt(images[HELD][:500], noise=32), ref)[0]
    assert 0.5 < other / floor < 2, (other, floor)
    assert abs(itself) < 1e-6 * floor
    assert mildly_noisy > 5 * max(floor, other)


@pytest.mark.parametrize("kind, levels", [("noise", (16, 32, 64, 128)), ("blur", (0.5, 1.0, 1.5, 2.5))])
def test_fid_and_kid_rise_with_corruption(mnist, extractor, ref, kind, levels):
    clean = mnist[0][HELD][:500]
    scores = [fid_kid(extractor, clean, ref)] + [fid_kid(extractor, corrupt(clean, **{kind: s}), ref) for s in levels]
    fids, kids = zip(*scores)
    assert list(fids) == sorted(fids) and len(set(fids)) == len(fids), fids
    assert list(kids) == sorted(kids) and len(set(kids)) == len(kids), kids


def test_inception_score_of_one_class_is_one_and_of_the_balanced_test_set_high(mnist, extractor):
    images, labels = mnist
    ones = images[REF][labels[REF] == 1]
    one_class = metrics_from_features(extract_features(extractor, ones), metrics=("isc",))["is_mean"]
    balanced = metrics_from_features(extract_features(extractor, images[REF]), metrics=("isc",))["is_mean"]
    assert one_class == pytest.approx(1.0, abs=0.1)
    assert balanced > 5  # at most 10 with 10 balanced classes


def test_conditional_accuracy_of_real_labelled_digits_is_the_classifier_test_accuracy(mnist, classifier, extractor,
                                                                                     ref):
    images, labels = mnist
    test_accuracy = accuracy(classifier, images[REF], labels[REF])
    scorer = Scorer({"classifier": extractor}, {"classifier": ref})
    assert scorer.floor["classifier"]["cond_accuracy"] == pytest.approx(test_accuracy)
    held, held_labels = images[HELD][:300], labels[HELD][:300]
    scores = scorer(held, held_labels)["classifier"]
    assert scores["cond_accuracy"] == pytest.approx(accuracy(classifier, held, held_labels))
    assert scores["cond_accuracy"] == pytest.approx(conditional_accuracy(classifier, held, held_labels)[0])
    assert 0.9 < test_accuracy < 1


def test_metrics_from_stored_features_equal_torch_fidelity_on_the_images(mnist, classifier, extractor, ref, tmp_path):
    images, _ = mnist
    generated = corrupt(images[HELD][:300], noise=24)
    atomic_save(ref, tmp_path / "reference.pt")
    stored = safe_load(tmp_path / "reference.pt")
    ours = metrics_from_features(extract_features(extractor, generated), stored["reference"], kid_subset_size=300,
                                 seed=7)
    direct = torch_fidelity.calculate_metrics(
        input1=UInt8Dataset(generated), input2=UInt8Dataset(images[REF]), fid=True, isc=True, kid=True, prc=True,
        kid_subset_size=300, prc_batch_size=PRC_BATCH_SIZE, rng_seed=7, feature_extractor=EXTRACTOR_NAME,
        feature_extractor_classifier=classifier, cuda=False, cache=False, save_cpu_ram=True, verbose=False)
    keys = {"fid": "FID", "is_mean": "ISC_MEAN", "is_std": "ISC_STD", "kid_mean": "KID_MEAN", "kid_std": "KID_STD",
            "precision": "PRECISION", "recall": "RECALL", "f_score": "F_SCORE"}
    assert set(ours) == set(keys)
    for key, name in keys.items():
        theirs = getattr(torch_fidelity, f"KEY_METRIC_{name}")
        assert ours[key] == pytest.approx(direct[theirs], rel=1e-5), key


# The reference and evaluate stages on a small workspace: 3000 training digits, a 1000-digit test split,
# and "samples" that are held-out digits with noise (less noise for more steps), 200 per set.
N = 200
SETS = {("uncond", "ddpm"): [("ddpm1000", 1000, 1.0, 0.0, 8)],
        ("uncond", "ddim"): [("ddim5_eta0", 5, 0.0, 0.0, 48), ("ddim10_eta0", 10, 0.0, 0.0, 24)],
        ("cond", "ddpm"): [("ddpm1000_w1", 1000, 1.0, 1.0, 8), ("ddpm1000_w3", 1000, 1.0, 3.0, 16)],
        ("cond", "ddim"): [("ddim5_eta0_w1", 5, 0.0, 1.0, 48), ("ddim5_eta0_w3", 5, 0.0, 3.0, 40)]}


OUTPUTS = {"--metrics": "metrics/eval_summary.json", "--details": "metrics/eval.json", "--table": "metrics/eval.csv",
           "--plot": "plots/fid_vs_steps.csv", "--figure": "plots/fid_vs_steps.png",
           "--cfg-plot": "plots/cfg_tradeoff.csv", "--cfg-figure": "plots/cfg_tradeoff.png",
           "--ema-plot": "plots/fid_vs_ema.csv"}


def make_workspace(root: Path, mnist, classifier, extractors=("classifier",), protocol="fast", n=N, sets=None,
                   train=TRAIN, test=slice(6000, 7000)) -> list[str]:
    """Prepared data, classifier, sample sets (`sets`, default SETS, of `n` images each) and params.yaml in `root`;
    returns evaluate's argv."""
    images, labels = mnist
    sets = sets or SETS
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update(device="cpu", seed=0)
    params["sample"]["num_samples"] = n
    params["evaluate"].update(extractors=list(extractors), protocol=protocol)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())  # MLflow's parent run is keyed on it
    info = {"dataset": "mnist", "class_names": [str(c) for c in range(10)], "content_hash": "0" * 64}
    atomic_save({"images": images[train], "labels": labels[train]}, root / "data/prepared/train.pt")
    atomic_save({"images": images[test], "labels": labels[test]}, root / "data/prepared/test.pt")
    (root / "data/prepared/info.json").write_text(json.dumps(info))
    atomic_save({"config": dataclasses.asdict(classifier.config), "weights": classifier.state_dict()},
                root / "models/classifier.pt")
    for (variant, method), settings in sets.items():
        folder, index = root / "samples" / variant / method, []
        for tag, steps, eta, w, noise in settings:
            held = slice(3000 + 10 * len(index), 3000 + 10 * len(index) + n)
            atomic_save({"images": corrupt(images[held], noise=noise, seed=len(index)),
                         "labels": labels[held] if variant == "cond" else torch.zeros(0, dtype=torch.long)},
                        folder / f"{tag}.pt")
            setting = SamplerSetting(method, steps, eta, cfg=w if variant == "cond" else None)
            assert setting.tag == tag
            index.append({**setting.to_dict(), "variant": variant, "num_samples": n, "seed": 0})
        (folder / "index.json").write_text(json.dumps(index))
    return ["--data", "data/prepared", "--classifier", "models/classifier.pt", "--reference", "data/reference",
            *[a for flag, path in OUTPUTS.items() for a in (flag, path)],
            *[f"samples/{v}/{m}" for v, m in sets]]


REFERENCE_ARGV = ["--data", "data/prepared", "--classifier", "models/classifier.pt", "--out", "data/reference"]


@pytest.fixture(scope="module")
def workspace(mnist, classifier, tmp_path_factory) -> Path:
    """The workspace after the reference and evaluate stages, tracked in a SQLite MLflow store of its own."""
    root = tmp_path_factory.mktemp("evaluate")
    argv = make_workspace(root, mnist, classifier)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.delenv("DDPM_TRACKING", raising=False)
        reference.main(REFERENCE_ARGV)
        evaluate.main(argv)
    return root


def test_the_fast_reference_holds_the_test_split_and_the_floor_is_a_balanced_train_subset_of_n(workspace):
    ref = safe_load(workspace / "data/reference/classifier.pt")
    assert ref["reference"]["features"].shape == (1000, 32) and ref["reference"]["logits"].shape == (1000, 10)
    assert ref["num_real"] == 1000 and ref["stats"]["sigma"].shape == (32, 32)
    assert ref["extractor"] == "classifier" and ref["reference_split"] == "test" and ref["protocol"] == "fast"
    assert json.loads((workspace / "data/reference/extractors.json").read_text()) == {
        "extractors": ["classifier"], "inception": "off"}
    protocol = json.loads((workspace / "metrics/eval.json").read_text())["protocol"]
    assert protocol["floor_split"] == "train" and protocol["num_floor"] == N


def test_eval_json_puts_every_number_next_to_its_floor_and_protocol(workspace):
    ev = json.loads((workspace / "metrics/eval.json").read_text())
    assert set(ev) == {"uncond", "cond", "floor", "protocol"}
    assert set(ev["floor"]) == {"classifier"}
    floor = ev["floor"]["classifier"]
    assert set(floor) == {"fid", "is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall", "f_score",
                          "cond_accuracy"}
    for variant, sets in SETS.items():
        for tag, *_ in sets:
            entry = ev[variant[0]][tag]
            assert entry["fid_over_floor"] == pytest.approx(entry["fid"] / floor["fid"])
            assert {"is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall"} <= set(entry)
    assert ev["uncond"]["ddim10_eta0"]["fid"] < ev["uncond"]["ddim5_eta0"]["fid"]  # less noise, better FID
    ddpm = ev["cond"]["ddpm1000_w1"]
    assert ddpm["cond_accuracy"] > 0.8 and set(ddpm["cond_accuracy_per_class"]) == {str(c) for c in range(10)}
    assert "cond_accuracy" not in ev["uncond"]["ddpm1000"]
    protocol = ev["protocol"]
    assert protocol["num_real"] == 1000 and protocol["num_generated"] == N and protocol["num_floor"] == N
    assert protocol["extractors"] == ["classifier"] and protocol["reference_split"] == "test"
    assert protocol["name"] == "fast" and protocol["key"] == "fast-200" and protocol["inception"] == "off"
    assert protocol["kid_subset_size"] == N
    assert protocol["samplers"]["cond"]["ddim5_eta0_w3"] == {
        "method": "ddim", "steps": 5, "eta": 0.0, "spacing": "uniform", "cfg": 3.0, "autoguidance": 0.0,
        "interval": None, "sigma_rel": None, "tag": "ddim5_eta0_w3", "seed": 0, "num_samples": N}


def test_plots_fid_vs_steps_and_the_guidance_tradeoff(workspace):
    fid = list(csv.DictReader((workspace / "plots/fid_vs_steps.csv").open()))
    assert list(fid[0]) == ["series", "variant", "method", "steps", "eta", "cfg", "autoguidance", "fid",
                            "fid_over_floor"] and len(fid) == 7
    assert [(r["series"], r["steps"]) for r in fid] == [
        ("cond DDIM η=0, w=1", "5"), ("cond DDIM η=0, w=3", "5"), ("cond DDPM, w=1", "1000"),
        ("cond DDPM, w=3", "1000"),
        ("uncond DDIM η=0", "5"), ("uncond DDIM η=0", "10"), ("uncond DDPM", "1000")]
    cfg = list(csv.DictReader((workspace / "plots/cfg_tradeoff.csv").open()))
    assert list(cfg[0]) == ["series", "method", "steps", "eta", "cfg", "fid", "is_mean", "cond_accuracy"]
    assert [(r["series"], r["cfg"]) for r in cfg] == [("DDIM-5 η=0", "1"), ("DDIM-5 η=0", "3"), ("DDPM-1000", "1"),
                                                       ("DDPM-1000", "3")]
    assert all((workspace / f"plots/{name}.png").stat().st_size > 10_000 for name in ("fid_vs_steps", "cfg_tradeoff"))


def test_mlflow_run_carries_the_protocol_and_the_floor(workspace):
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    (run_,) = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id], "tags.stage = 'evaluate'")
    tags, metrics = run_.data.tags, run_.data.metrics
    assert tags["protocol.extractors"] == "classifier" and tags["protocol.num_real"] == "1000"
    assert (tags["protocol.name"], tags["protocol.key"], tags["protocol.inception"]) == ("fast", "fast-200", "off")
    assert tags["sampler.cond.ddim5_eta0_w3"] == ("method=ddim steps=5 eta=0.0 spacing=uniform cfg=3.0 "
                                                  "autoguidance=0.0 tag=ddim5_eta0_w3 seed=0 "
                                                  "num_samples=200")
    assert run_.data.params["evaluate.extractors"] == '["classifier"]'
    # the headline as metrics, at most a screen of them; every number as one JSON artifact
    assert {"fast-200.floor.fid", "fast-200.cond.fid_over_floor", "fast-200.cond.ddpm.fid",
            "fast-200.uncond.ddim.fid"} <= set(metrics)
    assert all(k.startswith("fast-200.") for k in metrics) and len(metrics) <= 25, sorted(metrics)
    parent = client.get_run(tags["mlflow.parentRunId"]).data.metrics
    assert parent["fast-200.floor.fid"] == metrics["fast-200.floor.fid"]
    full = json.loads((workspace / "metrics/eval.json").read_text())
    assert "eval.json" in {a.path for a in client.list_artifacts(run_.info.run_id)}
    assert metrics["fast-200.cond.fid"] == pytest.approx(min(e["fid"] for e in full["cond"].values()), rel=1e-5)


def test_sampler_tags_name_the_fields_a_setting_sets():
    guided = SamplerSetting("ddim", 50, 0.0, "trailing", 0.75, interval=(0.28, 5.42)).to_dict()
    plain = SamplerSetting("dpmsolver", 20).to_dict()
    tags = sampler_tags({"num_real": 1000, "samplers": {"cond": {guided["tag"]: guided},
                                                        "uncond": {plain["tag"]: plain}}})
    assert tags == {"protocol.num_real": 1000,
                    "sampler.cond.ddim50_eta0_w0.75_gi0.28-5.42": "method=ddim steps=50 eta=0.0 spacing=trailing "
                    "cfg=0.75 autoguidance=0.0 interval=0.28,5.42 tag=ddim50_eta0_w0.75_gi0.28-5.42",
                    "sampler.uncond.dpmsolver20": "method=dpmsolver steps=20 eta=0.0 spacing=uniform "
                    "autoguidance=0.0 tag=dpmsolver20"}


SMALL = {("uncond", "ddim"): [("ddim5_eta0", 5, 0.0, 0.0, 48)], ("cond", "ddim"): [("ddim5_eta0_w1", 5, 0.0, 1.0, 16)]}


def small_run(root: Path, mnist, classifier, monkeypatch, n: int = 40, tests: int = 100, sets=SMALL) -> dict:
    """Reference and evaluate with both extractors, `n` images a set, `tests` test digits; the headline."""
    (root / "ws").mkdir()
    argv = make_workspace(root / "ws", mnist, classifier, extractors=("classifier", "inception"), n=n, sets=sets,
                          test=slice(6000, 6000 + tests))
    monkeypatch.chdir(root / "ws")
    monkeypatch.setenv("DDPM_TRACKING", "off")
    monkeypatch.setenv("TORCH_HOME", str(root / "torch"))
    reference.main(REFERENCE_ARGV)
    evaluate.main(argv)
    return json.loads(Path("metrics/eval_summary.json").read_text())[f"fast-{n}"]


def test_offline_the_stages_go_on_with_the_classifier_and_say_why(mnist, classifier, tmp_path, monkeypatch, capsys):
    connect = socket.socket.connect

    def local_only(sock, address):
        assert address[0] == "127.0.0.1", f"tried to connect to {address}"
        return connect(sock, address)
    monkeypatch.setattr(socket.socket, "connect", local_only)
    summary = small_run(tmp_path, mnist, classifier, monkeypatch)  # tests/conftest.py: a refused download URL
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("inception:")]
    assert len(said) == 2 and all(line.startswith("inception: unavailable (offline): http://127.0.0.1:9/")
                                  for line in said), said  # once per stage
    assert summary["inception"] == "unavailable (offline)" and "inception" not in summary["cond"]
    ev = json.loads((tmp_path / "ws/metrics/eval.json").read_text())
    assert ev["protocol"]["extractors"] == ["classifier"] and ev["protocol"]["inception"] == "unavailable (offline)"
    assert not (tmp_path / "torch").exists()


@pytest.mark.slow  # Inception-v3 on a CPU and a 2048 x 2048 FID twice: about half a minute
def test_with_the_weights_downloadable_inception_numbers_stand_beside_the_classifiers(mnist, classifier, tmp_path,
                                                                                       weights_server, monkeypatch):
    server = weights_server
    monkeypatch.setenv("DDPM_INCEPTION_URL", server.url("inception-random.pth"))
    monkeypatch.setenv("DDPM_INCEPTION_SHA256", server.digest)
    one_set = {("cond", "ddim"): SMALL[("cond", "ddim")]}  # each Inception FID: a 2048 x 2048 eigenproblem
    summary = small_run(tmp_path, mnist, classifier, monkeypatch, n=10, tests=10, sets=one_set)
    assert server.requests == ["/inception-random.pth"]  # downloaded once, by the reference stage
    ev = json.loads((tmp_path / "ws/metrics/eval.json").read_text())
    assert ev["protocol"]["extractors"] == ["classifier", "inception"] and summary["inception"] == "available"
    inception = ev["cond"]["ddim5_eta0_w1"]["inception"]
    assert inception["fid"] > 0 and inception["is_mean"] >= 1 - 1e-6 and "precision" in inception
    assert summary["cond"]["inception"] == {"best": "ddim5_eta0_w1", "fid": pytest.approx(inception["fid"], rel=1e-5),
                                            "is_mean": pytest.approx(inception["is_mean"], rel=1e-5)}
    assert ev["cond"]["ddim5_eta0_w1"]["fid"] != inception["fid"]  # the classifier's FID beside it
    assert summary["floor"]["inception"]["fid"] == pytest.approx(ev["floor"]["inception"]["fid"], rel=1e-5)
    ref = safe_load(tmp_path / "ws/data/reference/inception.pt")
    assert ref["reference"]["features"].shape == (10, 2048) and ref["stats"]["sigma"].shape == (2048, 2048)


def test_a_sweep_list_reruns_only_sampling_and_evaluation():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        sweep = ("sample", "sample.ddim_steps", "sample.eta", "sample.guidance")
        reads_sweep = any(str(p) in sweep for p in stage.get("params", []))
        assert reads_sweep == (name == "sample"), name  # evaluate sees the sweep only through the sample folders


def test_a_weights_param_that_carries_code_stops_the_reference_stage_before_any_work(mnist, classifier, tmp_path,
                                                                                    monkeypatch, capsys):
    """evaluate.inception_weights names a file the stage reads as plain tensors: a pickle never runs."""
    from test_metrics import Shell

    marker, weights = tmp_path / "pwned", tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048), "payload": Shell(marker)}, weights)
    monkeypatch.setenv("DDPM_TRACKING", "off")
    (tmp_path / "ws").mkdir()
    make_workspace(tmp_path / "ws", mnist, classifier, extractors=("classifier", "inception"))
    params = yaml.safe_load((tmp_path / "ws/params.yaml").read_text())
    params["evaluate"]["inception_weights"] = str(weights)
    (tmp_path / "ws/params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path / "ws")
    monkeypatch.setattr(sys, "argv", ["reference", "--data", "data/prepared", "--classifier", "models/classifier.pt",
                                      "--out", "data/reference"])
    with pytest.raises(SystemExit) as stop:
        run(reference.main)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: {weights}: refused")
    assert err[0].endswith("(params.yaml: evaluate.inception_weights)")
    assert not marker.exists() and not (tmp_path / "ws/data/reference").exists()


def leaves(tree) -> list:
    return [v for x in tree.values() for v in leaves(x)] if isinstance(tree, dict) else [tree]


def test_the_metrics_file_is_the_headline_and_every_number_is_in_the_details_and_the_table(workspace):
    ev = json.loads((workspace / "metrics/eval.json").read_text())
    (key, summary), = json.loads((workspace / "metrics/eval_summary.json").read_text()).items()
    assert key == "fast-200" and summary["inception"] == "off"  # numbers of another protocol or N: another key
    for variant in ("uncond", "cond"):
        best = min(ev[variant], key=lambda tag: ev[variant][tag]["fid"])
        assert summary[variant]["best"] == best
        assert summary[variant]["fid_over_floor"] == pytest.approx(ev[variant][best]["fid_over_floor"], rel=1e-5)
        assert summary[variant]["is_mean"] == pytest.approx(ev[variant][best]["is_mean"], rel=1e-5)
        for method in ("ddpm", "ddim"):
            fids = [e["fid"] for tag, e in ev[variant].items() if tag.startswith(method)]
            assert summary[variant][method] == {"fid": pytest.approx(min(fids), rel=1e-5)}
        assert "dpmsolver" not in summary[variant]  # no DPM-Solver sample sets here
    assert summary["cond"]["cond_accuracy"] == pytest.approx(ev["cond"][summary["cond"]["best"]]["cond_accuracy"])
    assert "cond_accuracy" not in summary["uncond"]
    assert summary["floor"] == {"fid": pytest.approx(ev["floor"]["classifier"]["fid"], rel=1e-5)}
    assert len(leaves(summary)) == 7 + 6 + 1 + 1 and sum(isinstance(v, str) for v in leaves(summary)) == 3
    table = list(csv.DictReader((workspace / "metrics/eval.csv").open()))
    assert [(r["variant"], r["tag"]) for r in table] == [(v, tag) for (v, _), sets in SETS.items() for tag, *_ in sets]
    for r in table:
        assert float(r["fid"]) == pytest.approx(ev[r["variant"]][r["tag"]]["fid"], rel=1e-5)
        uncond = r["variant"] == "uncond"
        assert (r["cond_accuracy"] == "") == uncond and (r["cfg"] == "") == uncond


@pytest.mark.parametrize("failing", ["figure", "mlflow"])
def test_a_failure_before_the_end_leaves_the_previous_outputs_as_they_were(mnist, classifier, workspace, tmp_path,
                                                                            monkeypatch, failing):
    """A figure that cannot be drawn, or an MLflow store that fails while the artifacts are logged: no new
    output appears (neither beside old ones nor where there were none), and no temporary is left."""
    from stages.pipeline import results
    from stages.pipeline.tracking import Tracker

    root = tmp_path / "ws"
    shutil.copytree(workspace, root, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    monkeypatch.chdir(root)
    for gone in ("metrics/eval.csv", "plots/cfg_tradeoff.png"):  # outputs of no earlier run
        (root / gone).unlink()
    before = {path: (root / path).read_bytes() if (root / path).exists() else None for path in OUTPUTS.values()}

    def fail(*args, **kwargs):
        raise OSError(f"{failing} failed")
    if failing == "figure":
        monkeypatch.setenv("DDPM_TRACKING", "off")
        monkeypatch.setattr(results, "save_figure", fail)  # evaluate's figures are drawn there
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        monkeypatch.setattr(Tracker, "log_artifact", fail)
    with pytest.raises(OSError, match=f"{failing} failed"):
        evaluate.main(make_workspace(root, mnist, classifier))
    after = {path: (root / path).read_bytes() if (root / path).exists() else None for path in OUTPUTS.values()}
    assert after == before
    assert not [p for p in root.rglob("*") if ".tmp" in p.name]


# The evaluate stage paused between the renames that put its outputs in place (after the first), for PAUSE
# seconds, so that a signal lands there.
PAUSED_EVALUATE = """
import os, sys, time
from pathlib import Path
from stages import evaluate
from stages.pipeline.run import run
real, moved = os.replace, []
def replace(src, dst):
    real(src, dst)
    if Path(src).parent.name.startswith(".evaluate.tmp") and not Path(dst).parent.name.startswith(".evaluate.tmp"):
        moved.append(dst)
        if len(moved) == 1:
            Path("moving").touch()
            time.sleep(float(os.environ["PAUSE"]))
os.replace = replace
sys.argv = ["evaluate", *sys.argv[1:]]
run(evaluate.main)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_signal_between_the_final_moves_leaves_no_temporaries_nor_a_running_run(mnist, classifier, workspace,
                                                                                 tmp_path, monkeypatch, sig):
    """SIGTERM (or Ctrl-C) waits for the renames: all outputs are new, nothing is left, the run FAILED. SIGKILL
    cannot wait: its temporaries and its RUNNING run last until the rerun, which removes them and ends it KILLED."""
    root = tmp_path / "ws"
    shutil.copytree(workspace, root, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    argv = make_workspace(root, mnist, classifier)
    for path in OUTPUTS.values():  # the previous outputs, told apart from the new ones
        (root / path).write_bytes(b"old")
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PAUSE": "600" if sig == signal.SIGKILL else "2"}
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_EVALUATE, *argv], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (root / "moving").exists() and proc.poll() is None:
        assert time.time() < deadline, "evaluate never started moving its outputs"
        time.sleep(0.05)
    proc.send_signal(sig)
    temporaries = lambda: [p for p in root.rglob("*") if ".tmp" in p.name]
    old = lambda: [path for path in OUTPUTS.values() if (root / path).read_bytes() == b"old"]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    statuses = lambda: [r.info.status for r in client.search_runs(
        [client.get_experiment_by_name("ddpm").experiment_id], "tags.stage = 'evaluate'",
        order_by=["attributes.start_time ASC"])]
    if sig == signal.SIGTERM:
        assert proc.wait() == 128 + signal.SIGTERM
        assert old() == [] and temporaries() == [] and statuses() == ["FAILED"]
        return
    assert proc.wait() == -signal.SIGKILL
    assert temporaries() and old() and statuses() == ["RUNNING"], "the kill did not land between the moves"
    evaluate.main(argv)
    assert old() == [] and temporaries() == [] and statuses() == ["KILLED", "FINISHED"]


def test_the_reference_stage_never_depends_on_the_samples():
    """A new N or sampler reuses the reference: its params hold no sample key, and the protocol's name."""
    params = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["reference"]["params"]
    assert "evaluate.protocol" in params and not [k for k in params if str(k).split(".")[0] == "sample"]


def test_the_standard_protocol_is_torch_fidelitys_fid_against_the_whole_training_split(mnist, classifier, tmp_path,
                                                                                      monkeypatch):
    """FID against the statistics of all 1000 training digits, and the floor (the test split) likewise, equal
    torch-fidelity's calculate_metrics on the same images; KID and precision/recall use a stratified subset."""
    monkeypatch.setattr(protocol, "SUBSET", 600)
    monkeypatch.setenv("DDPM_TRACKING", "off")
    train = slice(0, 1000)  # of the classifier's digits: every class at least 85 times
    argv = make_workspace(tmp_path, mnist, classifier, protocol="standard", sets=SMALL, train=train,
                          test=slice(6000, 6300))
    monkeypatch.chdir(tmp_path)
    reference.main(REFERENCE_ARGV)
    evaluate.main(argv)
    ref = safe_load(tmp_path / "data/reference/classifier.pt")
    assert ref["reference_split"] == "train" and ref["num_real"] == 1000
    assert torch.bincount(ref["reference_labels"]).tolist() == [60] * 10
    images, _ = mnist
    ev = json.loads((tmp_path / "metrics/eval.json").read_text())

    def direct(generated):
        return torch_fidelity.calculate_metrics(
            input1=UInt8Dataset(generated), input2=UInt8Dataset(images[train]), fid=True, isc=True, rng_seed=0,
            feature_extractor=EXTRACTOR_NAME, feature_extractor_classifier=classifier, cuda=False, cache=False,
            save_cpu_ram=True, verbose=False)
    generated = safe_load(tmp_path / "samples/uncond/ddim/ddim5_eta0.pt")["images"]
    for ours, theirs in ((ev["uncond"]["ddim5_eta0"], direct(generated)),
                         (ev["floor"]["classifier"], direct(images[6000:6300]))):
        assert ours["fid"] == pytest.approx(theirs[torch_fidelity.KEY_METRIC_FID], rel=1e-6)
        assert ours["is_mean"] == pytest.approx(theirs[torch_fidelity.KEY_METRIC_ISC_MEAN], rel=1e-6)
    p = ev["protocol"]
    assert (p["name"], p["key"], p["reference_split"], p["floor_split"]) == ("standard", "standard-200", "train",
                                                                             "test")
    assert (p["num_real"], p["num_floor"], p["kid_prc_subset"], p["isc_splits"]) == (1000, 300, 600, 10)
    assert set(json.loads((tmp_path / "metrics/eval_summary.json").read_text())) == {"standard-200"}
