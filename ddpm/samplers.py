"""Samplers: ancestral DDPM (Ho et al. 2020), DDIM (Song et al. 2020) and DPM-Solver++(2M) (Lu et al. 2022).

Each sampler is a function of (model, diffusion, x_T, options, generator) and returns the final x0,
or (x0, trajectory) when `return_trajectory=True`, where trajectory holds x_t before every step plus
the result, and the model's x0 prediction at every step. A sampler calls `model(x_t, t, y)` and knows
nothing of guidance: a guided model (`ddpm.guidance`) is passed in as the model. `generate` draws many
images in batches with per-image noise (`ddpm.noise`) and refuses a result that is not finite.
"""

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from .diffusion import Diffusion, to_uint8
from .noise import ImageGenerator, randn

SPACINGS = ("uniform", "trailing", "quadratic", "logsnr")
METHODS = ("ddpm", "ddim", "dpmsolver")  # dpmsolver: DPM-Solver++(2M), deterministic like DDIM with eta = 0
DEFAULT_STEPS = 50  # DDIM's and DPM-Solver's steps unless told


class Trajectory:
    """What a sampler visited, kept only when asked: x_t before every step plus the result, and the x0
    prediction at every step."""

    def __init__(self, x_T: torch.Tensor, keep: bool):
        self.keep, self.x_t, self.x0 = keep, [x_T], []

    def step(self, x: torch.Tensor, x0: torch.Tensor) -> None:
        """Record one step: the x_t it led to and the x0 it predicted."""
        if self.keep:
            self.x_t.append(x)
            self.x0.append(x0)

    def result(self, x: torch.Tensor):
        """The sampler's return value: x, or (x, {"x_t": [...], "x0": [...]}) when kept."""
        return (x, {"x_t": self.x_t, "x0": self.x0}) if self.keep else x


@torch.no_grad()
def ddpm_sample(model: nn.Module, diffusion: Diffusion, x_T: torch.Tensor, y: torch.Tensor | None = None,
                generator=None, return_trajectory: bool = False, variance: str = "posterior",
                clip_x0: bool = False, progress: bool = False):
    """Ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2). x_T (B, C, H, W) -> x0.

    variance "posterior": sigma_t^2 = beta~_t (eq. 7); "beta": sigma_t^2 = beta_t."""
    if variance not in ("posterior", "beta"):
        raise ValueError(f"unknown variance {variance!r}; valid: posterior, beta")
    x, trajectory = x_T, Trajectory(x_T, return_trajectory)
    for i in tqdm(reversed(range(diffusion.timesteps)), total=diffusion.timesteps,
                  desc="DDPM", disable=not progress, leave=False):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        # 1. predict the noise and x0 (eq. 15)
        _, x0 = diffusion.eps_and_x0(x, t, model(x, t, y).float())
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        # 2. posterior mean mu~(x_t, x0) (eq. 7), then add sigma_t z; no noise at the last step
        mean, var = diffusion.posterior(x0, x, t)
        if variance == "beta":
            var = diffusion.betas[i].expand_as(var)
        z = randn(x.shape, generator, x.device)
        x = mean + (var.sqrt() * z if i > 0 else 0)
        trajectory.step(x, x0)
    return trajectory.result(x)


