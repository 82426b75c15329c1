"""The training loop (it learns, warms up, stops on NaN, splits batches across ranks, trains in reduced
precision, stops at a step or a time limit) and the EMA."""

import time

import pytest
import torch
from torch import nn

from ddpm import EMA, Diffusion, DiffusionConfig, TrainConfig, Trainer, UNet, UNetConfig, to_model_range, to_uint8
from ddpm.precision import resolve_precision, tf32

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


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_nan_loss_raises_naming_the_step(precision):
    images, _ = shapes(8, size=8)
    trainer = Trainer(NanAfter(3), Diffusion(DiffusionConfig(timesteps=10).betas()), images, None,
                      TrainConfig(epochs=5, batch_size=4, precision=precision), CPU)
    with pytest.raises(FloatingPointError, match="^training loss is nan at step 3; lower the learning rate"):
        trainer.fit(progress=False)  # under fp16 too: the loss scaler never makes the loss itself non-finite
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
    with pytest.raises(FloatingPointError, match=r"^training gradient norm is nan at step 1; lower the learning "
                       "rate, keep gradient clipping on or use fp32 precision$"):
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


def test_micro_batches_accumulate_the_gradient_two_processes_average():
    """Gradient accumulation: one process's two micro-batches give, bit for bit, the gradient that two
    processes' halves give averaged (DistributedDataParallel's mean), dropout included."""
    images, labels = shapes(12, size=8)
    diffusion = Diffusion(DiffusionConfig(timesteps=10).betas())
    def net():  # noqa: E306
        torch.manual_seed(0)
        return UNet(UNetConfig(image_size=8, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                               attention_resolutions=(4,), num_heads=2, dropout=0.3, num_classes=2))
    config = TrainConfig(batch_size=6, p_uncond=0.5)
    ranks = [Trainer(net(), diffusion, images, labels, config, CPU, seed=3, rank=r, world_size=2) for r in range(2)]
    single = Trainer(net(), diffusion, images, labels, TrainConfig(batch_size=6, p_uncond=0.5, micro_batches=2),
                     CPU, seed=3)
    for tr in ranks:
        tr.backward(tr.batch_indices(0, 1), tr.rank, 1)
    idx = single.batch_indices(0, 1)
    for j in range(2):
        single.backward(idx[j::2], j, 2)
    grads = [[p.grad for p in tr.net.parameters()] for tr in ranks]
    for g0, g1, p in zip(*grads, single.net.parameters(), strict=True):
        assert torch.equal((g0 + g1) / 2, p.grad)
    assert any(not torch.equal(g0, g1) for g0, g1 in zip(*grads))  # the halves differ: the sum is a real check
    single.train_step(idx)  # and a step of it runs: the mean loss, one optimizer step
    assert single.step == 1
    with pytest.raises(ValueError, match="2 processes x 2 micro-batches"):
        Trainer(tiny_unet(8), diffusion, images, None, TrainConfig(batch_size=6, micro_batches=2), CPU, world_size=2)


def test_epochs_and_callbacks():
    images, _ = shapes(9, size=8)
    trainer = Trainer(tiny_unet(8), Diffusion(DiffusionConfig(timesteps=10).betas()), images, None,
                      TrainConfig(epochs=2, batch_size=4), CPU)
    assert trainer.steps_per_epoch == 3 and trainer.total_steps == 6  # the last batch of an epoch is short
    ends = []
    trainer.fit(on_epoch_end=lambda tr, epoch: ends.append((epoch, tr.step)), progress=False)
    assert ends == [(0, 3), (1, 6)]


def test_a_step_budget_sizes_training_whatever_the_epochs():
    images, _ = shapes(9, size=8)
    trainer = Trainer(tiny_unet(8), Diffusion(DiffusionConfig(timesteps=10).betas()), images, None,
                      TrainConfig(epochs=50, steps=7, batch_size=4, guide_at=0.5), CPU)
    assert trainer.total_steps == 7 and trainer.guide_step == 4  # round(0.5 * 7): the guide follows the budget
    ends = []
    trainer.fit(on_epoch_end=lambda tr, epoch: ends.append((epoch, tr.step)), progress=False)
    assert trainer.step == 7 and ends == [(0, 3), (1, 6), (2, 7)]  # the budget ends inside epoch 2, and says so


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


