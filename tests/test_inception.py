"""Inception-v3's weights fetched as the pipeline fetches them, from a real HTTP server on 127.0.0.1 serving a
randomly initialised Inception-v3 (tests/conftest.py): verified by SHA-256 before anything reads them, a truncated
or wrong file refused by name and removed (and a retry works), a silent server given up on in bounded time;
offline the stages go on with the domain classifier, and evaluate.inception_required stops the run first."""

import hashlib
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT

from ddpm.inception import DownloadError, download_inception_weights, load_inception_weights
from ddpm.metrics import extract_features, make_extractor
from stages import check
from stages.pipeline.inception import fetch, inception_weights
from stages.pipeline.params import load_params
from stages.pipeline.run import run


def test_a_download_is_kept_only_whole_and_verified_and_then_builds_inception(weights_server, tmp_path):
    server, data, digest = weights_server, weights_server.data, weights_server.digest
    dest = tmp_path / "cache" / "inception-random.pth"
    assert download_inception_weights(dest, server.url("inception-random.pth"), digest) == dest
    assert dest.read_bytes() == data and list(dest.parent.iterdir()) == [dest]
    extractor = make_extractor("inception", weights=dest, sha256=digest)
    features = extract_features(extractor, torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert features["features"].shape == (2, 2048)


def test_a_truncated_download_is_refused_and_nothing_is_kept(weights_server, tmp_path):
    server, dest = weights_server, tmp_path / "inception-random.pth"
    with pytest.raises(DownloadError) as error:
        download_inception_weights(dest, server.url("truncated-inception-random.pth"), server.digest)
    message = str(error.value)
    assert message.startswith(server.url("truncated-inception-random.pth") + ": truncated download (")
    assert f"of {len(server.data)} bytes" in message and "\n" not in message and not error.value.offline
    assert list(tmp_path.iterdir()) == []


def test_a_wrong_file_is_refused_by_name_and_removed_and_a_retry_works(weights_server, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    server = weights_server
    url, data, digest = server.url("inception-random.pth"), server.data, server.digest
    cached = tmp_path / "hub" / "checkpoints" / "inception-random.pth"
    wrong = hashlib.sha256(b"another file").hexdigest()
    with pytest.raises(DownloadError) as error:
        fetch(url, wrong)
    assert str(error.value) == (f"{cached}: refused and removed: the file from {url} has a SHA-256 starting "
                                f"{digest[:8]}, not {wrong[:8]}")
    assert list(cached.parent.iterdir()) == []
    assert fetch(url, digest) == cached and cached.read_bytes() == data  # the retry, with the right digest
    cached.write_bytes(data[:1000])  # damaged on disk: removed and fetched again
    assert fetch(url, digest) == cached and cached.read_bytes() == data
    assert server.requests == ["/inception-random.pth"] * 3
    assert fetch(url, digest) == cached and len(server.requests) == 3  # a good cached file is not fetched again


def test_a_server_that_never_answers_is_given_up_on_within_the_timeout(tmp_path):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # connections complete in the backlog, but no request is ever answered
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/weights.pth"
    start = time.monotonic()
    with pytest.raises(DownloadError) as error:
        download_inception_weights(tmp_path / "weights.pth", url, "0" * 64, timeout=0.5)
    silent.close()
    assert time.monotonic() - start < 5
    assert str(error.value) == f"{url}: cannot be reached (timed out; timeout 0.5 s)" and error.value.offline
    assert list(tmp_path.iterdir()) == []


def write_params(root: Path, **evaluate) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update(device="cpu")
    params["evaluate"].update(evaluate)
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def test_offline_the_default_goes_on_without_inception_and_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path)
    p = load_params()
    assert "inception" in p.evaluate.extractors and not p.evaluate.inception_required  # the default
    start = time.monotonic()
    found = inception_weights(p)  # tests/conftest.py: DDPM_INCEPTION_URL is refused at once
    assert time.monotonic() - start < 5 and found.path is None and found.status() == "unavailable (offline)"
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("inception: unavailable (offline): http://127.0.0.1:9/weights-inception-2015-12-05-"
                           "6726825d.pth: cannot be reached (") and "domain classifier alone" in line


def test_inception_required_stops_the_check_stage_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, inception_required=True)
    monkeypatch.setattr(sys, "argv", ["check", "data/params-checked.txt"])
    with pytest.raises(SystemExit) as stop:
        run(check.main)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1 and len(err) == 1, err
    assert err[0].startswith("error: Inception-v3 weights unavailable: http://127.0.0.1:9/") and err[0].endswith(
        "(params.yaml: evaluate.inception_required is true; with false the run goes on with the domain classifier)")
    assert not (tmp_path / "data").exists()


def test_inception_required_passes_the_check_stage_once_the_weights_download(weights_server, tmp_path,
                                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("DDPM_INCEPTION_URL", weights_server.url("inception-random.pth"))
    monkeypatch.setenv("DDPM_INCEPTION_SHA256", weights_server.digest)
    write_params(tmp_path, inception_required=True)
    check.main(["data/params-checked.txt"])
    cached = tmp_path / "torch/hub/checkpoints/inception-random.pth"
    assert (tmp_path / "data/params-checked.txt").is_file() and cached.read_bytes() == weights_server.data
    assert load_inception_weights(cached, weights_server.digest).keys() == torch.load(cached, weights_only=True).keys()


def test_a_malformed_digest_in_the_environment_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DDPM_INCEPTION_SHA256", "not-a-digest")
    write_params(tmp_path, inception_required=True)
    monkeypatch.setattr(sys, "argv", ["check", "data/params-checked.txt"])
    with pytest.raises(SystemExit):
        run(check.main)
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: DDPM_INCEPTION_SHA256='not-a-digest': a SHA-256 digest or its first 8 or more hex digits expected"]