def ddim_timesteps(timesteps: int, steps: int, spacing: str = "uniform",
                   log_snr: torch.Tensor | None = None) -> list[int]:
    """S = `steps` increasing timesteps tau_0 < ... < tau_{S-1} in [0, T) for DDIM to visit:

    uniform    tau_i = i T / S (Song et al. 2020, appendix C.2): starts T / S below T - 1
    trailing   tau_i = (i + 1) T / S - 1: starts at T - 1, where training's noise is purest
               (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", table 2)
    quadratic  tau_i = c i^2 with tau_{S-1} = T - 1 (Song et al. 2020, appendix D.2): dense near t = 0
    logsnr     log-SNR evenly spaced from t = T - 1 to t = 0 (Lu et al. 2022, DPM-Solver, sec. 3.3);
               needs the schedule's `log_snr` (Diffusion.log_snr)
    Positions that round to a step already taken move up one, so there are always S distinct steps."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps must be in [1, {timesteps}], got {steps}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    if spacing == "uniform":
        return [i * timesteps // steps for i in range(steps)]
    if spacing == "trailing":
        return [(i + 1) * timesteps // steps - 1 for i in range(steps)]
    if spacing == "quadratic":
        positions = [(timesteps - 1) * (i / max(1, steps - 1)) ** 2 for i in range(steps)]
    else:
        if log_snr is None:
            raise ValueError("spacing 'logsnr' needs the schedule's log_snr")
        logsnr = log_snr.double().cpu()    # decreasing in t
        targets = torch.linspace(float(logsnr[0]), float(logsnr[-1]), steps, dtype=torch.float64)
        # the first t whose log-SNR is at or below each target
        positions = torch.searchsorted(-logsnr, -targets).clamp(max=timesteps - 1).tolist()
    taus = []
    for x in positions:
        taus.append(max(round(x), taus[-1] + 1) if taus else round(x))
    for i in range(steps - 1, -1, -1):  # pushed past T - 1: move down, keeping them distinct
        taus[i] = min(taus[i], timesteps - steps + i)
    return taus


@torch.no_grad()
def ddim_sample(model: nn.Module, diffusion: Diffusion, x_T: torch.Tensor, steps: int, eta: float = 0.0,
                y: torch.Tensor | None = None, generator=None, return_trajectory: bool = False,
                clip_x0: bool = False, progress: bool = False, spacing: str = "uniform"):
    """DDIM (Song et al. 2020, eq. 12) over S = `steps` timesteps chosen by `spacing` (see
    ddim_timesteps), from high to low, the last step landing on alpha_bar = 1. eta = 0 is
    deterministic given x_T; eta = 1 with S = T is DDPM."""
    taus = ddim_timesteps(diffusion.timesteps, steps, spacing, diffusion.log_snr)
    x, trajectory = x_T, Trajectory(x_T, return_trajectory)
    ab = diffusion.alpha_bar
    desc = f"DDIM-{steps}" + (f" η={eta:g}" if eta else "")  # η = 1: DDPM's ancestral step on this chain
    for j in tqdm(reversed(range(len(taus))), total=len(taus), desc=desc, disable=not progress, leave=False):
        t = torch.full((x.shape[0],), taus[j], device=x.device, dtype=torch.long)
        a, a_prev = ab[taus[j]], (ab[taus[j - 1]] if j > 0 else ab.new_tensor(1.0))
        # 1. predict eps and x0 ("predicted x0" term of eq. 12)
        eps, x0 = diffusion.eps_and_x0(x, t, model(x, t, y).float())
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        # 2. sigma_t(eta) (eq. 16)
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        # 3. x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z (eq. 12)
        z = randn(x.shape, generator, x.device)
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps + sigma * z
        trajectory.step(x, x0)
    return trajectory.result(x)


@torch.no_grad()
def dpm_solver_sample(model: nn.Module, diffusion: Diffusion, x_T: torch.Tensor, steps: int,
                      y: torch.Tensor | None = None, return_trajectory: bool = False, clip_x0: bool = False,
                      progress: bool = False, spacing: str = "uniform"):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", algorithm 2): the probability-flow ODE that
    DDIM (eta = 0) integrates to first order, integrated to second order in lambda = log(alpha / sigma)
    by reusing the previous step's x0 prediction, at the same cost of one model call per step.

    With alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), h = lambda_s - lambda_t and
    r = h_prev / h, a step t -> s is x_s = (sigma_s / sigma_t) x_t - alpha_s (e^-h - 1) D with
    D = (1 + 1 / 2r) x0_t - (1 / 2r) x0_prev (eq. 5 and algorithm 2; D = x0_t at the first step, which
    is the DDIM step). The last step lands on alpha_bar = 1, where x = x0 (first order, as DDIM)."""
    taus = ddim_timesteps(diffusion.timesteps, steps, spacing, diffusion.log_snr)
    # from the float64-derived buffers: 1 - alpha_bar in float32 loses digits near t = 0
    lam = (0.5 * diffusion.log_snr.double()).tolist()
    alpha, sigma = diffusion.sqrt_alpha_bar.double().tolist(), diffusion.sqrt_one_minus_alpha_bar.double().tolist()
    x, trajectory = x_T, Trajectory(x_T, return_trajectory)
    x0_prev, h_prev = None, None
    for j in tqdm(reversed(range(len(taus))), total=len(taus), desc=f"DPM-Solver++-{steps}",
                  disable=not progress, leave=False):
        t = torch.full((x.shape[0],), taus[j], device=x.device, dtype=torch.long)
        _, x0 = diffusion.eps_and_x0(x, t, model(x, t, y).float())
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        if j == 0:  # to alpha_bar = 1: h is infinite and the step is x0 itself
            x = x0
        else:
            now, nxt = taus[j], taus[j - 1]
            h = lam[nxt] - lam[now]
            d = x0 if x0_prev is None else (1 + h / (2 * h_prev)) * x0 - h / (2 * h_prev) * x0_prev
            x = sigma[nxt] / sigma[now] * x - alpha[nxt] * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        trajectory.step(x, x0)
    return trajectory.result(x)