def micro_unet(size: int = 8) -> UNet:
    """A UNet small enough for CPU float16, which is slow: one level, no attention."""
    torch.manual_seed(0)
    return UNet(UNetConfig(image_size=size, base_channels=8, channel_mults=(1,), num_res_blocks=1,
                           attention_resolutions=(), num_heads=1, dropout=0.0))


def test_step_seeds_are_unchanged_below_seed_2_24_and_distinct_above():
    images, _ = shapes(8, size=8)
    trainer = lambda seed: Trainer(micro_unet(), Diffusion(DiffusionConfig(timesteps=10).betas()), images, None,
                                   TrainConfig(epochs=1, batch_size=4), CPU, seed, rank=255)
    old = trainer(2**24 - 1)
    old.step = 2**32 - 1
    assert old.step_seed() == ((2**24 - 1) << 40) + ((2**32 - 1) << 8) + 255  # earlier runs stay bit-identical
    assert trainer(5).step_seed() != trainer(5 + 2**24).step_seed()  # the seed's bits above 24 are not dropped
    assert 0 <= trainer(2**63 - 1).step_seed() < 2**64


def fixed_loss(model: nn.Module, diffusion: Diffusion, images: torch.Tensor) -> float:
    """The fp32 loss on the same t and noise every time."""
    with torch.no_grad():
        return diffusion.loss(model, to_model_range(images), generator=torch.Generator().manual_seed(1)).mean().item()


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_steps_run_under_autocast_and_learn(precision, dtype):
    images, _ = shapes(32, size=8)
    diffusion = Diffusion(DiffusionConfig(timesteps=100).betas())
    trainer = Trainer(micro_unet(), diffusion, images, None,
                      TrainConfig(epochs=10, batch_size=16, lr=3e-3, warmup_steps=2, precision=precision), CPU)
    assert trainer.precision == precision and trainer.scaler.is_enabled() == (precision == "fp16")
    before = fixed_loss(trainer.net, diffusion, images)
    computed = set()
    hook = trainer.net.out[2].register_forward_hook(lambda module, args, out: computed.add(out.dtype))
    trainer.fit(progress=False)
    hook.remove()
    assert computed == {dtype}  # the network ran in the reduced precision...
    assert trainer.net.out[2].weight.dtype == torch.float32  # ...on float32 weights
    after = fixed_loss(trainer.net, diffusion, images)
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("precision, device, cuda_bf16, cpu_bf16, capability, expected", [
    ("auto", "cuda", True, False, "AVX2", "bf16"),
    ("auto", "cuda", False, True, "AVX512", "fp16"),       # e.g. a V100 or T4: fp16 tensor cores, no bf16
    ("auto", "cpu", False, True, "AVX512", "bf16"),        # AVX512-BF16 or AMX
    ("auto", "cpu", False, True, "AVX2", "fp32"),          # emulated bf16, ~16x slower than fp32
    ("auto", "cpu", False, False, "AVX512", "fp32"),
    ("auto", "mps", True, True, "DEFAULT", "fp32"),
    ("tf32", "cuda", True, True, "AVX512", "tf32"),
    ("tf32", "cpu", True, True, "AVX512", "fp32"),         # TensorFloat-32 is a CUDA tensor-core format
    ("fp32", "cuda", True, True, "AVX512", "fp32"),
    ("bf16", "cpu", False, False, "AVX2", "bf16"),         # asked for explicitly: kept, however slow
    ("fp16", "cpu", False, False, "AVX2", "fp16"),
])
def test_resolve_precision(monkeypatch, precision, device, cuda_bf16, cpu_bf16, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: cuda_bf16)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: cpu_bf16)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert resolve_precision(precision, torch.device(device)) == expected


