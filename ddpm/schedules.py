"""Noise schedules: pure functions returning beta_t, t = 0..T-1, as float64 tensors."""

import math

import torch


def linear(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Linear betas of Ho et al. 2020 (sec. 4): 1e-4 -> 0.02 over T = 1000 by default. Shape (T,)."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule of Nichol & Dhariwal 2021 (eq. 17): alpha_bar(t) = f(t)/f(0),
    f(t) = cos^2(((t/T + s)/(1 + s)) * pi/2); betas clipped at `max_beta`. Shape (T,)."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


SCHEDULES = {"linear": linear, "cosine": cosine}


def make_betas(name: str, timesteps: int, **kwargs) -> torch.Tensor:
    """The betas of schedule `name` ("linear" or "cosine") over `timesteps` steps, float64 (T,)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    return SCHEDULES[name](timesteps, **kwargs)
