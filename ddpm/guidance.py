"""Guidance as model wrappers: classifier-free guidance (Ho & Salimans 2022, `ClassifierFree`) and autoguidance
(Karras et al. 2024, `Autoguided`), either limited to a range of noise levels (Kynkäänniemi et al. 2024,
`guidance_interval`). A guided model is called as the model itself, `model(x_t, t, y) -> eps or v`, so every
sampler takes one in its place.
"""

import torch
from torch import nn

from .diffusion import NULL_LABEL, Diffusion
from .request import check


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
    check("interval", (low, high))
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
