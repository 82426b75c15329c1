"""The training loop: AdamW, lr warm-up (and optional cosine decay), gradient clipping, EMA, a choice of
numeric precision (fp32, TF32, bf16 or fp16 autocast), an early EMA snapshot as the guide model for
autoguidance, and optionally power-function EMAs with snapshots for post-hoc EMA (ddpm.posthoc_ema).

The network, the diffusion and the data are passed in; the loop never writes files. A stage
script observes it through callbacks (logging, checkpoints, sample grids) and can save and
restore its whole state (`state_dict`), so a resumed run continues exactly where it stopped.
Data parallelism: give each process its `rank` and `world_size`; every rank draws the same
epoch permutation and takes its own slice of each global batch. Gradient accumulation (`micro_batches`)
splits a process's slice further, one backward pass each: micro-batch j of rank r is the slice of "virtual
rank" r + j x world_size, with that rank's random draws, so W processes of k micro-batches train as W x k
processes would (bit for bit at W x k = 2; for more, up to the order in which gradients are summed).
The images stay where the caller keeps them (a memory-mapped file's tensor is read only where indexed):
each step moves its rank's share of the batch to the device, so a dataset larger than the device's memory
trains.
"""

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .diffusion import Diffusion, to_model_range
from .ema import EMA
from .noise import fold_seed
from .posthoc_ema import PowerEMA
from .precision import AUTOCAST, resolve_precision, tf32

LR_SCHEDULES = ("constant", "cosine")
DROPOUT_SALT = 0x5DEECE66D  # xored into a step's seed for its dropout masks


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    steps: int | None = None    # optimizer steps to train (the same training on any dataset size); None: epochs
    batch_size: int = 128       # global batch, split across data-parallel processes
    micro_batches: int = 1      # backward passes per process and step (gradient accumulation: less memory)
    lr: float = 2e-4
    warmup_steps: int = 500
    lr_schedule: str = "constant"  # after warm-up: "constant", or "cosine" decay to 0 at the last step
    weight_decay: float = 0.0
    grad_clip: float = 1.0      # max gradient norm; 0 disables clipping
    ema_decay: float = 0.9999
    p_uncond: float = 0.1       # label drop rate for classifier-free guidance (conditional models)
    min_snr_gamma: float = 0.0  # Min-SNR-gamma loss weighting (Hang et al. 2023); 0: the plain loss
    logsnr_normal: tuple[float, ...] | None = None  # (mean, std): training t with log-SNR ~ N; None: uniform t
    precision: str = "fp32"     # fp32 | tf32 | bf16 | fp16 | auto (see PRECISIONS, resolve_precision)
    compile: bool = False       # torch.compile the model for the training step
    channels_last: bool = False  # channels-last memory format for CUDA convolutions (slower on CPUs); under
                                 # DistributedDataParallel, convert the network before wrapping it
    guide_at: float = 0.0       # keep the EMA weights at this fraction of training as the guide model; 0: none
    posthoc_sigma_rels: tuple[float, ...] = ()  # power-function EMA widths tracked for post-hoc EMA; (): none
    posthoc_snapshots: int = 0  # snapshots of them kept, evenly spaced over training, the last at the last step