def test_unknown_precision_is_refused_naming_the_allowed_ones():
    images, _ = shapes(8, size=8)
    with pytest.raises(ValueError, match=r"unknown precision 'fp8'; valid: fp32, tf32, bf16, fp16, auto"):
        Trainer(micro_unet(), Diffusion(DiffusionConfig(timesteps=10).betas()), images, None,
                TrainConfig(precision="fp8"), CPU)


def test_tf32_switches_cuda_matmuls_and_convolutions_inside_the_block_only():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    for enabled in (True, False):
        with tf32(enabled):
            assert torch.backends.cuda.matmul.allow_tf32 is enabled and torch.backends.cudnn.allow_tf32 is enabled
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_fp16_skips_a_step_whose_gradients_overflow_until_the_loss_scale_falls_below_one():
    images, _ = shapes(8, size=8)
    model = InfiniteGradient()  # a NaN gradient at every step, at any loss scale
    trainer = Trainer(model, Diffusion(DiffusionConfig(timesteps=10).betas()), images, None,
                      TrainConfig(epochs=20, batch_size=4, precision="fp16"), CPU)
    trainer.train_step(trainer.batch_indices(0, 0))  # as the scaler does at the start of every fp16 run
    assert trainer.step == 1 and model.w.item() == 0 and model.z.item() == 0
    assert trainer.scaler.get_scale() == 2.0**15
    with pytest.raises(FloatingPointError, match=r"^training gradient norm is nan at step 18 at fp16 loss scale "
                       r"0.5; lower the learning rate"):
        trainer.fit(progress=False)  # 65536 halved 17 times
    assert trainer.step == 17 and model.w.item() == 0


def test_fp16_resume_is_exact_and_keeps_the_loss_scale():
    images, _ = shapes(16, size=8)
    config = TrainConfig(epochs=2, batch_size=8, lr=3e-3, warmup_steps=1, precision="fp16")

    def trainer():
        return Trainer(micro_unet(), Diffusion(DiffusionConfig(timesteps=10).betas()), images, None, config, CPU)

    straight, first, resumed = trainer(), trainer(), trainer()
    straight.fit(progress=False)
    first.fit(progress=False, max_steps=2)
    resumed.load_state_dict(first.state_dict())
    resumed.fit(progress=False)
    assert resumed.step == straight.step == 4
    for a, b in zip(resumed.net.state_dict().values(), straight.net.state_dict().values()):
        assert torch.equal(a, b)
    # the scale is part of the state: a resumed run goes on at the scale it had reached, not at a fresh 2^16
    first.scaler.update(2.0**10)
    again = trainer()
    again.load_state_dict(first.state_dict())
    assert again.scaler.get_scale() == 2.0**10 and again.scaler.state_dict() == first.scaler.state_dict()


