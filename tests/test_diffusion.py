"""The forward process, its posterior (Ho et al. 2020 eqs. 4, 6-7) and the training loss."""

import math

import pytest
import torch
from torch import nn

from ddpm import NULL_LABEL, Diffusion, DiffusionConfig, extract, make_betas


def linear_betas_by_hand(T: int = 1000, start: float = 1e-4, end: float = 0.02) -> list[float]:
    return [start + i * (end - start) / (T - 1) for i in range(T)]


@pytest.fixture(scope="module")
def diffusion() -> Diffusion:
    return Diffusion(DiffusionConfig(schedule="linear", timesteps=1000).betas())


def test_buffers_are_float32_and_match_golden_alpha_bar(diffusion):
    assert diffusion.timesteps == 1000
    assert diffusion.alpha_bar.dtype == torch.float32
    betas = linear_betas_by_hand()
    for t in (0, 499, 999):
        expected = math.prod(1 - b for b in betas[: t + 1])
        assert diffusion.alpha_bar[t].item() == pytest.approx(expected, rel=2e-6)
    assert diffusion.alpha_bar[0].item() == pytest.approx(0.9999, rel=1e-7)
    # the well-known end of the linear schedule: sqrt(alpha_bar_T) ~ 0.0064
    assert diffusion.alpha_bar[999].item() == pytest.approx(4.036e-5, rel=1e-3)
    assert diffusion.alpha_bar_prev[0].item() == 1.0
    assert torch.equal(diffusion.alpha_bar_prev[1:], diffusion.alpha_bar[:-1])


def test_rejects_betas_outside_unit_interval():
    for bad in ([0.0, 0.1], [0.1, 1.0], [[0.1, 0.2]]):
        with pytest.raises(ValueError):
            Diffusion(torch.tensor(bad, dtype=torch.float64))


def test_extract_gathers_per_example_and_broadcasts():
    a = torch.arange(10.0)
    out = extract(a, torch.tensor([3, 0, 9]), torch.Size([3, 2, 5, 5]))
    assert out.shape == (3, 1, 1, 1)
    assert out.flatten().tolist() == [3.0, 0.0, 9.0]


@pytest.mark.parametrize("t", [0, 100, 500, 999])
def test_q_sample_moments(diffusion, t):
    gen = torch.Generator().manual_seed(t)
    n = 40_000
    x0 = torch.tensor([-1.0, -0.3, 0.5, 1.0]).reshape(1, 1, 2, 2).expand(n, 1, 2, 2)
    ts = torch.full((n,), t)
    x_t = diffusion.q_sample(x0, ts, torch.randn(x0.shape, generator=gen))
    ab = math.prod(1 - b for b in linear_betas_by_hand()[: t + 1])
    se = math.sqrt((1 - ab) / n)
    torch.testing.assert_close(x_t.mean(0), math.sqrt(ab) * x0[0], atol=5 * se, rtol=0)
    torch.testing.assert_close(x_t.var(0), torch.full_like(x0[0], 1 - ab), rtol=0.05, atol=1e-6)


def test_predict_x0_inverts_q_sample(diffusion):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 3, 4, 4, generator=gen) * 2 - 1
    eps = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([0, 1, 250, 500, 900, 999])
    x_t = diffusion.q_sample(x0, t, eps)
    torch.testing.assert_close(diffusion.predict_x0(x_t, t, eps), x0, atol=1e-4, rtol=0)


def test_posterior_matches_closed_form(diffusion):
    """Ho et al. eq. 7, computed independently in float64:
    mu~ = sqrt(ab_prev) beta / (1 - ab) x0 + sqrt(alpha) (1 - ab_prev) / (1 - ab) x_t,
    beta~ = (1 - ab_prev) / (1 - ab) beta."""
    betas = linear_betas_by_hand()
    gen = torch.Generator().manual_seed(1)
    ts = [0, 1, 10, 300, 998, 999]
    x0 = torch.rand(len(ts), 1, 3, 3, generator=gen, dtype=torch.float64) * 2 - 1
    x_t = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    mean, var = diffusion.posterior(x0.float(), x_t.float(), torch.tensor(ts))
    assert mean.shape == x0.shape and var.shape == (len(ts), 1, 1, 1)
    for i, t in enumerate(ts):
        ab = math.prod(1 - b for b in betas[: t + 1])
        ab_prev = ab / (1 - betas[t])
        expected_mean = (math.sqrt(ab_prev) * betas[t] / (1 - ab) * x0[i]
                         + math.sqrt(1 - betas[t]) * (1 - ab_prev) / (1 - ab) * x_t[i])
        torch.testing.assert_close(mean[i].double(), expected_mean, atol=1e-5, rtol=1e-5)
        expected_var = (1 - ab_prev) / (1 - ab) * betas[t]
        assert var[i].item() == pytest.approx(expected_var, rel=1e-4, abs=1e-12)
    assert var[0].item() == 0.0  # at t = 0 the posterior is a point mass on x0


