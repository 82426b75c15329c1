"""Samplers: ancestral DDPM (Ho et al. 2020), DDIM (Song et al. 2020) and DPM-Solver++(2M) (Lu et al.
2022), and guidance as model wrappers: classifier-free guidance (Ho & Salimans 2022, `ClassifierFree`)
and autoguidance (Karras et al. 2024, `Autoguided`), either limited to a range of noise levels
(Kynkäänniemi et al. 2024, `guidance_interval`).

Each sampler is a function of (model, diffusion, x_T, options, generator) and returns the final x0,
or (x0, trajectory) when `return_trajectory=True`, where trajectory holds x_t before every step plus
the result, and the model's x0 prediction at every step. A sampler calls `model(x_t, t, y)` and knows
nothing of guidance: a guided model is passed in as the model.

`SamplerSetting` names one point of a sampling sweep (method, steps, eta, spacing, guidance weights):
its `tag` names the sample files, its `label` the plots, and `setting.model(net, guide)` wraps the network
as the setting's guidance says.
"""

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn
from tqdm.auto import tqdm

from .diffusion import NULL_LABEL, Diffusion, to_uint8


def fold_seed(value: int, bits: int = 64) -> int:
    """`value` (>= 0) as a seed below 2**bits, the range a generator takes (torch's: 64 bits, numpy's
    RandomState: 32): the bits above, times an odd constant, are xored into the low ones. A value below
    2**bits is returned as it is (so the seeds that always fitted give bit-identical results), and values
    below 2**(2 * bits) that differ only above the low bits never fold to the same seed."""
    return (value ^ (value >> bits) * 0x9E3779B97F4A7C15) & ((1 << bits) - 1)


class ImageGenerator:
    """Per-image random streams: image i's noise depends only on (seed, i), never on the batching.

    Compare EDM's StackedRandomGenerator. `ImageGenerator(seed, range(32, 64))` draws the noise
    of images 32..63 exactly as a batch of all 64 images would."""

    def __init__(self, seed: int, indices, device: torch.device | str = "cpu"):
        self.generators = [torch.Generator(device).manual_seed(fold_seed(seed * 1_000_003 + int(i)))
                           for i in indices]

    def randn(self, shape, device=None, dtype=torch.float32) -> torch.Tensor:
        """Noise of shape (len(indices), *shape[1:]) (shape[0] must equal the number of images)."""
        assert shape[0] == len(self.generators), "batch size must match the number of images"
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype)
                            for g in self.generators]).to(device or self.generators[0].device)


def randn(shape, generator, device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise from an ImageGenerator, a torch.Generator or the global RNG."""
    if isinstance(generator, ImageGenerator):
        return generator.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def extrapolate(d: torch.Tensor, d_bad: torch.Tensor, w: float) -> torch.Tensor:
    """(1 + w) D - w D_bad: the prediction D pushed away from a worse one D_bad, the guidance formula of
    Ho & Salimans 2022 (eq. 6) and Karras et al. 2024. The same combination of eps or of v predictions
    gives the same eps~ and x0~, since both are linear in x0 at a given x_t."""
    return (1 + w) * d - w * d_bad


def guidance_interval(diffusion: Diffusion, low: float, high: float) -> torch.Tensor:
    """Where guidance acts when limited to an interval of noise levels (Kynkäänniemi et al. 2024, "Applying
    guidance in a limited interval improves sample and distribution quality", sec. 3): a bool per timestep
    (T,), True where sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) lies in (low, high]. sigma_t is EDM's
    noise level of the same image, x_t / sqrt(alpha_bar_t) = x0 + sigma_t eps, so the paper's intervals apply
    as they stand. Guidance at high noise pulls every sample of a class toward one layout, at low noise it
    does little: the interval keeps its gain in the middle and spends a second call only there."""
    if not 0 <= low < high:
        raise ValueError(f"guidance interval needs 0 <= low < high, got ({low:g}, {high:g}]")
    sigma = (-0.5 * diffusion.log_snr).exp()
    return (sigma > low) & (sigma <= high)


def _within(t: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor | None:
    """Per image of the batch, whether its timestep t is in the guidance interval `active` (None: no interval)."""
    return None if active is None else active.to(t.device)[t]


def _limited(guided_d: torch.Tensor, plain_d: torch.Tensor, within: torch.Tensor | None) -> torch.Tensor:
    """`guided_d` for the images `within` the guidance interval (all when None), `plain_d` for the rest."""
    if within is None:
        return guided_d
    return torch.where(within.reshape(-1, *[1] * (guided_d.ndim - 1)), guided_d, plain_d)


class ClassifierFree(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022): the conditional model guided by its own label-free
    prediction, eps~ = (1 + w) eps(x_t, y) - w eps(x_t, null) (eq. 6), both from one batched call.
    Pass it to any sampler in place of the model. w = 0, or no labels, is exactly the plain prediction.
    `active` (`guidance_interval`): guide only at these timesteps, the conditional prediction alone elsewhere
    (one call)."""

    def __init__(self, model: nn.Module, w: float, active: torch.Tensor | None = None):
        super().__init__()
        self.model, self.w, self.active = model, w, active

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        within = _within(t, self.active)
        if y is None or self.w == 0 or (within is not None and not within.any()):
            return self.model(x_t, t, y).float()
        both = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]),
                          torch.cat([y, torch.full_like(y, NULL_LABEL)]))
        d_cond, d_uncond = both.float().chunk(2)
        return _limited(extrapolate(d_cond, d_uncond, self.w), d_cond, within)


