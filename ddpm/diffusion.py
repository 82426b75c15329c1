"""The Gaussian diffusion process of Ho et al. 2020 (DDPM).

Vocabulary used throughout `ddpm`:
    x0         clean image in [-1, 1], (B, C, H, W)
    x_t        noisy image at timestep t
    t          integer timestep in [0, T), (B,); t = 0 is the least noisy step
    eps        standard Gaussian noise, or the network's prediction of it
    alpha_bar  cumulative product of (1 - beta) up to and including t
    v          the velocity sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 (Salimans & Ho 2022)
    snr        signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t)
    y          integer class label, (B,); NULL_LABEL means "no class" (classifier-free guidance)
    w          guidance weight
The network is passed in, never owned: `model(x_t, t, y=None)` predicts eps, or v when the diffusion's
`prediction` is "v"; `Diffusion.eps_and_x0` turns either into (eps, x0).
"""

from dataclasses import dataclass

import torch
from torch import nn

from .schedules import make_betas

NULL_LABEL = -1
PREDICTIONS = ("eps", "v")
# Memory per timestep that building a Diffusion takes (float64 intermediates and the float32 buffers; 110 bytes
# measured for both schedules): the bounds on T count this much, a lower bound.
SCHEDULE_BYTES = 100


@dataclass(frozen=True)
class DiffusionConfig:
    schedule: str = "linear"
    timesteps: int = 1000
    beta_start: float | None = None  # linear only; None: 1e-4 * 1000 / T
    beta_end: float | None = None    # linear only; None: 0.02 * 1000 / T
    prediction: str = "eps"          # what the network predicts: "eps" (Ho et al.) or "v" (Salimans & Ho)

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
    """Holds a beta schedule as buffers (computed in float64, stored float32) and the network's
    prediction target ("eps" or "v")."""

    def __init__(self, betas: torch.Tensor, prediction: str = "eps"):
        super().__init__()
        betas = betas.to(torch.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must be a 1-D tensor with values in (0, 1)")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        self.prediction = prediction
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
        buffer("snr", alpha_bar / (1.0 - alpha_bar))
        buffer("log_snr", (alpha_bar / (1.0 - alpha_bar)).log())  # decreasing in t
        # posterior q(x_{t-1} | x_t, x_0) (Ho et al. eqs. 6-7)
        posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        buffer("posterior_variance", posterior_variance)
        buffer("posterior_coef_x0", betas * alpha_bar_prev.sqrt() / (1.0 - alpha_bar))
        buffer("posterior_coef_xt", (1.0 - alpha_bar_prev) * alphas.sqrt() / (1.0 - alpha_bar))

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> "Diffusion":
        return cls(config.betas(), config.prediction)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (eq. 4). All (B, C, H, W)."""
        return (extract(self.sqrt_alpha_bar, t, x0.shape) * x0
                + extract(self.sqrt_one_minus_alpha_bar, t, x0.shape) * eps)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert q_sample: x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        return (extract(self.sqrt_recip_alpha_bar, t, x_t.shape) * x_t
                - extract(self.sqrt_recip_alpha_bar_m1, t, x_t.shape) * eps)

    def eps_and_x0(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor):
        """The network output `out` as (eps, x0). For v-prediction (Salimans & Ho 2022, sec. 4):
        x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v and eps = sqrt(1 - alpha_bar) x_t + sqrt(alpha_bar) v."""
        if self.prediction == "eps":
            return out, self.predict_x0(x_t, t, out)
        a, s = extract(self.sqrt_alpha_bar, t, x_t.shape), extract(self.sqrt_one_minus_alpha_bar, t, x_t.shape)
        return s * x_t + a * out, a * x_t - s * out

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean and variance of q(x_{t-1} | x_t, x0) (eqs. 6-7): ((B, C, H, W), (B, 1, 1, 1))."""
        mean = (extract(self.posterior_coef_x0, t, x_t.shape) * x0
                + extract(self.posterior_coef_xt, t, x_t.shape) * x_t)
        return mean, extract(self.posterior_variance, t, x_t.shape)

    def sample_t(self, n: int, device, generator: torch.Generator | None = None,
                 logsnr_normal: tuple[float, float] | None = None) -> torch.Tensor:
        """n training timesteps (n,): uniform over [0, T), or with log-SNR ~ N(mean, std^2) for
        `logsnr_normal` = (mean, std), each mapped to the first t at or below it (clamped to [0, T)).
        Karras et al. 2022 (EDM, sec. 5) draw ln sigma ~ N(-1.2, 1.2^2), i.e. log-SNR ~ N(2.4, 2.4^2): the
        training compute goes to the noise levels that matter, not to the nearly clean or pure-noise ends."""
        if logsnr_normal is None:
            return torch.randint(0, self.timesteps, (n,), device=device, generator=generator)
        mean, std = logsnr_normal
        target = mean + std * torch.randn(n, device=device, generator=generator)
        return torch.searchsorted(-self.log_snr, -target).clamp(max=self.timesteps - 1)

    def loss(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor | None = None,
             p_uncond: float = 0.0, generator: torch.Generator | None = None,
             min_snr_gamma: float = 0.0, logsnr_normal: tuple[float, float] | None = None) -> torch.Tensor:
        """Per-example simple loss ||target - model(x_t, t, y)||^2 (Ho et al. eq. 14), (B,); the
        target is eps or v, as `prediction` says.

        min_snr_gamma > 0 weights each example by min(snr_t, gamma) / snr_t for eps, and by
        min(snr_t, gamma) / (snr_t + 1) for v (Min-SNR-gamma, Hang et al. 2023). Both make it
        min(snr_t, gamma) ||x0 - x0_pred||^2: the x0 error, weighted as the plain loss does up to snr gamma
        and no more, so that the nearly noiseless steps stop dominating the gradient.
        With probability `p_uncond` a label is replaced by NULL_LABEL, so one network learns both
        the conditional and the unconditional model (Ho & Salimans 2022). t is drawn by `sample_t`."""
        t = self.sample_t(x0.shape[0], x0.device, generator, logsnr_normal)
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = self.q_sample(x0, t, eps)
        if y is not None and p_uncond > 0:
            drop = torch.rand(y.shape, device=y.device, generator=generator) < p_uncond
            y = torch.where(drop, torch.full_like(y, NULL_LABEL), y)
        if self.prediction == "eps":
            target = eps
        else:
            target = (extract(self.sqrt_alpha_bar, t, x0.shape) * eps
                      - extract(self.sqrt_one_minus_alpha_bar, t, x0.shape) * x0)
        loss = (model(x_t, t, y).float() - target).pow(2).flatten(1).mean(1)
        if min_snr_gamma > 0:
            snr = self.snr[t]
            loss = loss * snr.clamp(max=min_snr_gamma) / (snr if self.prediction == "eps" else snr + 1)
        return loss