def test_posterior_is_consistent_with_the_marginals():
    """Averaging q(x_{t-1}|x_t, x0) over x_t ~ q(x_t|x0) gives q(x_{t-1}|x0) = N(sqrt(ab_prev) x0, 1 - ab_prev)."""
    diffusion = Diffusion(make_betas("cosine", 50))
    gen = torch.Generator().manual_seed(2)
    n, t = 100_000, 30
    x0 = torch.full((n, 1, 1, 1), 0.7)
    ts = torch.full((n,), t)
    x_t = diffusion.q_sample(x0, ts, torch.randn(x0.shape, generator=gen))
    mean, var = diffusion.posterior(x0, x_t, ts)
    x_prev = mean + var.sqrt() * torch.randn(x0.shape, generator=gen)
    ab_prev = diffusion.alpha_bar[t - 1].item()
    assert x_prev.mean().item() == pytest.approx(math.sqrt(ab_prev) * 0.7, abs=0.01)
    assert x_prev.var().item() == pytest.approx(1 - ab_prev, rel=0.02)


def test_buffers_follow_to():
    diffusion = Diffusion(make_betas("linear", 20))
    moved = diffusion.to(torch.float64)
    assert all(b.dtype == torch.float64 for b in moved.buffers())
    meta = Diffusion(make_betas("linear", 20)).to("meta")
    names = {name for name, _ in meta.named_buffers()}
    assert {"alpha_bar", "posterior_variance", "sqrt_alpha_bar"} <= names
    assert all(b.device.type == "meta" for b in meta.buffers())


class Spy(nn.Module):
    """Records its inputs and predicts `eps_fn(x_t, t)` (zeros by default)."""

    def __init__(self, eps_fn=None):
        super().__init__()
        self.eps_fn, self.calls = eps_fn, []

    def forward(self, x_t, t, y=None):
        self.calls.append((x_t.clone(), t.clone(), None if y is None else y.clone()))
        return self.eps_fn(x_t, t) if self.eps_fn else torch.zeros_like(x_t)


def test_loss_is_per_example_mse_against_the_noise(diffusion):
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand(8, 1, 4, 4, generator=gen) * 2 - 1
    spy = Spy()
    loss = diffusion.loss(spy, x0, generator=gen)
    assert loss.shape == (8,)
    (x_t, t, y), = spy.calls
    assert y is None and t.shape == (8,) and t.dtype == torch.long
    # with eps_pred = 0 the loss is mean(eps^2), and eps can be recovered from x_t
    eps = (x_t - extract(diffusion.sqrt_alpha_bar, t, x0.shape) * x0) / extract(
        diffusion.sqrt_one_minus_alpha_bar, t, x0.shape)
    torch.testing.assert_close(loss, eps.pow(2).flatten(1).mean(1), rtol=1e-4, atol=1e-5)

    # an oracle that knows x0 predicts the noise exactly: zero loss
    def oracle(x_t, t):
        return (x_t - extract(diffusion.sqrt_alpha_bar, t, x0.shape) * x0) / extract(
            diffusion.sqrt_one_minus_alpha_bar, t, x0.shape)
    assert diffusion.loss(Spy(oracle), x0, generator=gen).max().item() < 1e-8


def test_loss_draws_timesteps_over_the_whole_range(diffusion):
    spy = Spy()
    diffusion.loss(spy, torch.zeros(4000, 1, 1, 1), generator=torch.Generator().manual_seed(4))
    t = spy.calls[0][1]
    assert t.min().item() >= 0 and t.max().item() <= 999
    assert t.min().item() < 10 and t.max().item() > 990


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_logsnr_normal_draws_timesteps_with_that_log_snr_distribution(schedule):
    diffusion = Diffusion(make_betas(schedule, 1000))
    spy = Spy()
    diffusion.loss(spy, torch.zeros(20000, 1, 1, 1), generator=torch.Generator().manual_seed(6),
                   logsnr_normal=(1.0, 2.0))
    t = spy.calls[0][1]
    log_snr = (diffusion.alpha_bar[t] / (1 - diffusion.alpha_bar[t])).double().log()
    assert abs(log_snr.mean().item() - 1.0) < 0.06 and abs(log_snr.std().item() - 2.0) < 0.06
    assert t.min().item() >= 0 and t.max().item() <= 999
    # far out in the tails: clamped to the ends of the schedule, not out of range
    far = diffusion.sample_t(100, "cpu", torch.Generator().manual_seed(7), logsnr_normal=(0.0, 100.0))
    assert far.min().item() == 0 and far.max().item() == 999


def test_uniform_timesteps_are_unchanged_by_the_logsnr_option(diffusion):
    gen = torch.Generator().manual_seed(8)
    expected = torch.randint(0, 1000, (64,), generator=gen)
    assert torch.equal(diffusion.sample_t(64, "cpu", torch.Generator().manual_seed(8)), expected)


