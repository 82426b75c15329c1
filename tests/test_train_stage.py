"""The train stages' DVC params: the keys both models share in `train`, each model's own in its own
section, so that DVC never keeps a stale model and does not retrain one for a key it ignores."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers import ROOT
from test_training import CPU, shapes, tiny_unet

from ddpm import Autocast, Diffusion, DiffusionConfig, TrainConfig, Trainer, generate, safe_load
from ddpm.posthoc_ema import reconstruct
from stages.pipeline.params import CondTrainParams, ParamsError, TrainParams, UncondTrainParams, train_config, validate
from stages.pipeline.resume import TrainState
from stages.train import epoch_grid

BASE = yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.mark.parametrize("variant", ["uncond", "cond"])
def test_train_stage_depends_on_the_shared_section_and_its_own(variant):
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]
    keys = [k.replace("${item}", variant) for k in stage["do"]["params"]]
    assert keys == ["seed", "device", "diffusion", "model", "train", f"train_{variant}"]


def test_every_training_key_is_in_exactly_one_section():
    """A key is shared (train) or each model's own (train_uncond, train_cond; only the step budget and the model it
    starts from are in both)."""
    shared, uncond, cond = [{f.name for f in dataclasses.fields(c)}
                            for c in (TrainParams, UncondTrainParams, CondTrainParams)]
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= shared | uncond | cond
    assert not shared & (uncond | cond) and uncond & cond == {"steps", "init_from"}


def test_train_config_turns_the_other_models_key_off():
    params = yaml.safe_load(yaml.safe_dump(BASE))
    params["train_uncond"]["guide_at"], params["train_cond"]["p_uncond"], params["train"]["lr"] = 0.5, 0.2, 1e-3
    params["train_uncond"]["steps"], params["train_cond"]["steps"] = 30, None
    p = validate(params)
    uncond, cond = train_config(p, "uncond"), train_config(p, "cond")
    assert (uncond.guide_at, uncond.p_uncond, cond.guide_at, cond.p_uncond) == (0.5, 0.0, 0.0, 0.2)
    assert uncond.lr == cond.lr == 1e-3
    assert (uncond.steps, cond.steps) == (30, None)


def trained(labels, **config) -> Trainer:
    images, _ = shapes(16, size=8)
    trainer = Trainer(tiny_unet(8, num_classes=2 if labels is not None else None),
                      Diffusion(DiffusionConfig(timesteps=20).betas()), images, labels,
                      TrainConfig(epochs=3, batch_size=8, lr=1e-2, warmup_steps=0, ema_decay=0.5, **config), CPU)
    trainer.fit(progress=False)
    return trainer


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_the_unconditional_model_does_not_read_p_uncond():
    a, b = trained(None, p_uncond=0.0), trained(None, p_uncond=0.7)
    assert same_weights(a.net, b.net) and same_weights(a.ema.module, b.ema.module)
    _, labels = shapes(16, size=8)  # where there are labels to drop, it matters
    assert not same_weights(trained(labels, p_uncond=0.0).net, trained(labels, p_uncond=0.7).net)


def test_the_conditional_models_weights_do_not_depend_on_guide_at():
    _, labels = shapes(16, size=8)
    a, b = trained(labels, guide_at=0.0), trained(labels, guide_at=0.5)
    assert same_weights(a.net, b.net) and same_weights(a.ema.module, b.ema.module)
    assert a.guide is None and b.guide is not None  # only the snapshot, which the stage runs without


def test_the_model_folder_keeps_the_post_hoc_snapshots_that_reconstruct_the_tracked_emas(tmp_path):
    """train.posthoc_sigma_rels/posthoc_snapshots: the finished model folder holds model-posthoc.pt, from which the
    EMA of a tracked width at the last step is reconstructed to float precision; without them, no file."""
    trainer = trained(None, posthoc_sigma_rels=(0.05, 0.10), posthoc_snapshots=3)
    unet, diffusion = trainer.net.config, DiffusionConfig(timesteps=20)
    state = TrainState(tmp_path / "ck", "hash")
    state.grids.mkdir(parents=True)
    state.write_model(tmp_path / "with", trainer, unet, diffusion, {"variant": "uncond"})
    snapshots = safe_load(tmp_path / "with" / "model-posthoc.pt", required=("snapshots",))["snapshots"]
    assert [(s["t"], s["sigma_rel"]) for s in snapshots] == [(t, w) for t in (2, 4, 6) for w in (0.05, 0.10)]
    for width, tracked in zip((0.05, 0.10), trainer.posthoc.modules):
        weights = reconstruct(snapshots, width)
        assert all(torch.allclose(weights[k], v, atol=1e-6) for k, v in tracked.state_dict().items())
    state.write_model(tmp_path / "without", trained(None), unet, diffusion, {})
    assert (tmp_path / "without" / "model.pt").exists() and not (tmp_path / "without" / "model-posthoc.pt").exists()


def test_post_hoc_keys_are_checked_before_any_work():
    params = yaml.safe_load(yaml.safe_dump(BASE))
    params["train"]["posthoc_sigma_rels"], params["train"]["posthoc_snapshots"] = [0.05, 0.3], 4
    with pytest.raises(ParamsError, match=r"^params.yaml: train.posthoc_sigma_rels = .* widths in \(0, 0.2887\)"):
        validate(params)
    params["train"]["posthoc_sigma_rels"], params["train"]["posthoc_snapshots"] = [0.05], 0
    with pytest.raises(ParamsError, match=r"^params.yaml: train.posthoc_snapshots = 0 .* allowed: >= 1 when"):
        validate(params)


def test_the_epoch_grids_are_drawn_at_the_training_precision():
    """The per-epoch grids sample the EMA weights at train.precision, as the training step runs: bf16 here, which
    gives other pixels than fp32 would."""
    _, labels = shapes(16, size=8)
    trainer = trained(labels, precision="bf16")
    unet = trainer.net.config
    p = SimpleNamespace(seed=0, train=SimpleNamespace(grid_size=6, grid_ddim_steps=5, batch_size=8))
    grid = epoch_grid(trainer, p, unet)

    def drawn(precision: str) -> torch.Tensor:
        return generate(Autocast(trainer.ema.module, precision), trainer.diffusion, 6, unet.sample_shape, seed=0,
                        steps=5, labels=torch.arange(6) % 2)
    assert trainer.precision == "bf16" and torch.equal(grid, drawn("bf16")) and not torch.equal(grid, drawn("fp32"))