class Autoguided(nn.Module):
    """Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): the
    model guided by a worse version of itself, here an early EMA snapshot of the same training run
    (`Trainer.guide`). Pass it to any sampler in place of the model: it predicts
    (1 + w) D(x_t) - w D_guide(x_t), the classifier-free guidance formula with the guide in place of the
    label-free prediction, and needs no labels (any are passed to both). w = 0 is the model alone.
    `active` (`guidance_interval`): guide only at these timesteps, the model alone elsewhere."""

    def __init__(self, model: nn.Module, guide: nn.Module, w: float, active: torch.Tensor | None = None):
        super().__init__()
        self.model, self.guide, self.w, self.active = model, guide, w, active

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        d, within = self.model(x_t, t, y).float(), _within(t, self.active)
        if self.w == 0 or (within is not None and not within.any()):
            return d
        return _limited(extrapolate(d, self.guide(x_t, t, y).float(), self.w), d, within)


def guided(model: nn.Module, cfg: float | None = None, autoguidance: float = 0.0,
           guide: nn.Module | None = None, active: torch.Tensor | None = None) -> nn.Module:
    """`model` as a sampler should call it: under classifier-free guidance w = `cfg` (ClassifierFree) and
    then autoguided by `guide` with w = `autoguidance` (Autoguided), each only at the timesteps `active`
    (`guidance_interval`; None: all); the model itself when both weights are 0/None."""
    if cfg:
        model = ClassifierFree(model, cfg, active)
    if autoguidance:
        if guide is None:
            raise ValueError(f"autoguidance w = {autoguidance:g} needs a guide model")
        model = Autoguided(model, guide, autoguidance, active)
    return model


@torch.no_grad()
def ddpm_sample(model: nn.Module, diffusion: Diffusion, x_T: torch.Tensor, y: torch.Tensor | None = None,
                generator=None, return_trajectory: bool = False, variance: str = "posterior",
                clip_x0: bool = False, progress: bool = False):
    """Ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2). x_T (B, C, H, W) -> x0.

    variance "posterior": sigma_t^2 = beta~_t (eq. 7); "beta": sigma_t^2 = beta_t."""
    if variance not in ("posterior", "beta"):
        raise ValueError(f"unknown variance {variance!r}; valid: posterior, beta")
    x, xs, x0s = x_T, [x_T], []
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
        if return_trajectory:
            xs.append(x)
            x0s.append(x0)
    return (x, {"x_t": xs, "x0": x0s}) if return_trajectory else x