def test_p_uncond_drops_labels(diffusion):
    x0 = torch.zeros(2000, 1, 1, 1)
    y = torch.randint(0, 10, (2000,), generator=torch.Generator().manual_seed(5))
    seen = {}
    for p in (0.0, 0.5, 1.0):
        spy = Spy()
        diffusion.loss(spy, x0, y, p_uncond=p, generator=torch.Generator().manual_seed(6))
        seen[p] = spy.calls[0][2]
    assert torch.equal(seen[0.0], y)
    assert torch.all(seen[1.0] == NULL_LABEL)
    dropped = seen[0.5] == NULL_LABEL
    assert 0.45 < dropped.float().mean().item() < 0.55
    assert torch.equal(seen[0.5][~dropped], y[~dropped])


def v_diffusion(schedule="linear", timesteps=1000):
    return Diffusion(make_betas(schedule, timesteps), prediction="v")


def test_unknown_prediction_is_refused():
    with pytest.raises(ValueError, match="unknown prediction 'x0'"):
        Diffusion(make_betas("linear", 10), prediction="x0")


def test_eps_and_x0_recover_both_from_the_true_v():
    """v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022): from (x_t, v) both eps and x0 come back."""
    diffusion = v_diffusion("cosine")
    gen = torch.Generator().manual_seed(7)
    x0 = torch.rand(6, 1, 4, 4, generator=gen) * 2 - 1
    eps = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([0, 1, 250, 500, 900, 999])
    x_t = diffusion.q_sample(x0, t, eps)
    ab = diffusion.alpha_bar[t].reshape(-1, 1, 1, 1).double()
    v = ab.sqrt() * eps.double() - (1 - ab).sqrt() * x0.double()
    eps_back, x0_back = diffusion.eps_and_x0(x_t, t, v.float())
    torch.testing.assert_close(eps_back, eps, atol=1e-4, rtol=0)
    torch.testing.assert_close(x0_back, x0, atol=1e-4, rtol=0)
    # for an eps-predicting diffusion the output is eps itself
    eps_same, x0_eps = Diffusion(make_betas("cosine", 1000)).eps_and_x0(x_t, t, eps)
    assert eps_same is eps
    torch.testing.assert_close(x0_eps, x0, atol=2e-3, rtol=0)


def test_v_loss_is_mse_against_v_and_zero_for_an_oracle():
    diffusion = v_diffusion()
    gen = torch.Generator().manual_seed(8)
    x0 = torch.rand(8, 1, 4, 4, generator=gen) * 2 - 1
    spy = Spy()
    loss = diffusion.loss(spy, x0, generator=torch.Generator().manual_seed(9))
    (x_t, t, _), = spy.calls
    a, s = extract(diffusion.sqrt_alpha_bar, t, x0.shape), extract(diffusion.sqrt_one_minus_alpha_bar, t, x0.shape)
    eps = (x_t - a * x0) / s
    v = a * eps - s * x0
    torch.testing.assert_close(loss, v.pow(2).flatten(1).mean(1), rtol=1e-3, atol=1e-5)

    def oracle(x_t, t):
        a, s = extract(diffusion.sqrt_alpha_bar, t, x0.shape), extract(diffusion.sqrt_one_minus_alpha_bar, t, x0.shape)
        return a * (x_t - a * x0) / s - s * x0
    assert diffusion.loss(Spy(oracle), x0, generator=gen).max().item() < 1e-6


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weights_are_the_x0_loss_clamped_at_gamma(prediction):
    """Min-SNR-gamma (Hang et al. 2023): with a zero prediction the weighted loss is
    min(snr, gamma) / snr * |eps|^2 for eps and min(snr, gamma) / (snr + 1) * |v|^2 for v; both are
    min(snr, gamma) times the error in x0 that the prediction implies."""
    diffusion = Diffusion(make_betas("linear", 1000), prediction=prediction)
    x0 = torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(10)) * 2 - 1
    plain = diffusion.loss(Spy(), x0, generator=torch.Generator().manual_seed(11))
    spy = Spy()
    weighted = diffusion.loss(spy, x0, generator=torch.Generator().manual_seed(11), min_snr_gamma=5.0)
    (x_t, t, _), = spy.calls
    snr = diffusion.alpha_bar[t] / (1 - diffusion.alpha_bar[t])
    expected = snr.clamp(max=5.0) / (snr if prediction == "eps" else snr + 1)
    torch.testing.assert_close(weighted, plain * expected, rtol=1e-5, atol=1e-7)
    assert (snr > 5).any() and (snr < 5).any()  # both sides of the clamp were drawn
    # the weighted loss is min(snr, gamma) * |x0 - x0_pred|^2, x0_pred from the zero prediction
    _, x0_pred = diffusion.eps_and_x0(x_t, t, torch.zeros_like(x_t))
    torch.testing.assert_close(weighted, snr.clamp(max=5.0) * (x0 - x0_pred).pow(2).flatten(1).mean(1),
                               rtol=1e-3, atol=1e-5)
