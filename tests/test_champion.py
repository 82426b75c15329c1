"""The alias champion: evaluate points it at the best version scored under the same data and protocol, never at
a worse one; queried back from a real SQLite registry."""

import contextlib

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from stages.pipeline.registry import CHAMPION, KEY_TAG, comparability_key, crown, describe_model_versions
from stages.pipeline.tracking import stage_run

PROTOCOL = {"extractor": "classifier", "extractors": ["classifier"], "reference_split": "test", "floor_split": "train",
            "num_generated": 1000, "seed": 0, "num_real": 1000, "num_floor": 1000, "dataset": "mnist",
            "data_hash": "a" * 64, "samplers": {"cond": {"ddim50": {"steps": 50}}}}


@pytest.fixture
def client(tmp_path, monkeypatch) -> MlflowClient:
    """A client on mlflow.db in tmp_path, where the stage runs log (the working directory)."""
    monkeypatch.chdir(tmp_path)
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def add_version(client: MlflowClient, fid: float | None = None, key: str | None = None, **tags) -> str:
    """A version of ddpm-cond (no model behind it: the alias reads only the tags), scored `fid` under `key`."""
    with contextlib.suppress(MlflowException):
        client.create_registered_model("ddpm-cond")
    scored = {} if fid is None else {"fid": str(fid), KEY_TAG: key}
    return str(client.create_model_version("ddpm-cond", "s3://bucket/model", tags={**scored, **tags}).version)


def champion(client: MlflowClient) -> str:
    return str(client.get_model_version_by_alias("ddpm-cond", CHAMPION).version)


def test_the_champion_moves_only_to_a_better_version_of_the_same_protocol(client):
    assert crown(client, "ddpm-cond", "k1") is None  # no version scored yet
    add_version(client, 5.0, "k1")
    assert crown(client, "ddpm-cond", "k1") == "ddpm-cond@champion is now version 1 (fid 5)" and champion(client) == "1"
    add_version(client, 7.0, "k1")  # worse: it stays
    assert crown(client, "ddpm-cond", "k1") == "ddpm-cond@champion stays version 1 (fid 5)"
    add_version(client, 5.0, "k1")  # as good: the one that earned it first keeps it
    crown(client, "ddpm-cond", "k1")
    assert champion(client) == "1"
    add_version(client, 2.0, "k1")
    crown(client, "ddpm-cond", "k1")
    assert champion(client) == "4"
    add_version(client)  # registered, not yet scored
    add_version(client, 1.0, "k2")  # better by the number, but scored another way: not comparable
    crown(client, "ddpm-cond", "k1")
    assert champion(client) == "4"


def test_a_new_protocol_starts_a_new_comparison_and_an_old_one_its_old_best(client):
    add_version(client, 2.0, "k1")
    add_version(client, 3.0, "k1")
    crown(client, "ddpm-cond", "k1")
    add_version(client, 9.0, "k2")  # e.g. the data changed: the only version scored on it
    crown(client, "ddpm-cond", "k2")
    assert champion(client) == "3"
    add_version(client, 4.0, "k1")  # back to the first protocol: its best, not the version just scored
    crown(client, "ddpm-cond", "k1")
    assert champion(client) == "1"


def test_the_comparability_key_is_the_protocol_without_the_sampler_settings():
    key = comparability_key(PROTOCOL)
    assert key == comparability_key({**PROTOCOL, "samplers": {"cond": {"dpmsolver20": {"steps": 20}}},
                                     "extractors": ["classifier", "inception"], "inception": "available"})
    for change in ({"data_hash": "b" * 64}, {"num_generated": 500}, {"extractor": "inception"}, {"seed": 1},
                   {"protocol": "fid10k"}):  # a setting the protocol gains later counts too
        assert comparability_key({**PROTOCOL, **change}) != key, change


def test_evaluate_describes_the_version_its_samples_came_from_and_crowns_the_best(client):
    """The version is found by its model file's hash, not by being the newest."""
    add_version(client, model_hash="h1")
    add_version(client, model_hash="h2")
    with stage_run("evaluate") as tracker:
        describe_model_versions(tracker, {"cond": {"fid": 4.0, "sampler": "ddim50"}}, PROTOCOL, {"cond": "h1"})
    with stage_run("evaluate") as tracker:
        describe_model_versions(tracker, {"cond": {"fid": 6.0, "sampler": "ddim50"}}, PROTOCOL, {"cond": "h2"})
    first, second = (client.get_model_version("ddpm-cond", v) for v in ("1", "2"))
    assert (first.tags["fid"], second.tags["fid"]) == ("4.0", "6.0")
    assert first.tags[KEY_TAG] == second.tags[KEY_TAG] == comparability_key(PROTOCOL)
    assert champion(client) == "1"
    with stage_run("evaluate") as tracker:  # samples of a model no version holds: nothing is described
        describe_model_versions(tracker, {"cond": {"fid": 1.0, "sampler": "ddim50"}}, PROTOCOL, {"cond": "h3"})
    fids = [client.get_model_version("ddpm-cond", v).tags["fid"] for v in ("1", "2")]
    assert champion(client) == "1" and fids == ["4.0", "6.0"]
