"""Post-hoc EMA (Karras et al. 2024, "Analyzing and improving the training dynamics of diffusion models",
sec. 3 and appendix C): training keeps power-function EMAs of the weights for two lengths and saves them at
regular steps; afterwards the EMA of any other length is reconstructed as a least-squares combination of
the saved snapshots, so the EMA length is chosen without retraining.

Vocabulary: `t` is a step count (the number of optimizer updates averaged), `gamma` a power-function
exponent, `sigma_rel` the relative standard deviation of the averaging profile's width (eq. 3).
"""

import copy

import numpy as np
import torch
from torch import nn


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma whose power-function profile has relative width sigma_rel (eq. 3 solved for gamma:
    sigma_rel^-2 = (gamma + 2)^2 (gamma + 3) / (gamma + 1), a cubic with one root above -1 for sigma_rel
    in (0, 12^-1/2))."""
    if not 0.0 < sigma_rel < 12 ** -0.5:
        raise ValueError(f"sigma_rel must be in (0, {12 ** -0.5:.4f}), got {sigma_rel}")
    s = sigma_rel ** -2
    return float(np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]).real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    """Eq. 3: the relative width of the profile p(tau) ∝ tau^gamma on [0, t]."""
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


class PowerEMA:
    """Power-function EMAs of a model's weights, one frozen copy per sigma_rel in `sigma_rels`.

    After t updates each copy averages the weights seen so far with weights ∝ tau^gamma (eq. 2's discrete
    form: beta_t = (1 - 1/t)^(gamma + 1), so the first update copies the weights)."""

    def __init__(self, model: nn.Module, sigma_rels: tuple[float, ...] = (0.05, 0.10)):
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.modules = [copy.deepcopy(model).eval().requires_grad_(False) for _ in self.sigma_rels]
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        params = [p.detach() for p in model.parameters()]
        for gamma, module in zip(self.gammas, self.modules):
            beta = (1.0 - 1.0 / self.updates) ** (gamma + 1.0)
            torch._foreach_lerp_(list(module.parameters()), params, 1.0 - beta)
            for b_ema, b in zip(module.buffers(), model.buffers()):
                b_ema.copy_(b)

    def snapshot(self) -> list[dict]:
        """One record per profile: {"t", "sigma_rel", "state"} with the weights as fp32 CPU tensors."""
        return [{"t": self.updates, "sigma_rel": s, "state": {k: v.detach().float().cpu().clone()
                                                             for k, v in m.state_dict().items()}}
                for s, m in zip(self.sigma_rels, self.modules)]

    def state_dict(self) -> dict:
        return {"modules": [m.state_dict() for m in self.modules], "updates": self.updates,
                "sigma_rels": list(self.sigma_rels)}

    def load_state_dict(self, state: dict) -> None:
        if [float(s) for s in state["sigma_rels"]] != list(self.sigma_rels):
            raise ValueError(f"post-hoc EMA state holds sigma_rels {state['sigma_rels']}, not {self.sigma_rels}")
        for m, s in zip(self.modules, state["modules"]):
            m.load_state_dict(s)
        self.updates = int(state["updates"])


def _p_dot_p(t_a, gamma_a, t_b, gamma_b):
    """The inner product of two normalised power-function profiles, integral over tau of
    p_a(tau) p_b(tau) with p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t] (appendix C.2)."""
    t_ratio = t_a / t_b
    t_exp = np.where(t_a < t_b, gamma_b, -gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) * t_ratio ** t_exp / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b))


def posthoc_coefficients(ts, sigma_rels, target_t: float, target_sigma_rel: float) -> np.ndarray:
    """Least-squares weights x (one per snapshot) such that sum_i x_i p_i best matches the target profile
    in L2 (appendix C.3: A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p_target>).

    ts, sigma_rels: each snapshot's step count and profile width. Returns float64 coefficients."""
    t = np.asarray(ts, dtype=np.float64).reshape(-1, 1)
    g = np.asarray([sigma_rel_to_gamma(s) for s in sigma_rels], dtype=np.float64).reshape(-1, 1)
    a = _p_dot_p(t, g, t.T, g.T)
    b = _p_dot_p(t, g, np.float64(target_t), np.float64(sigma_rel_to_gamma(target_sigma_rel)))
    return np.linalg.lstsq(a, b, rcond=None)[0].reshape(-1)


def reconstruct(snapshots: list[dict], sigma_rel: float, t: int | None = None) -> dict[str, torch.Tensor]:
    """The weights of a power-function EMA of width `sigma_rel` at step `t` (default: the last snapshot's),
    combined from `snapshots` (records of PowerEMA.snapshot, any number of profiles and steps)."""
    if not snapshots:
        raise ValueError("no post-hoc EMA snapshots to reconstruct from")
    t = max(s["t"] for s in snapshots) if t is None else t
    x = posthoc_coefficients([s["t"] for s in snapshots], [s["sigma_rel"] for s in snapshots], t, sigma_rel)
    out = {}
    for key, first in snapshots[0]["state"].items():
        if not first.is_floating_point():  # counters and the like: the last snapshot's
            out[key] = snapshots[-1]["state"][key].clone()
            continue
        acc = torch.zeros_like(first, dtype=torch.float64)
        for xi, s in zip(x, snapshots):
            acc += float(xi) * s["state"][key].double()
        out[key] = acc.to(first.dtype)
    return out