SPACINGS = ("uniform", "trailing", "quadratic", "logsnr")
METHODS = ("ddpm", "ddim", "dpmsolver")  # dpmsolver: DPM-Solver++(2M), deterministic like DDIM with eta = 0


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
    x, xs, x0s = x_T, [x_T], []
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
        if return_trajectory:
            xs.append(x)
            x0s.append(x0)
    return (x, {"x_t": xs, "x0": x0s}) if return_trajectory else x


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
    x, xs, x0s = x_T, [x_T], []
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
        if return_trajectory:
            xs.append(x)
            x0s.append(x0)
    return (x, {"x_t": xs, "x0": x0s}) if return_trajectory else x


DEFAULT_STEPS = 50  # DDIM's and DPM-Solver's steps unless told


def default_steps(method: str, timesteps: int) -> int:
    """A sampler's steps unless told: DDPM all T (Ho et al. 2020, Algorithm 2), the others 50 (at most T)."""
    return timesteps if method == "ddpm" else min(DEFAULT_STEPS, timesteps)


def generate(model: nn.Module, diffusion: Diffusion, num: int, shape: tuple[int, int, int], *, seed: int,
             method: str = "ddim", steps: int | None = None, eta: float = 0.0, labels: torch.Tensor | None = None,
             batch_size: int = 250, clip_x0: bool = False, spacing: str = "uniform",
             progress: bool = False) -> torch.Tensor:
    """`num` images as uint8 (num, C, H, W) on the CPU, sampled in batches; image i's noise depends
    only on (seed, i), so the result does not depend on `batch_size`. For guided images pass a guided
    model (`SamplerSetting.model`, `ClassifierFree`, `Autoguided`).

    `steps`: default `default_steps`: DDIM's and DPM-Solver's 50; DDPM's all T steps (Algorithm 2), and fewer
    run it on a strided chain of `steps` timesteps chosen by `spacing` (the respacing of Nichol & Dhariwal
    2021, section 4), whose ancestral step is DDIM's with eta = 1 (Song et al. 2020, eq. 16)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    desc, steps = f"sample {method}", default_steps(method, diffusion.timesteps) if steps is None else steps
    if method == "ddpm" and steps < diffusion.timesteps:
        method, eta = "ddim", 1.0
    device = diffusion.betas.device
    out = []
    for start in tqdm(range(0, num, batch_size), desc=desc, disable=not progress, leave=False):
        idx = range(start, min(num, start + batch_size))
        gen = ImageGenerator(seed, idx, device)
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
        out.append(to_uint8(x).cpu())
    return torch.cat(out)


METHOD_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "dpmsolver": "DPM-Solver++(2M)"}


def interval_text(interval: tuple[float, float]) -> str:
    """A guidance interval for people: "σ∈(0.28, 5.42]"."""
    return f"σ∈({interval[0]:g}, {interval[1]:g}]"


@dataclass(frozen=True)
class SamplerSetting:
    """One sampler setting of a sweep. `cfg` is the classifier-free guidance weight w of a class-conditional
    model (None for an unconditional one, whose tags carry no weight), `autoguidance` the autoguidance
    weight w (0: none), `interval` the noise levels (low, high] where guidance acts (`guidance_interval`;
    None: all). DDPM's `steps` is T (all of them) or a strided chain (see `generate`), its `eta` 1."""
    method: str
    steps: int
    eta: float = 0.0
    spacing: str = "uniform"
    cfg: float | None = None
    autoguidance: float = 0.0
    interval: tuple[float, float] | None = None

    def __post_init__(self):
        if self.interval is not None:  # a JSON list read back (from_dict) is the same setting
            object.__setattr__(self, "interval", tuple(float(v) for v in self.interval))
        checks = (("method", self.method in METHODS, ", ".join(METHODS)), ("steps", self.steps >= 1, ">= 1"),
                  ("eta", self.eta >= 0, ">= 0"), ("spacing", self.spacing in SPACINGS, ", ".join(SPACINGS)),
                  ("cfg", self.cfg is None or self.cfg >= 0, "None or >= 0"),
                  ("autoguidance", self.autoguidance >= 0, ">= 0"),
                  ("interval", self.interval is None or (len(self.interval) == 2
                                                         and 0 <= self.interval[0] < self.interval[1]),
                   "None or (low, high) with 0 <= low < high"))
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"SamplerSetting.{name} = {getattr(self, name)!r}; allowed: {allowed}")

    @property
    def tag(self) -> str:
        """The file name of its samples: "ddpm1000", "ddim10_eta0", "dpmsolver20", then "_w{cfg}" for a
        conditional model (even at w = 0), "_ag{autoguidance}" when autoguided and "_gi{low}-{high}" with a
        guidance interval: "ddim10_eta0_w0.5", "ddim50_eta0_w1_gi0.28-5.42"."""
        name = f"ddim{self.steps}_eta{self.eta:g}" if self.method == "ddim" else f"{self.method}{self.steps}"
        name += f"_w{self.cfg:g}" if self.cfg is not None else ""
        name += f"_ag{self.autoguidance:g}" if self.autoguidance else ""
        return name + (f"_gi{self.interval[0]:g}-{self.interval[1]:g}" if self.interval else "")

    @property
    def label(self) -> str:
        """For people: "DDPM-1000", "DDIM-10 η=0, w=0.5", "DPM-Solver++(2M)-20, autoguidance w=1",
        "DDIM-50 η=0, w=1, σ∈(0.28, 5.42]"."""
        return self._label(with_steps=True)

    @property
    def curve_label(self) -> str:
        """The label without the step count, for a curve over steps: "DDIM η=0, w=0.5"."""
        return self._label(with_steps=False)

    def _label(self, with_steps: bool) -> str:
        name = METHOD_NAMES[self.method] + (f"-{self.steps}" if with_steps else "")
        name += f" η={self.eta:g}" if self.method == "ddim" else ""
        guidance = ([f"w={self.cfg:g}"] if self.cfg is not None else []) + (
            [f"autoguidance w={self.autoguidance:g}"] if self.autoguidance else [])
        interval = [interval_text(self.interval)] if self.interval else []
        return ", ".join([name, *guidance, *interval])

    def model(self, net: nn.Module, guide: nn.Module | None = None, diffusion: Diffusion | None = None) -> nn.Module:
        """`net` guided as this setting says (see `guided`); raises ValueError when it needs a guide, or the
        diffusion for its guidance interval."""
        if self.interval and diffusion is None:
            raise ValueError(f"{self.tag}: a guidance interval needs the diffusion (its noise levels)")
        active = guidance_interval(diffusion, *self.interval) if self.interval else None
        return guided(net, self.cfg, self.autoguidance, guide, active)

    def to_dict(self) -> dict:
        """The fields and the tag, as an index.json row starts."""
        return asdict(self) | {"tag": self.tag}

    @classmethod
    def from_dict(cls, row: dict) -> "SamplerSetting":
        """The setting of a `to_dict` row; other keys are ignored, and a "tag" must be the setting's own."""
        setting = cls(**{f.name: row[f.name] for f in fields(cls) if f.name in row})
        if "tag" in row and row["tag"] != setting.tag:
            raise ValueError(f"tag {row['tag']!r} does not match its setting, whose tag is {setting.tag!r}")
        return setting


def sampler_settings(method: str, timesteps: int, *, steps=(), etas=(0.0,), spacing: str = "uniform",
                     cfg=None, autoguidance=(0.0,), interval=None) -> list[SamplerSetting]:
    """Every setting of one sampler in a sweep: DDPM at each of `steps` (T: all of them, Algorithm 2; fewer: a
    strided chain, see `generate`), DDIM at each of `steps` x `etas`, DPM-Solver++(2M) at each of `steps`
    (deterministic, eta 0); each at every classifier-free weight of `cfg` (None: an unconditional model) and
    every `autoguidance` weight, guided in `interval` (None: at every step). Step counts above `timesteps`
    are left out."""
    etas = etas if method == "ddim" else (1.0 if method == "ddpm" else 0.0,)
    bases = [(s, e) for s in steps for e in etas if s <= timesteps]
    exact = method == "ddpm"  # DDPM over all T steps visits every one: no spacing to speak of
    interval = tuple(interval) if interval else None
    return [SamplerSetting(method, s, e, "uniform" if exact and s == timesteps else spacing, w, ag, interval)
            for s, e in bases for w in (cfg or [None]) for ag in autoguidance]
