"""Beta schedules: Ho et al. 2020 (linear) and Nichol & Dhariwal 2021 (cosine)."""

import math

import pytest
import torch

from ddpm import make_betas


def test_linear_endpoints_default_and_configurable():
    betas = make_betas("linear", 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    # evenly spaced: beta_i = 1e-4 + i (0.02 - 1e-4) / 999
    assert betas[500].item() == pytest.approx(1e-4 + 500 * (0.02 - 1e-4) / 999, rel=1e-12)

    custom = make_betas("linear", 10, beta_start=1e-3, beta_end=0.05)
    assert custom[0].item() == pytest.approx(1e-3) and custom[-1].item() == pytest.approx(0.05)
    assert torch.all(custom.diff() > 0)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("timesteps", [10, 1000])
def test_alpha_bar_strictly_decreasing_in_unit_interval(name, timesteps):
    betas = make_betas(name, timesteps)
    assert betas.dtype == torch.float64 and betas.shape == (timesteps,)
    assert torch.all((betas > 0) & (betas < 1))
    alpha_bar = torch.cumprod(1 - betas, 0)
    assert torch.all(alpha_bar.diff() < 0)
    assert 0 < alpha_bar[-1] < alpha_bar[0] < 1


def cosine_alpha_bar(t: int, T: int, s: float = 0.008) -> float:
    """Nichol & Dhariwal eq. 17 by hand: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2)."""
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2
    return f(t) / f(0)


@pytest.mark.parametrize("T", [50, 1000])
def test_cosine_matches_eq_17(T):
    alpha_bar = torch.cumprod(1 - make_betas("cosine", T), 0)
    # alpha_bar[i] is the product up to and including step i, i.e. alpha_bar(t = i + 1) of eq. 17
    for i in [0, 1, T // 4, T // 2, 3 * T // 4, T - 10]:
        assert alpha_bar[i].item() == pytest.approx(cosine_alpha_bar(i + 1, T), rel=1e-9)
    # beta_t = 1 - alpha_bar(t) / alpha_bar(t - 1)
    i = T // 3
    expected = 1 - cosine_alpha_bar(i + 1, T) / cosine_alpha_bar(i, T)
    assert make_betas("cosine", T)[i].item() == pytest.approx(expected, rel=1e-9)


def test_cosine_clips_final_beta_at_0_999():
    betas = make_betas("cosine", 1000)
    # unclipped, the last beta would be 1 (f(T) = cos^2(pi/2) = 0)
    assert 1 - cosine_alpha_bar(1000, 1000) / cosine_alpha_bar(999, 1000) > 0.999
    assert betas[-1].item() == pytest.approx(0.999, abs=1e-12)
    assert betas.max().item() <= 0.999
    assert betas[:-5].max().item() < 0.999  # only the very end is clipped


def test_unknown_schedule_names_the_valid_ones():
    with pytest.raises(ValueError, match="quadratic") as err:
        make_betas("quadratic", 1000)
    assert "linear" in str(err.value) and "cosine" in str(err.value)


def test_timesteps_must_be_positive():
    with pytest.raises(ValueError):
        make_betas("linear", 0)