class NonFiniteImages(FloatingPointError):
    """Sampling gave (or would give) NaN or infinite values, which as images would be black or white pictures."""


def check_weights(model: nn.Module) -> None:
    """Raise NonFiniteImages when `model`'s weights (a guided model's include its guide's) are not all finite:
    every sample would be NaN."""
    weights = model.parameters() if isinstance(model, nn.Module) else ()
    if not all(torch.isfinite(w).all() for w in weights):
        raise NonFiniteImages("the model's weights are not all finite (NaN or inf): the model file is damaged or "
                              "its training diverged")


def to_images(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """A sampler's result `x` (float, [-1, 1]) from `model` as uint8 images on the CPU, once checked finite: a NaN
    would silently become a black pixel. The error names the likely cause: the weights when they are not finite,
    else the guidance."""
    if torch.isfinite(x).all():
        return to_uint8(x).cpu()
    check_weights(model)
    raise NonFiniteImages("sampling gave NaN or infinite values, not images: the model's predictions overflowed, "
                          "most likely under a guidance weight too large for this model")


def default_steps(method: str, timesteps: int) -> int:
    """A sampler's steps unless told: DDPM all T (Ho et al. 2020, Algorithm 2), the others 50 (at most T)."""
    return timesteps if method == "ddpm" else min(DEFAULT_STEPS, timesteps)


def generate(model: nn.Module, diffusion: Diffusion, num: int, shape: tuple[int, int, int], *, seed: int,
             method: str = "ddim", steps: int | None = None, eta: float = 0.0, labels: torch.Tensor | None = None,
             batch_size: int = 250, clip_x0: bool = False, spacing: str = "uniform",
             progress: bool = False, first: int = 0) -> torch.Tensor:
    """`num` images as uint8 (num, C, H, W) on the CPU, sampled in batches; image i's noise depends
    only on (seed, i), so the result does not depend on `batch_size`; `first` is the first image's index
    (labels[k] is image first + k's), so shares of the images drawn apart join bit-identically. For guided
    images pass a guided model (`SamplerSetting.model`, `ClassifierFree`, `Autoguided`). Raises NonFiniteImages (a
    FloatingPointError) when a batch is not finite.

    `steps`: default `default_steps`: DDIM's and DPM-Solver's 50; DDPM's all T steps (Algorithm 2), and fewer
    run it on a strided chain of `steps` timesteps chosen by `spacing` (the respacing of Nichol & Dhariwal
    2021, section 4), whose ancestral step is DDIM's with eta = 1 (Song et al. 2020, eq. 16)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    desc, steps = f"sample {method}", default_steps(method, diffusion.timesteps) if steps is None else steps
    if method == "ddpm" and steps < diffusion.timesteps:
        method, eta = "ddim", 1.0
    device = diffusion.betas.device
    out, bar = [], tqdm(total=num, desc=desc, unit="img", disable=not progress, leave=False)  # images/s, ETA
    for start in range(0, num, batch_size):
        idx = range(start, min(num, start + batch_size))
        gen = ImageGenerator(seed, range(first + idx.start, first + idx.stop), device)
        x_T = gen.randn((len(idx), *shape))
        y = labels[start:start + len(idx)].to(device) if labels is not None else None
        if method == "ddpm":
            x = ddpm_sample(model, diffusion, x_T, y=y, generator=gen, clip_x0=clip_x0, progress=progress)
        elif method == "ddim":
            x = ddim_sample(model, diffusion, x_T, steps, eta=eta, y=y, generator=gen, clip_x0=clip_x0,
                            spacing=spacing, progress=progress)
        else:
            x = dpm_solver_sample(model, diffusion, x_T, steps, y=y, clip_x0=clip_x0, spacing=spacing,
                                  progress=progress)
        out.append(to_images(x, model))
        bar.update(len(idx))
    bar.close()
    return torch.cat(out)
