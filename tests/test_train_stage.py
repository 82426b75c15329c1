"""The train stages' DVC params: each lists every train key, but not the one that only the other model
reads, so that DVC never keeps a stale model and does not retrain one for a key it ignores."""

import dataclasses

import pytest
import torch
import yaml
from helpers import ROOT
from test_training import CPU, shapes, tiny_unet

from ddpm import Diffusion, DiffusionConfig, Trainer
from stages.params import TrainParams, validate
from stages.train import OWN_KEY, unread_key, variant_params


def dvc_params(variant: str) -> list[str]:
    """The params that dvc.yaml's train@VARIANT stage depends on."""
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]
    keys = [k.replace("${item.own}", stage["foreach"][variant]["own"]) for k in stage["do"]["params"]]
    assert not any("${" in k for k in keys), keys
    return keys


@pytest.mark.parametrize("variant", ["uncond", "cond"])
def test_train_stage_lists_every_train_key_but_the_one_it_does_not_read(variant):
    keys = dvc_params(variant)
    assert {"seed", "device", "diffusion", "model"} <= set(keys) and "train" not in keys
    train = {k.removeprefix("train.") for k in keys if k.startswith("train.")}
    assert train == {f.name for f in dataclasses.fields(TrainParams)} - {unread_key(variant)}
    assert OWN_KEY[variant] in train


def test_variant_params_zero_only_the_other_models_key():
    p = validate({"train": {"guide_at": 0.5, "p_uncond": 0.2, "lr": 1e-3}})
    assert (variant_params(p, "uncond").train.guide_at, variant_params(p, "uncond").train.p_uncond) == (0.5, 0.0)
    assert (variant_params(p, "cond").train.guide_at, variant_params(p, "cond").train.p_uncond) == (0.0, 0.2)
    assert variant_params(p, "cond").train.lr == variant_params(p, "uncond").train.lr == 1e-3


def trained(labels, **config) -> Trainer:
    images, _ = shapes(16, size=8)
    trainer = Trainer(tiny_unet(8, num_classes=2 if labels is not None else None),
                      Diffusion(DiffusionConfig(timesteps=20).betas()), images, labels,
                      TrainParams(epochs=3, batch_size=8, lr=1e-2, warmup_steps=0, ema_decay=0.5, **config), CPU)
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
