"""Post-hoc EMA: the power-function EMA, its width, and the least-squares reconstruction (EDM2)."""

import numpy as np
import pytest
import torch
from torch import nn

from ddpm.posthoc_ema import PowerEMA, gamma_to_sigma_rel, posthoc_coefficients, reconstruct, sigma_rel_to_gamma


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2, 0.28])
def test_sigma_rel_and_gamma_invert_each_other(sigma_rel):
    assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-9)


def test_edm2_values():
    """EDM2's two training profiles: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94 (their table 3)."""
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    with pytest.raises(ValueError, match="sigma_rel"):
        sigma_rel_to_gamma(0.3)


def _trajectory(steps: int, seed: int = 0) -> torch.Tensor:
    """A weight vector's path through training: a smooth drift plus noise, (steps, 8)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.arange(1, steps + 1, dtype=torch.float64).unsqueeze(1)
    return torch.sin(k / 150 * torch.linspace(0.5, 2, 8, dtype=torch.float64)) + 0.05 * torch.randn(
        steps, 8, generator=g, dtype=torch.float64)


def _track(trajectory, sigma_rels, every):
    """Run PowerEMA over `trajectory`, returning its snapshots every `every` steps and the final module."""
    model = nn.Linear(8, 1, bias=False).double()
    ema = PowerEMA(model, sigma_rels)
    snapshots = []
    for i, w in enumerate(trajectory, start=1):
        model.weight.data.copy_(w.unsqueeze(0))
        ema.update(model)
        if i % every == 0:
            snapshots += ema.snapshot()
    return snapshots, ema


def test_the_discrete_update_is_the_power_function_average():
    """After t updates the EMA equals sum_k w_k theta_k with the weights that beta_t = (1 - 1/t)^(gamma+1)
    gives, and those weights grow as k^gamma (the profile the reconstruction assumes)."""
    traj = _trajectory(400)
    _, ema = _track(traj, (0.1,), 400)
    gamma = ema.gammas[0]
    w = np.zeros(400)
    for t in range(1, 401):
        beta = (1 - 1 / t) ** (gamma + 1)
        w *= beta
        w[t - 1] += 1 - beta
    direct = (torch.from_numpy(w).unsqueeze(1) * traj).sum(0)
    assert torch.allclose(ema.modules[0].weight.data[0], direct, atol=1e-12)
    k = np.arange(1, 401)
    ratio = w[200:] / k[200:] ** gamma
    assert ratio.std() / ratio.mean() < 0.05


def test_reconstruction_at_a_tracked_profile_is_that_profile():
    """Asked for a width and step that a snapshot holds, the least squares pick that snapshot exactly."""
    snapshots, ema = _track(_trajectory(1000), (0.05, 0.10), 100)
    x = posthoc_coefficients([s["t"] for s in snapshots], [s["sigma_rel"] for s in snapshots], 1000, 0.10)
    assert x[-1] == pytest.approx(1.0, abs=1e-6) and np.abs(x[:-1]).max() < 1e-6
    weights = reconstruct(snapshots, 0.10)
    assert torch.allclose(weights["weight"], ema.modules[1].weight.data.float(), atol=1e-6)


@pytest.mark.parametrize("sigma_rel", [0.07, 0.15])
def test_reconstruction_matches_a_directly_tracked_ema(sigma_rel):
    """A width no profile tracked, reconstructed from 2 x 20 snapshots, matches a PowerEMA of that width run
    over the same training to well within how far the weights move (EDM2, fig. 3)."""
    traj = _trajectory(2000, seed=1)
    snapshots, _ = _track(traj, (0.05, 0.10), 100)
    _, direct = _track(traj, (sigma_rel,), 2000)
    got = reconstruct(snapshots, sigma_rel)["weight"]
    want = direct.modules[0].weight.data
    spread = traj[-400:].std(0).mean()
    assert (got - want).abs().max() < 0.05 * spread
    # and it is nearer to that width's EMA than either tracked profile is
    tracked = [s["state"]["weight"] for s in snapshots[-2:]]
    assert (got - want).abs().max() < min((t - want).abs().max() for t in tracked)


def test_state_round_trip_resumes_exactly():
    traj = _trajectory(300)
    _, full = _track(traj, (0.05, 0.10), 300)
    model = nn.Linear(8, 1, bias=False).double()
    first = PowerEMA(model, (0.05, 0.10))
    for w in traj[:120]:
        model.weight.data.copy_(w.unsqueeze(0))
        first.update(model)
    second = PowerEMA(model, (0.05, 0.10))
    second.load_state_dict(first.state_dict())
    for w in traj[120:]:
        model.weight.data.copy_(w.unsqueeze(0))
        second.update(model)
    for a, b in zip(second.modules, full.modules):
        assert torch.equal(a.weight, b.weight)
    with pytest.raises(ValueError, match="sigma_rels"):
        PowerEMA(model, (0.05,)).load_state_dict(first.state_dict())
