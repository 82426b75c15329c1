"""Beyond one node, simulated on this machine: two torchrun agents meeting at a c10d rendezvous on
127.0.0.1, Slurm tasks joining through the environment srun sets, and sampling spread over processes
(gloo on the CPU)."""

import contextlib
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
import yaml
from helpers import TINY, make_repo, merge, run
from test_cli import tiny_models
from test_distributed import CONFIG, TRAIN, processes_in, trained

from stages.pipeline.run import torchrun_command
from stages.pipeline.shard import share


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(repo: Path) -> dict[str, torch.Tensor]:
    return torch.load(repo / "model/model.pt", weights_only=True)["weights"]


ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def run_together(cmd: list[str], repo: Path, envs: list[dict]) -> list[subprocess.CompletedProcess]:
    """`cmd` started once per environment in `envs`, all at once (the nodes of one job), each waited for."""
    base = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    procs = [subprocess.Popen(cmd, cwd=repo, env={**base, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for env in envs]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{out[-3000:]}\n{err[-3000:]}"
        done.append(subprocess.CompletedProcess(cmd, 0, out, err))
    return done


def test_shares_cover_every_index_once_in_order():
    for num in (0, 1, 7, 40):
        for world_size in (1, 2, 3):
            shares = [share(num, r, world_size) for r in range(world_size)]
            assert [i for s in shares for i in s] == list(range(num))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_the_pipelines_torchrun_spans_nodes_at_the_endpoint(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert "--standalone" in torchrun_command(2, 1, None, "stages.train", ["uncond"])
    two = torchrun_command(2, 2, "node1:29500", "stages.train", ["uncond"])
    assert {"--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node1:29500"} <= set(two)
    assert two == torchrun_command(2, 2, "node1:29500", "stages.train", ["uncond"])  # one rendezvous id per stage
    assert two != torchrun_command(2, 2, "node1:29500", "stages.train", ["cond"])
    monkeypatch.setenv("SLURM_JOB_ID", "7")  # in a batch script: srun starts one torchrun per node
    assert torchrun_command(2, 2, "node1:29500", "stages.train", ["uncond"])[:3] == ["srun", "--nodes=2",
                                                                                     "--ntasks-per-node=1"]


@pytest.mark.slow
def test_two_processes_sample_the_bytes_of_one(tmp_path, tmp_path_factory):
    sample = {"methods": ["ddpm"], "num_samples": 7, "batch_size": 3, "ddpm_steps": [5], "grid_size": 7}
    repo = make_repo(tmp_path / "repo", merge(TINY, {"sample": sample}))
    (repo / "models/cond").mkdir(parents=True)
    shutil.copy(tiny_models(tmp_path_factory)["cond"], repo / "models/cond/model.pt")
    cmd = [sys.executable, "-m", "stages.sample", "cond", "ddpm", "--model", "models/cond/model.pt", "--out"]
    run([*cmd, "one"], repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(merge(params, {"train": {"nproc": 2}})))
    run([*cmd, "two"], repo)
    assert json.loads((repo / "two/index.json").read_text())[0]["processes"] == 2
    written = sorted(p.name for p in (repo / "one").iterdir())
    assert written == sorted(p.name for p in (repo / "two").iterdir()) and any(n.endswith(".pt") for n in written)
    for name in written:
        if name != "index.json":  # which holds the timings
            assert (repo / "one" / name).read_bytes() == (repo / "two" / name).read_bytes(), name
    tensors = next(n for n in written if n.endswith(".pt"))
    assert len(torch.load(repo / "two" / tensors, weights_only=True)["images"]) == 7


@pytest.mark.slow
def test_two_nodes_train_like_one_node_of_two_processes_and_like_one_process(tmp_path_factory):
    two = trained(tmp_path_factory, 2)
    port = free_port()
    nodes = make_repo(tmp_path_factory.mktemp("nodes") / "repo", merge(CONFIG, {"train": {
        "nproc": 1, "nnodes": 2, "rdzv_endpoint": f"127.0.0.1:{port}"}}))
    run([sys.executable, "-m", "stages.prepare", "data/prepared"], nodes)
    # `dvc repro`'s command on each node, one workspace both see; one thread per process, as torchrun gives
    # each of several processes on one node (other thread counts sum the convolutions in another order)
    run_together(TRAIN, nodes, [ONE_THREAD, ONE_THREAD])
    w2, w_nodes = weights(two), weights(nodes)
    assert all(torch.equal(w2[k], w_nodes[k]) for k in w2), "2 nodes x 1 process differ from 1 node x 2"
    # one process of the same global batch in two micro-batches, each with the draws of one of the two ranks
    one = make_repo(tmp_path_factory.mktemp("one") / "repo", merge(CONFIG, {"train": {"micro_batches": 2}}))
    run([sys.executable, "-m", "stages.prepare", "data/prepared"], one)
    run(TRAIN, one, env=ONE_THREAD)
    w1 = weights(one)
    assert all(torch.equal(w2[k], w1[k]) for k in w2), "1 process x 2 micro-batches differs from 2 processes"


@pytest.mark.slow
def test_slurm_tasks_join_the_job_instead_of_relaunching(tmp_path_factory):
    two = trained(tmp_path_factory, 2)
    repo = make_repo(tmp_path_factory.mktemp("slurm") / "repo", CONFIG)  # train.nproc 1: nothing to relaunch
    run([sys.executable, "-m", "stages.prepare", "data/prepared"], repo)
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    run_together(TRAIN, repo, [{**slurm, **ONE_THREAD, "SLURM_PROCID": str(rank)} for rank in (0, 1)])
    w2, w_slurm = weights(two), weights(repo)
    assert all(torch.equal(w2[k], w_slurm[k]) for k in w2), "the Slurm tasks did not train as one job of two"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_killing_one_node_stops_the_job_and_the_rerun_resumes(tmp_path):
    repo = make_repo(tmp_path / "repo", merge(TINY, {"train": {"epochs": 4, "nproc": 1, "nnodes": 2,  # 24 steps
                                                               "rdzv_endpoint": f"127.0.0.1:{free_port()}"}}))
    run([sys.executable, "-m", "stages.prepare", "data/prepared"], repo)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **ONE_THREAD}
    nodes = [subprocess.Popen(TRAIN, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(2)]
    try:
        deadline = time.time() + 300
        while not (repo / "ck/last.pt").exists() and all(n.poll() is None for n in nodes):
            assert time.time() < deadline, "training never wrote a checkpoint"
            time.sleep(0.05)
        nodes[1].send_signal(signal.SIGKILL)
        assert nodes[1].wait() == -signal.SIGKILL, "training ended before it could be killed"
        assert nodes[0].wait(timeout=60) != 0, "the other node trained on alone"
        deadline = time.time() + 30
        while processes_in(repo) and time.time() < deadline:
            time.sleep(0.2)
        assert not processes_in(repo), "processes of the killed job are still running"
    finally:
        for pid in processes_in(repo):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not (repo / "metrics.json").exists()
    step = torch.load(repo / "ck/last.pt", weights_only=True)["step"]
    assert 0 < step < 24
    outs = run_together(TRAIN, repo, [ONE_THREAD, ONE_THREAD])
    assert any(f"resuming from ck/last.pt at step {step}" in o.stdout for o in outs)
    assert json.loads((repo / "metrics.json").read_text())["steps"] == 24