def test_channels_last_trains_the_same_network_in_the_other_memory_format():
    images, _ = shapes(8, size=8)
    losses = []
    for channels_last in (False, True):
        trainer = Trainer(micro_unet(), Diffusion(DiffusionConfig(timesteps=10).betas()), images, None,
                          TrainConfig(epochs=1, batch_size=8, warmup_steps=1, channels_last=channels_last), CPU)
        weight = trainer.net.out[2].weight  # (1, 8, 3, 3): the two formats differ
        assert weight.is_contiguous(memory_format=torch.channels_last) == channels_last != weight.is_contiguous()
        losses.append([trainer.train_step(torch.arange(8)).item() for _ in range(2)])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_compile_compiles_the_training_forward_and_keeps_the_plain_network_for_the_rest(monkeypatch):
    compiled, calls = [], []

    def fake_compile(model):  # torch.compile itself takes minutes on a small CPU
        compiled.append(model)
        return lambda *args, **kwargs: calls.append(1) or model(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", fake_compile)
    images, _ = shapes(8, size=8)
    trainer = Trainer(micro_unet(), Diffusion(DiffusionConfig(timesteps=10).betas()), images, None,
                      TrainConfig(epochs=1, batch_size=4, compile=True), CPU)
    trainer.fit(progress=False)
    assert compiled == [trainer.model] and len(calls) == trainer.step == 2
    assert trainer.state_dict()["model"].keys() == micro_unet().state_dict().keys()  # no "_orig_mod." prefix


def test_fit_stops_at_max_steps_and_resumes_up_to_total_steps():
    images, _ = shapes(9, size=8)
    trainer = Trainer(NanAfter(10**9), Diffusion(DiffusionConfig(timesteps=10).betas()), images, None,
                      TrainConfig(epochs=2, batch_size=4), CPU)
    ends = []
    trainer.fit(on_epoch_end=lambda tr, epoch: ends.append(tr.step), progress=False, max_steps=4)
    assert trainer.step == 4 and ends == [3]
    trainer.fit(on_epoch_end=lambda tr, epoch: ends.append(tr.step), progress=False, max_steps=100)
    assert trainer.step == trainer.total_steps == 6 and ends == [3, 6]  # never past total_steps


def test_fit_stops_at_the_end_of_the_step_that_passes_the_time_limit(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    images, _ = shapes(8, size=8)
    trainer = Trainer(NanAfter(10**9), Diffusion(DiffusionConfig(timesteps=10).betas()), images, None,
                      TrainConfig(epochs=100, batch_size=4), CPU)

    def one_second_per_step(tr, loss, seconds):
        clock[0] += 1.0

    trainer.fit(one_second_per_step, progress=False, seconds=2.5)
    assert trainer.step == 3  # steps start at 0, 1 and 2 s
    trainer.fit(one_second_per_step, progress=False, seconds=0)
    assert trainer.step == 3
    trainer.fit(one_second_per_step, progress=False, seconds=10, max_steps=5)
    assert trainer.step == 5  # whichever comes first


def test_posthoc_snapshots_are_evenly_spaced_and_resume_exactly():
    """Post-hoc EMA: posthoc_snapshots records per tracked width, the last at the last step equal to the
    tracked EMA there; a run stopped midway and resumed from its state ends with the same snapshots."""
    images, _ = shapes(8, size=8)
    config = TrainConfig(epochs=6, batch_size=4, lr=1e-3, warmup_steps=1, posthoc_sigma_rels=(0.05, 0.1),
                         posthoc_snapshots=4)

    def trainer():
        return Trainer(tiny_unet(8), Diffusion(DiffusionConfig(timesteps=10).betas()), images, None, config, CPU)

    straight = trainer()
    straight.fit(progress=False)
    assert straight.snapshot_steps == {3, 6, 9, 12}
    assert [(s["t"], s["sigma_rel"]) for s in straight.snapshots] == [(t, w) for t in (3, 6, 9, 12)
                                                                      for w in (0.05, 0.1)]
    last = straight.snapshots[-1]["state"]
    assert all(torch.equal(last[k], v) for k, v in straight.posthoc.modules[1].state_dict().items())
    assert not torch.equal(straight.snapshots[0]["state"]["out.2.weight"], last["out.2.weight"])

    first = trainer()
    first.fit(progress=False, max_steps=7)
    resumed = trainer()
    resumed.load_state_dict(first.state_dict())
    resumed.fit(progress=False)
    assert len(resumed.snapshots) == 8
    for a, b in zip(resumed.snapshots, straight.snapshots):
        assert a["t"] == b["t"] and all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])


def test_a_memory_mapped_dataset_trains_exactly_as_one_in_memory(tmp_path):
    """The trainer keeps the images where they are (no copy onto the device) and reads each step's batch:
    a memory-mapped prepared file trains bit-identically to the same tensors in memory."""
    from ddpm import atomic_save, safe_load

    images, labels = shapes(16, size=8)
    atomic_save({"images": images, "labels": labels}, tmp_path / "train.pt")
    mapped = safe_load(tmp_path / "train.pt", ("images", "labels"), mmap=True)
    config = TrainConfig(epochs=2, batch_size=4, lr=1e-3, warmup_steps=1)
    runs = []
    for x, y in ((images, labels), (mapped["images"], mapped["labels"])):
        trainer = Trainer(tiny_unet(8, num_classes=2), Diffusion(DiffusionConfig(timesteps=10).betas()), x, y,
                          config, CPU)
        assert trainer.images.data_ptr() == x.data_ptr()
        trainer.fit(progress=False)
        runs.append(trainer.ema.module.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
