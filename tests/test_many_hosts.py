"""Experiments on many hosts, the DVC way: two clones of one git remote, sharing a DVC remote and an MLflow
tracking server, each running and pushing its own experiment; either clone then pulls and lists both, and
the server holds both under their parent runs. README's "Scaling out" shows these commands."""

import json

import pytest
import yaml
from helpers import TINY, make_repo, run, start_server, stop
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def test_two_hosts_share_experiments_through_git_dvc_and_mlflow(tmp_path):
    project = make_repo(tmp_path / "project", TINY)
    run(["git", "init", "-q", "--bare", str(tmp_path / "remote.git")], tmp_path)
    run(["git", "remote", "add", "origin", str(tmp_path / "remote.git")], project)
    run(["dvc", "remote", "add", "-d", "shared", str(tmp_path / "dvc-store")], project)
    run(["git", "commit", "-qam", "a shared DVC remote"], project)
    run(["git", "push", "-q", "origin", "HEAD:main"], project)
    server, uri = start_server(tmp_path)
    try:
        hosts = {}
        for name, seed in (("a", 1), ("b", 2)):
            clone = tmp_path / name
            run(["git", "clone", "-q", "-b", "main", str(tmp_path / "remote.git"), str(clone)], tmp_path)
            run(["git", "config", "user.email", f"{name}@localhost"], clone)
            run(["git", "config", "user.name", name], clone)
            # a cheap experiment: the stages up to prepared data, with its own seed
            run(["dvc", "exp", "run", "-n", f"host-{name}", "-S", f"seed={seed}", "prepare"], clone,
                env={"MLFLOW_TRACKING_URI": uri})
            run(["dvc", "exp", "push", "origin", f"host-{name}"], clone)
            hosts[name] = clone
        for name, clone in hosts.items():
            run(["dvc", "exp", "pull", "origin", "host-b" if name == "a" else "host-a"], clone)
            shown = json.loads(run(["dvc", "exp", "show", "--json"], clone).stdout)
            names = {e["name"] for row in shown for e in (row.get("experiments") or [])}
            assert {"host-a", "host-b"} <= names, (clone, names)
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id])
        parents = {r.info.run_name: r.info.run_id for r in runs if r.data.tags.get("role") == "pipeline"}
        assert {"host-a", "host-b"} <= set(parents)
        for name, run_id in parents.items():
            children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == run_id]
            assert [r.info.run_name for r in children] == ["prepare"], name
            assert children[0].data.params["seed"] == {"host-a": "1", "host-b": "2"}[name]
        # the pull brought the other host's outputs from the shared DVC remote into this clone's cache
        ref = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], hosts["a"]).stdout.split()
        lock = yaml.safe_load(run(["git", "show", f"{next(r for r in ref if r.endswith('/host-b'))}:dvc.lock"],
                                  hosts["a"]).stdout)
        md5 = lock["stages"]["prepare"]["outs"][0]["md5"]
        assert (hosts["a"] / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).is_file()
    finally:
        stop(server)