class Trainer:
    """Trains `model` on uint8 images (N, C, H, W) with optional labels (N,)."""

    def __init__(self, model: nn.Module, diffusion: Diffusion, images: torch.Tensor,
                 labels: torch.Tensor | None, config: TrainConfig, device: torch.device, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if config.batch_size % (world_size * config.micro_batches):
            raise ValueError(f"batch_size {config.batch_size} is not divisible by {world_size} processes x "
                             f"{config.micro_batches} micro-batches")
        self.precision = resolve_precision(config.precision, device)  # what `config.precision` means here
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model, self.diffusion, self.config, self.device = model, diffusion.to(device), config, device
        self.images, self.labels = images, labels  # uint8 (N, C, H, W) and (N,), on the CPU or memory-mapped
        self.seed, self.rank, self.world_size = seed, rank, world_size
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        # under DistributedDataParallel, `model` is the wrapper and `net` the network it wraps
        self.net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self.ema = EMA(self.net, config.ema_decay)
        # post-hoc EMA: the tracked profiles, and their snapshots so far (PowerEMA.snapshot records)
        self.posthoc = PowerEMA(self.net, config.posthoc_sigma_rels) if config.posthoc_sigma_rels else None
        self.snapshots: list[dict] = []
        # the training step's forward: compiled (sharing the weights) or the model itself
        self.train_model = torch.compile(model) if config.compile else model
        # fp16 only: scales the loss so that small gradients survive float16, and skips a step whose scaled
        # gradients overflowed (then halves the scale); a no-op otherwise
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.step = 0
        # the EMA weights at guide_step, frozen: a worse version of the final model for autoguidance
        self.guide: nn.Module | None = None
        # where the cosine decay reaches 0: total_steps, unless a caller that trains for a wall-clock
        # budget sets it (and re-estimates it as it goes)
        self.schedule_steps: int | None = None
        self.generator = torch.Generator(device)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.images) / self.config.batch_size)

    @property
    def total_steps(self) -> int:
        return self.config.steps or self.config.epochs * self.steps_per_epoch

    @property
    def guide_step(self) -> int | None:
        """The step after which the EMA weights are kept as the guide (None: guide_at is 0): guide_at of
        `schedule_steps` (a wall-clock budget's estimate) or of total_steps, at least 1."""
        if not self.config.guide_at:
            return None
        return max(1, round(self.config.guide_at * (self.schedule_steps or self.total_steps)))

    @property
    def snapshot_steps(self) -> set[int]:
        """The steps after which the post-hoc EMA profiles are snapshot: posthoc_snapshots of them, evenly
        spaced over `schedule_steps` or total_steps, the last at its end."""
        if self.posthoc is None or not self.config.posthoc_snapshots:
            return set()
        end, n = self.schedule_steps or self.total_steps, self.config.posthoc_snapshots
        return {max(1, round(end * (i + 1) / n)) for i in range(n)}

    def lr_at(self, step: int) -> float:
        """Linear warm-up over `warmup_steps` (Ho et al. 2020 use 5000), then constant, or for
        lr_schedule "cosine" lr * (1 + cos(pi * p)) / 2 with p going from 0 after warm-up to 1 at
        `schedule_steps` (default total_steps; Loshchilov & Hutter 2017, without restarts)."""
        warmup = max(1, self.config.warmup_steps)
        lr = self.config.lr * min(1.0, (step + 1) / warmup)
        if self.config.lr_schedule == "cosine":
            end = self.schedule_steps or self.total_steps
            progress = min(1.0, max(0.0, (step - warmup) / max(1, end - warmup)))
            lr *= 0.5 * (1 + math.cos(math.pi * progress))
        return lr

    def batch_indices(self, epoch: int, i: int) -> torch.Tensor:
        """This rank's slice of global batch i of `epoch` (same permutation on every rank)."""
        perm = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(self.seed + epoch))
        batch = perm[i * self.config.batch_size:(i + 1) * self.config.batch_size]
        return batch[self.rank::self.world_size]

    def step_seed(self, rank: int | None = None) -> int:
        """The seed of this step's t and noise on `rank` (default this process's): (seed << 40) + (step << 8) +
        rank, folded into the 64 bits torch takes. Below seed 2**24 nothing is folded, so those runs stay
        bit-identical."""
        return fold_seed((self.seed << 40) + (self.step << 8) + (self.rank if rank is None else rank))

    def train_step(self, idx: torch.Tensor) -> torch.Tensor:
        """One optimizer step on the images at `idx` (this process's slice of the global batch), in
        config.micro_batches backward passes; returns the mean loss (a 0-d tensor)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        k, ddp = self.config.micro_batches, isinstance(self.model, nn.parallel.DistributedDataParallel)
        parts = [(idx[j::k], self.rank + j * self.world_size) for j in range(k) if j < len(idx)]
        losses = []
        for n, (part, rank) in enumerate(parts):  # gradients averaged over processes once, after the last
            with self.model.no_sync() if ddp and n < len(parts) - 1 else contextlib.nullcontext():
                losses.append(self.backward(part, rank, k))
        loss = torch.stack(losses).mean() if k > 1 else losses[0]
        self.scaler.unscale_(self.optimizer)  # fp16: the true gradients, to clip and check
        # the gradient norm, clipped to grad_clip (0: not clipped): a finite loss can have inf/NaN gradients
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip or math.inf)
        self.check_finite(loss, norm)
        self.scaler.step(self.optimizer)  # fp16: skipped when the scaled gradients overflowed
        self.scaler.update()
        self.ema.update(self.net)
        self.step += 1
        if self.posthoc is not None:
            self.posthoc.update(self.net)
            if self.step in self.snapshot_steps:
                self.snapshots += self.posthoc.snapshot()
        if self.guide is None and self.guide_step is not None and self.step >= self.guide_step:
            self.guide = copy.deepcopy(self.ema.module)
        return loss

    def backward(self, idx: torch.Tensor, rank: int, micro_batches: int) -> torch.Tensor:
        """Accumulate the gradient of the mean loss on the images at `idx`, divided by `micro_batches` (a
        power of two divides exactly, as DistributedDataParallel's average over processes does); returns
        that mean loss. Its random draws (t, noise, dropped labels, dropout) depend only on (seed, step,
        rank): exact resumes, distinct ranks."""
        x0 = to_model_range(self.images[idx].to(self.device, non_blocking=True))
        y = self.labels[idx].to(self.device, non_blocking=True) if self.labels is not None else None
        seed = self.step_seed(rank)
        self.generator.manual_seed(seed)
        torch.manual_seed(seed ^ DROPOUT_SALT)  # dropout's stream, another than the noise's
        with tf32(self.precision == "tf32") if self.device.type == "cuda" else contextlib.nullcontext():
            dtype = AUTOCAST.get(self.precision)
            with torch.autocast(self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = self.diffusion.loss(self.train_model, x0, y, self.config.p_uncond, self.generator,
                                           self.config.min_snr_gamma, self.config.logsnr_normal).mean()
            self.scaler.scale(loss / micro_batches if micro_batches > 1 else loss).backward()
        return loss.detach()

    def check_finite(self, loss: torch.Tensor, norm: torch.Tensor) -> None:
        """Raise FloatingPointError on a non-finite loss or gradient norm (one host sync), before the weights
        change. Under fp16 an overflow of the scaled gradients is the scaler's to handle (it skips the
        step and halves the scale, as it does in the first steps of every run), until the scale falls below
        1: gradients that overflow even unscaled mean the run diverged. A non-finite loss always does."""
        finite_loss, finite_norm = torch.isfinite(torch.stack([loss.detach().float(), norm.float()])).tolist()
        if finite_loss and (finite_norm or (self.scaler.is_enabled() and self.scaler.get_scale() >= 1)):
            return
        what, value = ("loss", loss) if not finite_loss else ("gradient norm", norm)
        scale = f" at fp16 loss scale {self.scaler.get_scale():g}" if self.scaler.is_enabled() and finite_loss else ""
        raise FloatingPointError(f"training {what} is {value.item()} at step {self.step + 1}{scale}; lower the "
                                 "learning rate, keep gradient clipping on or use fp32 precision")

    def fit(self, on_step: Callable | None = None, on_epoch_end: Callable | None = None,
            progress: bool = True, max_steps: int | None = None, seconds: float | None = None) -> None:
        """Train from `self.step` (0, or where a checkpoint left off) until `total_steps`, or earlier: at
        step `max_steps`, or at the end of the first step that ends `seconds` of wall clock after the call.

        on_step(trainer, loss: float, seconds: float) after every step;
        on_epoch_end(trainer, epoch: int) after every epoch (epochs count from 0), and after the last step of
        a `config.steps` budget that ends inside an epoch."""
        self.model.train()
        stop = self.total_steps if max_steps is None else min(self.total_steps, max_steps)
        deadline = math.inf if seconds is None else time.perf_counter() + seconds
        # a context manager, so that an error is printed below the bar, not glued to its end
        with tqdm(total=stop if seconds is None else None, initial=self.step, desc="train", disable=not progress,
                  dynamic_ncols=True) as bar:
            while self.step < stop and time.perf_counter() < deadline:
                epoch, i = divmod(self.step, self.steps_per_epoch)
                start = time.perf_counter()
                loss = self.train_step(self.batch_indices(epoch, i))
                if self.world_size > 1:  # report the global batch's loss, the same on every rank
                    torch.distributed.all_reduce(loss)
                    loss = loss / self.world_size
                loss = loss.item()
                seconds = time.perf_counter() - start
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch)
                if on_step:
                    on_step(self, loss, seconds)
                if on_epoch_end and (self.step % self.steps_per_epoch == 0 or self.step == self.total_steps):
                    on_epoch_end(self, epoch)

    def state_dict(self) -> dict:
        state = {"model": self.net.state_dict(), "ema": self.ema.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "step": self.step, "torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        if self.guide is not None:
            state["guide"] = self.guide.state_dict()
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        if self.posthoc is not None:
            state["posthoc"], state["snapshots"] = self.posthoc.state_dict(), self.snapshots
        return state

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.posthoc is not None:
            self.posthoc.load_state_dict(state["posthoc"])
            self.snapshots = list(state["snapshots"])
        if "guide" in state:
            self.guide = copy.deepcopy(self.ema.module)
            self.guide.load_state_dict(state["guide"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
