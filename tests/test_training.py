"""The training loop (it learns, warms up, stops on NaN, splits batches across ranks) and the EMA."""

import pytest
import torch
from torch import nn

from ddpm import EMA, Diffusion, DiffusionConfig, TrainConfig, Trainer, UNet, UNetConfig, to_model_range, to_uint8

CPU = torch.device("cpu")


def shapes(n: int = 64, size: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n uint8 images (n, 1, size, size): label 0 a filled 4x4 square, label 1 a 6x6 ring, at random offsets."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    labels = torch.arange(n) % 2
    for i in range(n):
        r, c = torch.randint(0, size - 6, (2,), generator=gen).tolist()
        if labels[i] == 0:
            images[i, 0, r + 1:r + 5, c + 1:c + 5] = 255
        else:
            images[i, 0, r:r + 6, c:c + 6] = 255
            images[i, 0, r + 1:r + 5, c + 1:c + 5] = 0
    return images, labels


def tiny_unet(size: int = 12, num_classes=None) -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(image_size=size, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                           attention_resolutions=(size // 2,), num_heads=2, dropout=0.0, num_classes=num_classes))


def test_unet_learns_to_denoise_simple_shapes():
    images, labels = shapes()
    config = TrainConfig(epochs=30, batch_size=16, lr=2e-3, warmup_steps=20, ema_decay=0.99, p_uncond=0.2)
    diffusion = Diffusion(DiffusionConfig(timesteps=100).betas())
    trainer = Trainer(tiny_unet(num_classes=2), diffusion, images, labels, config, CPU, seed=0)
    losses = []
    trainer.fit(on_step=lambda tr, loss, s: losses.append(loss), progress=False)
    assert len(losses) == trainer.total_steps == 120
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert first > 0.5                 # an untrained model predicts eps = 0: loss ~ 1
    assert last < 0.6 * first and last < 0.4, (first, last)
    assert trainer.ema.updates == 120


def test_lr_warms_up_linearly_then_stays_constant():
    images, _ = shapes(8, size=8)
    config = TrainConfig(epochs=3, batch_size=4, lr=1e-3, warmup_steps=4)
    trainer = Trainer(tiny_unet(8), Diffusion(DiffusionConfig(timesteps=10).betas()), images, None, config, CPU)
    assert [trainer.lr_at(s) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert trainer.lr_at(10_000) == pytest.approx(1e-3)
    used = []
    trainer.fit(on_step=lambda tr, loss, s: used.append(tr.optimizer.param_groups[0]["lr"]), progress=False)
    assert used == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    no_warmup = Trainer(tiny_unet(8), Diffusion(DiffusionConfig(timesteps=10).betas()), images, None,
                        TrainConfig(lr=1e-3, warmup_steps=0), CPU)
    assert no_warmup.lr_at(0) == pytest.approx(1e-3)


def test_cosine_lr_decays_from_the_end_of_warm_up_to_zero_at_the_last_step():
    images, _ = shapes(40, size=8)  # 10 steps an epoch
    config = TrainConfig(epochs=3, batch_size=4, lr=1e-3, warmup_steps=10, lr_schedule="cosine")
    trainer = Trainer(tiny_unet(8), Diffusion(DiffusionConfig(timesteps=10).betas()), images, None, config, CPU)
    assert trainer.total_steps == 30
    assert trainer.lr_at(0) == pytest.approx(1e-4) and trainer.lr_at(10) == pytest.approx(1e-3)
    assert trainer.lr_at(20) == pytest.approx(5e-4)  # halfway from step 10 to step 30
    lrs = [trainer.lr_at(s) for s in range(10, 30)]
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and 0 < lrs[-1] < 1e-5
    assert trainer.lr_at(30) == 0 and trainer.lr_at(99) == 0
    trainer.schedule_steps = 110  # a wall-clock budget's estimate of where training will end
    assert trainer.lr_at(60) == pytest.approx(5e-4)
    used = []
    trainer.schedule_steps = None
    trainer.fit(on_step=lambda tr, loss, s: used.append(tr.optimizer.param_groups[0]["lr"]), progress=False)
    assert used == pytest.approx([trainer.lr_at(s) for s in range(30)])


class NanAfter(nn.Module):
    """Predicts eps = w * x_t, then NaN from call `n` on."""

    def __init__(self, n: int):
        super().__init__()
        self.w, self.n, self.calls = nn.Parameter(torch.zeros(())), n, 0

    def forward(self, x_t, t, y=None):
        self.calls += 1
        out = self.w * x_t
        return out * float("nan") if self.calls >= self.n else out


def test_nan_loss_raises_naming_the_step():
    images, _ = shapes(8, size=8)
    trainer = Trainer(NanAfter(3), Diffusion(DiffusionConfig(timesteps=10).betas()), images, None,
                      TrainConfig(epochs=5, batch_size=4), CPU)
    with pytest.raises(FloatingPointError, match="step 3"):
        trainer.fit(progress=False)
    assert trainer.step == 2


class InfiniteGradient(nn.Module):
    """Predicts eps = w * x_t + 0 * sqrt(z) with z = 0: a finite loss whose gradient is NaN (0 * inf)."""

    def __init__(self):
        super().__init__()
        self.w, self.z = nn.Parameter(torch.zeros(())), nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t, y=None):
        return self.w * x_t + 0 * torch.sqrt(self.z)


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_non_finite_gradient_of_a_finite_loss_raises_before_the_update(grad_clip):
    images, _ = shapes(8, size=8)
    model = InfiniteGradient()
    trainer = Trainer(model, Diffusion(DiffusionConfig(timesteps=10).betas()), images, None,
                      TrainConfig(epochs=1, batch_size=4, grad_clip=grad_clip), CPU)
    with pytest.raises(FloatingPointError, match=r"training gradient norm is nan at step 1; lower train.lr"):
        trainer.fit(progress=False)
    assert trainer.step == 0 and model.w.item() == 0 and model.z.item() == 0  # no update was made


def test_divergent_lr_raises_floating_point_error():
    images, _ = shapes(8, size=8)
    trainer = Trainer(tiny_unet(8), Diffusion(DiffusionConfig(timesteps=10).betas()), images, None,
                      TrainConfig(epochs=10, batch_size=4, lr=1e20, warmup_steps=0), CPU)
    with pytest.raises(FloatingPointError, match=r"step \d+"):
        trainer.fit(progress=False)


def test_ranks_split_each_global_batch():
    images, _ = shapes(12, size=8)
    config = TrainConfig(batch_size=6)
    diffusion = Diffusion(DiffusionConfig(timesteps=10).betas())
    ranks = [Trainer(tiny_unet(8), diffusion, images, None, config, CPU, seed=3, rank=r, world_size=2)
             for r in range(2)]
    single = Trainer(tiny_unet(8), diffusion, images, None, config, CPU, seed=3)
    for epoch, i in [(0, 0), (0, 1), (1, 0)]:
        parts = [tr.batch_indices(epoch, i) for tr in ranks]
        assert len(parts[0]) == len(parts[1]) == 3
        assert sorted(torch.cat(parts).tolist()) == sorted(single.batch_indices(epoch, i).tolist())
    # an epoch visits every image once, and epochs are shuffled differently
    epoch0 = torch.cat([single.batch_indices(0, i) for i in range(2)])
    assert sorted(epoch0.tolist()) == list(range(12))
    assert not torch.equal(epoch0, torch.cat([single.batch_indices(1, i) for i in range(2)]))
    with pytest.raises(ValueError, match="divisible"):
        Trainer(tiny_unet(8), diffusion, images, None, TrainConfig(batch_size=5), CPU, world_size=2)


def test_epochs_and_callbacks():
    images, _ = shapes(9, size=8)
    trainer = Trainer(tiny_unet(8), Diffusion(DiffusionConfig(timesteps=10).betas()), images, None,
                      TrainConfig(epochs=2, batch_size=4), CPU)
    assert trainer.steps_per_epoch == 3 and trainer.total_steps == 6  # the last batch of an epoch is short
    ends = []
    trainer.fit(on_epoch_end=lambda tr, epoch: ends.append((epoch, tr.step)), progress=False)
    assert ends == [(0, 3), (1, 6)]


def test_guide_is_the_ema_weights_at_guide_at_and_survives_a_resume():
    images, _ = shapes(8, size=8)
    config = TrainConfig(epochs=4, batch_size=4, lr=1e-3, warmup_steps=1, ema_decay=0.5, guide_at=0.25)

    def trainer():
        return Trainer(tiny_unet(8), Diffusion(DiffusionConfig(timesteps=10).betas()), images, None, config, CPU)

    straight, at_guide = trainer(), {}

    def on_step(tr, loss, seconds):
        assert (tr.guide is None) == (tr.step < 2), tr.step  # 0.25 of 8 steps
        if tr.step == 2:
            at_guide.update({k: v.clone() for k, v in tr.ema.module.state_dict().items()})

    straight.fit(on_step, progress=False)
    assert straight.guide_step == 2 and straight.step == 8
    guide = straight.guide.state_dict()
    assert all(torch.equal(guide[k], at_guide[k]) for k in at_guide)
    assert not all(torch.equal(guide[k], v) for k, v in straight.ema.module.state_dict().items())
    assert not any(p.requires_grad for p in straight.guide.parameters())

    resumed = trainer()
    resumed.load_state_dict(straight.state_dict())
    assert all(torch.equal(resumed.guide.state_dict()[k], v) for k, v in guide.items())
    plain = Trainer(tiny_unet(8), Diffusion(DiffusionConfig(timesteps=10).betas()), images, None,
                    TrainConfig(epochs=1, batch_size=4), CPU)
    plain.fit(progress=False)
    assert plain.guide is None and plain.guide_step is None and "guide" not in plain.state_dict()


def test_image_range_round_trip():
    x = torch.arange(256, dtype=torch.uint8)
    assert to_model_range(x).min() == -1 and to_model_range(x).max() == 1
    assert torch.equal(to_uint8(to_model_range(x)), x)
    assert to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_ema_update_is_the_weighted_average():
    model = small_net()
    ema = EMA(model, decay=0.9, warmup=False)
    old = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.train()(torch.randn(8, 3))  # moves BatchNorm's running statistics
    ema.update(model)
    for p_old, p_new, p_ema in zip(old, model.parameters(), ema.module.parameters()):
        torch.testing.assert_close(p_ema, 0.9 * p_old + 0.1 * p_new, atol=1e-7, rtol=1e-6)
        assert not torch.equal(p_ema, p_new)
    for b_model, b_ema in zip(model.buffers(), ema.module.buffers()):
        assert torch.equal(b_model, b_ema)  # buffers are copied, not averaged


def test_ema_decay_warms_up():
    model = small_net()
    ema = EMA(model, decay=0.9999)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    old = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for p_old, p_new, p_ema in zip(old, model.parameters(), ema.module.parameters()):
        torch.testing.assert_close(p_ema, 0.1 * p_old + 0.9 * p_new, atol=1e-7, rtol=1e-6)
    assert ema.current_decay() == pytest.approx(2 / 11)
    ema.updates = 10**6
    assert ema.current_decay() == 0.9999
    with pytest.raises(ValueError):
        EMA(model, decay=1.0)


def test_ema_module_is_a_frozen_copy():
    model = small_net()
    ema = EMA(model, decay=0.5)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(model[0].weight, ema.module[0].weight)  # not shared storage
    state = ema.state_dict()
    fresh = EMA(small_net(), decay=0.5)
    fresh.load_state_dict(state)
    assert fresh.updates == ema.updates
    assert torch.equal(fresh.module[0].weight, ema.module[0].weight)
