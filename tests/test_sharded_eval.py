"""The reference and evaluate stages spread their feature extraction over processes (train.nproc, as sampling
does) and write what one process writes: every process extracts the features of its share of the images, rank 0
gathers them in order and computes the statistics and metrics."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import merge, run
from mlflow.tracking import MlflowClient
from test_evaluate import OUTPUTS, SMALL, make_workspace

from ddpm import safe_load
from ddpm.classifier import Classifier, ClassifierConfig
from ddpm.data import make_glyphs
from stages import evaluate, reference

ROOT = Path(__file__).resolve().parents[1]
N, REAL = 41, 201  # odd: the two processes' shares differ in length


@pytest.fixture(scope="module")
def mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """Drawn digits in place of test_evaluate's MNIST, as many as its workspace slices."""
    data = make_glyphs(6000 + REAL, 1, seed=0)
    return data.train_images, data.train_labels


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    """An untrained classifier: its features need not separate the classes here, only come out the same."""
    torch.manual_seed(0)
    return Classifier(ClassifierConfig(width=8, feature_dim=32)).eval()


def argvs(out: str) -> tuple[list[str], list[str]]:
    """The reference and evaluate stages' argv, writing into `out`/."""
    outputs = [a for flag, path in OUTPUTS.items() for a in (flag, f"{out}/{path}")]
    common = ["--data", "data/prepared", "--classifier", "models/classifier.pt"]
    return ([*common, "--out", f"{out}/reference"],
            [*common, "--reference", f"{out}/reference", *outputs, *[f"samples/{v}/{m}" for v, m in SMALL]])


@pytest.fixture(scope="module")
def runs(mnist, classifier, tmp_path_factory) -> Path:
    """A workspace after the two stages in this process (out1/), then as two processes (out2/: train.nproc 2,
    which the stages relaunch themselves under torchrun for)."""
    root = tmp_path_factory.mktemp("sharded")
    make_workspace(root, mnist, classifier, n=N, sets=SMALL, test=slice(6000, 6000 + REAL))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"]["batch_size"] = 16  # the shares start mid-batch: features must not depend on the batching
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        ref, ev = argvs("out1")
        reference.main(ref)
        evaluate.main(ev)
        (root / "params.yaml").write_text(yaml.safe_dump(merge(params, {"train": {"nproc": 2}})))
        ref, ev = argvs("out2")
        env = {"PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}
        said = run([sys.executable, "-m", "stages.reference", *ref], root, env=env).stdout
        assert "(2 processes)" in said, said
        run([sys.executable, "-m", "stages.evaluate", *ev], root, env=env)
    return root


def equal(a, b) -> bool:
    """Whether two loaded checkpoints hold the same values, tensors compared with torch.equal."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


@pytest.mark.slow
def test_two_processes_write_the_reference_of_one(runs):
    one, two = safe_load(runs / "out1/reference/classifier.pt"), safe_load(runs / "out2/reference/classifier.pt")
    assert one["reference"]["features"].shape == (REAL, 32) and one["stats"]["sigma"].shape == (32, 32)
    assert equal(one, two)
    listed = [(runs / out / "reference/extractors.json").read_text() for out in ("out1", "out2")]
    assert listed[0] == listed[1] and sorted(os.listdir(runs / "out1/reference")) == sorted(
        os.listdir(runs / "out2/reference"))


@pytest.mark.slow
def test_two_processes_score_the_numbers_of_one(runs):
    for path in OUTPUTS.values():
        if path.endswith((".json", ".csv")):
            one, two = (runs / "out1" / path).read_text(), (runs / "out2" / path).read_text()
            assert one == two, path
    details = json.loads((runs / "out2/metrics/eval.json").read_text())
    assert details["cond"]["ddim5_eta0_w1"]["fid"] > 0 and details["protocol"]["num_generated"] == N
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ddpm").experiment_id
    for stage in ("reference", "evaluate"):
        tagged = client.search_runs([experiment], f"tags.stage = '{stage}'")
        assert sorted(r.data.tags["processes"] for r in tagged) == ["1", "2"], stage  # rank 0's runs alone
