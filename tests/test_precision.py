"""Sampling precision: `ddpm.Autocast` runs the network at a precision and hands the sampler fp32, through
the library, the `ddpm` command and the MLflow model; and post-hoc EMA weights loaded with the model."""

import types

import pytest
import torch
from mlflow.exceptions import MlflowException
from test_cli import ddpm, ok, tiny_models

from ddpm import Autocast, CheckpointError, generate, load_model, posthoc_path, safe_load
from ddpm.checkpoint import export_model
from ddpm.posthoc_ema import reconstruct
from ddpm.precision import resolve_precision
from stages.pipeline.mlflow_model import DiffusionSampler


class Probe(torch.nn.Module):
    """A network that records the dtype it is given and the autocast state it runs in."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.seen = []

    def forward(self, x_t, t, y=None):
        self.seen.append((x_t.dtype, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        out = self.conv(x_t)
        self.seen[-1] += (out.dtype,)
        return out


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_the_network_runs_16_bit_and_the_sampler_gets_fp32(precision, dtype):
    probe = Probe()
    net = Autocast(probe, precision)
    x = torch.randn(2, 1, 8, 8)
    out = net(x, torch.zeros(2, dtype=torch.long))
    assert out.dtype == torch.float32 and net.precision == precision
    assert probe.seen == [(torch.float32, True, dtype, dtype)]  # fp32 in, 16-bit convolution, fp32 out
    assert not torch.is_autocast_enabled("cpu")  # only inside the forward pass


def test_fp32_is_the_bare_network_bit_for_bit(tmp_path_factory):
    model, diffusion, _ = load_model(tiny_models(tmp_path_factory)["uncond"])
    plain = generate(model, diffusion, 6, (1, 28, 28), seed=3, steps=4)
    assert torch.equal(generate(Autocast(model, "fp32"), diffusion, 6, (1, 28, 28), seed=3, steps=4), plain)
    assert Autocast(model, "tf32").precision == "fp32"  # TensorFloat-32 is CUDA's; on a CPU it is fp32
    assert Autocast(model, "auto").precision == resolve_precision("auto", "cpu")


def test_bf16_samples_are_close_to_fp32_but_not_the_same(tmp_path_factory):
    model, diffusion, _ = load_model(tiny_models(tmp_path_factory)["cond"])
    labels = torch.arange(8) % 3
    fp32 = generate(model, diffusion, 8, (1, 28, 28), seed=0, steps=5, labels=labels).float()
    bf16 = generate(Autocast(model, "bf16"), diffusion, 8, (1, 28, 28), seed=0, steps=5, labels=labels).float()
    assert not torch.equal(fp32, bf16)
    assert (fp32 - bf16).abs().mean() < 4  # of 255 levels: the same images, rounded differently


def test_the_command_samples_at_a_precision_and_refuses_an_unknown_one(tmp_path_factory, tmp_path):
    model = tiny_models(tmp_path_factory)["uncond"]
    ok("sample", "--model", model, "--num", 4, "--steps", 3, "--precision", "bf16", "--out", tmp_path / "a.png",
       cwd=tmp_path)
    assert (tmp_path / "a.png").is_file()

    proc = ddpm("sample", "--model", model, "--precision", "fp64", cwd=tmp_path)
    assert proc.returncode == 2 and "--precision: invalid choice: 'fp64'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_the_mlflow_model_samples_at_its_model_config_precision(tmp_path_factory):
    paths = tiny_models(tmp_path_factory)

    def sampler(**config):
        m = DiffusionSampler()
        m.load_context(types.SimpleNamespace(model_config=config, artifacts={"model": str(paths["cond"])}))
        return m

    request = {"num": [4], "steps": [3], "guidance": [1.0]}
    fp32, bf16 = sampler().predict(None, request), sampler(precision="bf16").predict(None, request)
    assert sampler(precision="bf16").precision == "bf16" and sampler().precision == "fp32"
    assert fp32.shape == bf16.shape == (4, 1, 28, 28) and not (fp32 == bf16).all()
    with pytest.raises(MlflowException, match="model_config precision: 'half' is not one of fp32, tf32"):
        sampler(precision="half")


def test_a_post_hoc_ema_loads_as_its_reconstruction_from_the_snapshots(tmp_path_factory, tmp_path):
    path = tiny_models(tmp_path_factory)["uncond"]
    snapshots = safe_load(posthoc_path(path), ("snapshots",))["snapshots"]
    model, _, meta = load_model(path, sigma_rel=0.08)
    expected = reconstruct(snapshots, 0.08)
    assert meta["sigma_rel"] == 0.08 and "sigma_rel" not in load_model(path)[2]
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert not all(torch.equal(v, load_model(path)[0].state_dict()[k]) for k, v in model.state_dict().items())
    # the file's own tracked widths come back as the last snapshot of that width
    last = [s for s in snapshots if s["sigma_rel"] == 0.1][-1]["state"]
    tracked = load_model(path, sigma_rel=0.1)[0].state_dict()
    assert all(torch.allclose(v, last[k], atol=1e-6) for k, v in tracked.items())


def test_a_post_hoc_ema_without_snapshots_is_one_line_naming_the_file(tmp_path_factory, tmp_path):
    path = tiny_models(tmp_path_factory)["cond"]
    lone = tmp_path / "lone.pt"
    lone.write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match=r"lone-posthoc.pt: no such file; post-hoc EMA needs the snapshots"):
        load_model(lone, sigma_rel=0.1)
    export_model(path, tmp_path / "export")
    with pytest.raises(CheckpointError, match=r"export: an export holds one set of weights"):
        load_model(tmp_path / "export", sigma_rel=0.1)
