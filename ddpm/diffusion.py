"""The Gaussian diffusion process of Ho et al. 2020 (DDPM).

Vocabulary used throughout `ddpm`:
    x0         clean image in [-1, 1], (B, C, H, W)
    x_t        noisy image at timestep t
    t          integer timestep in [0, T), (B,); t = 0 is the least noisy step
    eps        standard Gaussian noise, or the network's prediction of it
    alpha_bar  cumulative product of (1 - beta) up to and including t
    y          integer class label, (B,); NULL_LABEL means "no class" (classifier-free guidance)
    w          guidance weight
The network is passed in, never owned: `model(x_t, t, y=None) -> eps`.
"""

from dataclasses import dataclass

import torch
from torch import nn

from .schedules import make_betas

NULL_LABEL = -1


@dataclass(frozen=True)
class DiffusionConfig:
    schedule: str = "linear"
    timesteps: int = 1000
    beta_start: float | None = None  # linear only; None: 1e-4 * 1000 / T
    beta_end: float | None = None    # linear only; None: 0.02 * 1000 / T

    def betas(self) -> torch.Tensor:
        """The schedule's betas. Unset linear ends scale with 1000 / T (Nichol & Dhariwal 2021), so
        that any T ends as close to pure noise as Ho et al.'s T = 1000 does."""
        if self.schedule != "linear":
            return make_betas(self.schedule, self.timesteps)
        scale = 1000 / self.timesteps
        start = self.beta_start if self.beta_start is not None else 1e-4 * scale
        end = self.beta_end if self.beta_end is not None else min(0.02 * scale, 0.999)
        return make_betas("linear", self.timesteps, beta_start=start, beta_end=end)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def extract(a: torch.Tensor, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Gather a[t] for a batch of timesteps and reshape to broadcast over `shape`: (B, 1, 1, 1)."""
    return a.gather(0, t).reshape(t.shape[0], *([1] * (len(shape) - 1)))


class Diffusion(nn.Module):
    """Holds a beta schedule as buffers (computed in float64, stored float32)."""

    def __init__(self, betas: torch.Tensor):
        super().__init__()
        betas = betas.to(torch.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must be a 1-D tensor with values in (0, 1)")
        alphas = 1.0 - betas
        alpha_bar = torch.cumprod(alphas, 0)
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        self.timesteps = betas.shape[0]

        def buffer(name: str, value: torch.Tensor) -> None:
            self.register_buffer(name, value.to(torch.float32), persistent=False)

        buffer("betas", betas)
        # forward process q(x_t | x_0) (Ho et al. eq. 4)
        buffer("alpha_bar", alpha_bar)
        buffer("alpha_bar_prev", alpha_bar_prev)
        buffer("sqrt_alpha_bar", alpha_bar.sqrt())
        buffer("sqrt_one_minus_alpha_bar", (1.0 - alpha_bar).sqrt())
        buffer("sqrt_recip_alpha_bar", (1.0 / alpha_bar).sqrt())
        buffer("sqrt_recip_alpha_bar_m1", (1.0 / alpha_bar - 1.0).sqrt())
        # posterior q(x_{t-1} | x_t, x_0) (Ho et al. eqs. 6-7)
        posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        buffer("posterior_variance", posterior_variance)
        buffer("posterior_coef_x0", betas * alpha_bar_prev.sqrt() / (1.0 - alpha_bar))
        buffer("posterior_coef_xt", (1.0 - alpha_bar_prev) * alphas.sqrt() / (1.0 - alpha_bar))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (eq. 4). All (B, C, H, W)."""
        return (extract(self.sqrt_alpha_bar, t, x0.shape) * x0
                + extract(self.sqrt_one_minus_alpha_bar, t, x0.shape) * eps)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert q_sample: x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        return (extract(self.sqrt_recip_alpha_bar, t, x_t.shape) * x_t
                - extract(self.sqrt_recip_alpha_bar_m1, t, x_t.shape) * eps)

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean and variance of q(x_{t-1} | x_t, x0) (eqs. 6-7): ((B, C, H, W), (B, 1, 1, 1))."""
        mean = (extract(self.posterior_coef_x0, t, x_t.shape) * x0
                + extract(self.posterior_coef_xt, t, x_t.shape) * x_t)
        return mean, extract(self.posterior_variance, t, x_t.shape)

    def loss(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor | None = None,
             p_uncond: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-example simple loss ||eps - eps_theta(x_t, t, y)||^2 (Ho et al. eq. 14), (B,).

        With probability `p_uncond` a label is replaced by NULL_LABEL, so one network learns both
        the conditional and the unconditional model (Ho & Salimans 2022)."""
        t = torch.randint(0, self.timesteps, (x0.shape[0],), device=x0.device, generator=generator)
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = self.q_sample(x0, t, eps)
        if y is not None and p_uncond > 0:
            drop = torch.rand(y.shape, device=y.device, generator=generator) < p_uncond
            y = torch.where(drop, torch.full_like(y, NULL_LABEL), y)
        eps_pred = model(x_t, t, y)
        return (eps_pred.float() - eps).pow(2).flatten(1).mean(1)
