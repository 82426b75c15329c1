"""Shared fixtures: the tiny project reproduced once per test session, two experiments on it, and a randomly
initialised Inception-v3 weights file."""

import atexit
import hashlib
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from helpers import TINY, FileServer, make_repo, run
from torch_fidelity import feature_extractor_inceptionv3
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

# Inception-v3's weights are downloaded on first use (stages/pipeline/inception.py): in the tests, and in every
# stage and `dvc repro` they start, from a port of this machine where nothing listens (refused at once, so the
# stages take their offline path), into a torch cache of their own (never the user's, which may hold the file).
os.environ["DDPM_INCEPTION_URL"] = "http://127.0.0.1:9/weights-inception-2015-12-05-6726825d.pth"
os.environ["TORCH_HOME"] = tempfile.mkdtemp(prefix="ddpm-tests-torch-home-")

from benchmarks.project import TRACKING_VARIABLES

atexit.register(shutil.rmtree, os.environ["TORCH_HOME"], ignore_errors=True)  # its own, made above

WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:  # the workers share the cores: their threads, and those of the processes tests start, too
    THREADS = max(1, (os.cpu_count() or 1) // WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    torch.set_num_threads(THREADS)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the groups
def pytest_collection_modifyitems(items):
    """The groups pytest-xdist keeps in one worker (--dist loadgroup): every test on the tiny project's one
    reproduction (tiny_repo), so that it is built once, and otherwise each file's tests, so that a module's
    fixtures are built once; the two files on several processes share their trained repositories."""
    shared = {"test_distributed": "distributed", "test_multinode": "distributed"}
    for item in items:
        group = "tiny_repo" if "tiny_repo" in item.fixturenames else shared.get(item.path.stem, item.path.stem)
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True)
def hermetic_environment():
    """Every test starts without the variables that point stages at another tracking store
    (TRACKING_VARIABLES), and what it changes in os.environ ends with it."""
    saved = dict(os.environ)
    for name in TRACKING_VARIABLES:
        os.environ.pop(name, None)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> tuple[Path, str]:
    """The tiny project after one `dvc repro` from scratch (with its output), committed."""
    repo = make_repo(tmp_path_factory.mktemp("pipeline") / "repo", TINY)
    proc = run(["dvc", "repro"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "reproduced"], repo)
    return repo, proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def tiny_experiments(tiny_repo) -> dict[str, str]:
    """Three experiments on the tiny project: a sample param in the workspace; a switch to the gpu profile
    with two values of one's own, one that no profile sets (cosine lr decay) and one that overrides the
    profile's (DDIM spacing), in a temporary copy (`--temp`, which runs under .dvc/tmp/exps/); and a sweep over
    post-hoc EMA lengths with one sampler (`--temp`). Returns each one's output."""
    repo, _ = tiny_repo
    out = {}
    gpu = ["--temp", "-S", "profile=gpu", "-S", "train.lr_schedule=cosine", "-S", "sample.spacing=quadratic"]
    sweep = ["--temp", "-S", "sample.sigma_rel=[0.05,0.1]", "-S", "sample.methods=[dpmsolver]"]
    for name, args in [("eta-half", ["-S", "sample.eta=[0.5]"]), ("gpu", gpu), ("ema-sweep", sweep)]:
        proc = run(["dvc", "exp", "run", "-n", name, *args], repo)
        out[name] = proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="session")
def fake_inception(tmp_path_factory) -> Path:
    """A randomly initialised Inception-v3 saved in torch-fidelity's weights format (the real ones are not here),
    under another name: torch-fidelity's name promises its published file, checked by hash."""
    path = tmp_path_factory.mktemp("inception") / "inception-random.pth"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(feature_extractor_inceptionv3, "load_state_dict_from_url", lambda *args, **kwargs: {})
        mp.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state_dict: None)
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture()
def weights_server(fake_inception):
    """A FileServer with `fake_inception` at /inception-random.pth; .data and .digest (its SHA-256) are the file's."""
    server = FileServer({"/inception-random.pth": fake_inception.read_bytes()})
    server.data = server.files["/inception-random.pth"]
    server.digest = hashlib.sha256(server.data).hexdigest()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()
