"""Samplers against analytic optimal denoisers, plus the properties that make sampling reproducible, and
guidance as model wrappers with the sampler settings that name them."""

import json

import pytest
import torch
from torch import nn

from ddpm import (
    NULL_LABEL,
    Autoguided,
    ClassifierFree,
    Diffusion,
    DiffusionConfig,
    ImageGenerator,
    SamplerSetting,
    UNet,
    UNetConfig,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    dpm_solver_sample,
    generate,
    guidance_interval,
    guided,
    make_betas,
)
from ddpm.noise import fold_seed
from ddpm.samplers import SPACINGS, default_steps
from ddpm.settings import sampler_settings


class PointDenoiser(nn.Module):
    """E[eps | x_t] when the data is the single image x*: eps = (x_t - sqrt(ab) x*) / sqrt(1 - ab)."""

    def __init__(self, diffusion: Diffusion, x_star: torch.Tensor):
        super().__init__()
        self.alpha_bar, self.x_star = diffusion.alpha_bar.double(), x_star.double()

    def forward(self, x_t, t, y=None):
        ab = self.alpha_bar[t].reshape(-1, 1, 1, 1)
        return ((x_t.double() - ab.sqrt() * self.x_star) / (1 - ab).sqrt()).float()


class GaussianDenoiser(nn.Module):
    """E[eps | x_t] for per-pixel N(mu, s^2) data: eps = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab)."""

    def __init__(self, diffusion: Diffusion, mu: torch.Tensor, s: torch.Tensor):
        super().__init__()
        self.alpha_bar, self.mu, self.s = diffusion.alpha_bar.double(), mu.double(), s.double()

    def forward(self, x_t, t, y=None):
        ab = self.alpha_bar[t].reshape(-1, 1, 1, 1)
        eps = (1 - ab).sqrt() * (x_t.double() - ab.sqrt() * self.mu) / (ab * self.s**2 + 1 - ab)
        return eps.float()


@pytest.fixture(scope="module")
def diffusion() -> Diffusion:
    return Diffusion(DiffusionConfig(schedule="linear", timesteps=1000).betas())


X_STAR = torch.tensor([[-0.9, 0.0], [0.3, 1.0]]).reshape(1, 1, 2, 2)
MU = torch.tensor([[0.5, -0.3], [0.0, 0.2]]).reshape(1, 1, 2, 2)
S = torch.tensor([[0.1, 0.3], [0.5, 0.2]]).reshape(1, 1, 2, 2)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmsolver"])
def test_single_point_data_is_recovered_exactly(diffusion, sampler):
    model = PointDenoiser(diffusion, X_STAR)
    x_T = torch.randn(16, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    if sampler == "ddim":
        x0 = ddim_sample(model, diffusion, x_T, steps=20, eta=0.0, generator=gen)
    elif sampler == "dpmsolver":
        x0 = dpm_solver_sample(model, diffusion, x_T, steps=20)
    else:
        x0 = ddpm_sample(model, diffusion, x_T, generator=gen)
    torch.testing.assert_close(x0, X_STAR.expand_as(x0), atol=1e-3, rtol=0)


def sample_gaussian(diffusion, sampler, n=4000, steps=1000):
    model = GaussianDenoiser(diffusion, MU, S)
    x_T = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(3)
    if sampler == "ddim":
        return x_T, ddim_sample(model, diffusion, x_T, steps=steps, eta=0.0, generator=gen)
    return x_T, ddpm_sample(model, diffusion, x_T, generator=gen)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_gaussian_data_moments_are_reproduced(diffusion, sampler):
    """Ancestral sampling, and DDIM with eta = 0 over all T steps (the probability-flow ODE)."""
    n = 4000
    _, x0 = sample_gaussian(diffusion, sampler, n)
    torch.testing.assert_close(x0.mean(0, keepdim=True), MU, atol=4 * S.max().item() / n**0.5, rtol=0)
    # sampling error of a variance over 4000 samples is ~2.2%; allow discretisation error on top
    torch.testing.assert_close(x0.var(0, keepdim=True), S**2, rtol=0.1, atol=0)


def test_ddim_20_steps_is_the_euler_map_of_the_ode(diffusion):
    """Song et al. eq. 13-14: in xbar = x / sqrt(ab), sigma = sqrt((1 - ab) / ab), a DDIM step is the Euler step
    xbar' = xbar + (sigma' - sigma) eps. For Gaussian data eps = sigma (xbar - mu) / (s^2 + sigma^2), so 20 steps
    map x_T to mu + (x_T / sqrt(ab_start) - mu) prod_i (1 + (sigma_{i-1} - sigma_i) sigma_i / (s^2 + sigma_i^2)),
    which under-disperses (a known cost of few steps) but keeps the mean."""
    x_T, x0 = sample_gaussian(diffusion, "ddim", n=4000, steps=20)
    ab = torch.cumprod(1 - make_betas("linear", 1000), 0)
    taus = list(range(0, 1000, 50))  # i * T / S
    sigmas = [((1 - ab[t]) / ab[t]).sqrt() for t in reversed(taus)] + [torch.tensor(0.0, dtype=torch.float64)]
    mu, s2 = MU.double(), S.double() ** 2
    gain = torch.ones_like(mu)
    for sigma, sigma_prev in zip(sigmas[:-1], sigmas[1:]):
        gain = gain * (1 + (sigma_prev - sigma) * sigma / (s2 + sigma**2))
    expected = mu + (x_T.double() / ab[taus[-1]].sqrt() - mu) * gain
    torch.testing.assert_close(x0.double(), expected, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(x0.mean(0, keepdim=True), MU, atol=0.02, rtol=0)
    assert torch.all(x0.var(0, keepdim=True) < S**2)


def gaussian_flow(diffusion, x_T, t_start, t_end, mu, s):
    """The exact probability-flow ODE map from x_T at t_start to t_end for per-pixel N(mu, s^2) data: the
    marginal at t is N(sqrt(ab) mu, ab s^2 + 1 - ab), and the flow keeps each pixel's standardized value."""
    ab, mu, s = diffusion.alpha_bar.double(), mu.double(), s.double()
    z = (x_T.double() - ab[t_start].sqrt() * mu) / (ab[t_start] * s**2 + 1 - ab[t_start]).sqrt()
    return ab[t_end].sqrt() * mu + (ab[t_end] * s**2 + 1 - ab[t_end]).sqrt() * z


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpm_solver_is_second_order_where_ddim_is_first(schedule):
    """Against the exact ODE solution for Gaussian data, at t = 499, which 10, 20 and 40 trailing steps all visit:
    doubling the steps shrinks DDIM's error about 2x (Euler) and DPM-Solver++(2M)'s about 4x."""
    diffusion = Diffusion(make_betas(schedule, 1000))
    s = torch.full_like(S, 0.5)
    model = GaussianDenoiser(diffusion, MU, s)
    x_T = torch.randn(512, 1, 2, 2, generator=torch.Generator().manual_seed(6))
    exact = gaussian_flow(diffusion, x_T, 999, 499, MU, s)
    err = {}
    for name, sampler in (("ddim", ddim_sample), ("dpm", dpm_solver_sample)):
        for steps in (10, 20, 40):
            taus = ddim_timesteps(1000, steps, "trailing")
            _, traj = sampler(model, diffusion, x_T, steps, spacing="trailing", return_trajectory=True)
            err[name, steps] = (traj["x_t"][steps - 1 - taus.index(499)].double() - exact).abs().max().item()
    for steps in (10, 20):
        assert 1.6 < err["ddim", steps] / err["ddim", 2 * steps] < 2.4
        assert 3.0 < err["dpm", steps] / err["dpm", 2 * steps] < 4.5
    assert err["dpm", 40] < err["ddim", 40] / 5


@pytest.mark.parametrize("steps", [1, 2])
def test_dpm_solver_with_at_most_two_steps_is_ddim(diffusion, steps):
    """Its first step has no earlier x0 to extrapolate from and its last lands on x0: both are DDIM's steps."""
    model = GaussianDenoiser(diffusion, MU, S)
    x_T = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(dpm_solver_sample(model, diffusion, x_T, steps, clip_x0=True),
                               ddim_sample(model, diffusion, x_T, steps, clip_x0=True), atol=1e-5, rtol=0)
    assert not torch.allclose(dpm_solver_sample(model, diffusion, x_T, 3), ddim_sample(model, diffusion, x_T, 3))


def test_ddim_timesteps():
    assert ddim_timesteps(1000, 50) == [20 * i for i in range(50)]
    assert ddim_timesteps(1000, 1000) == list(range(1000))
    assert ddim_timesteps(10, 1) == [0]
    assert ddim_timesteps(10, 3) == [0, 3, 6]
    for bad in (0, 1001):
        with pytest.raises(ValueError):
            ddim_timesteps(1000, bad)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_spacings_give_distinct_increasing_steps_in_range(schedule):
    logsnr = Diffusion(make_betas(schedule, 1000)).log_snr
    assert ddim_timesteps(1000, 50, "trailing") == [20 * i + 19 for i in range(50)]
    assert ddim_timesteps(10, 3, "trailing") == [2, 5, 9]
    quad = ddim_timesteps(1000, 50, "quadratic")
    assert quad[0] == 0 and quad[-1] == 999 and quad[1:4] == [1, 2, 4]  # c i^2, nudged up where they collide
    gaps = [b - a for a, b in zip(quad, quad[1:])]
    assert gaps[-1] > 10 * gaps[0]
    for steps in (1, 5, 50, 999, 1000):
        for spacing in SPACINGS:
            taus = ddim_timesteps(1000, steps, spacing, logsnr)
            assert len(taus) == steps and all(0 <= a < b < 1000 for a, b in zip(taus, taus[1:])), (spacing, steps)
    even = ddim_timesteps(1000, 20, "logsnr", logsnr)
    assert even[0] == 0 and even[-1] == 999
    if schedule == "linear":  # smooth in t; the cosine's clipped last betas make its log-SNR jump at T - 1
        steps_in_logsnr = torch.tensor((logsnr[even[:-1]] - logsnr[even[1:]]).tolist())
        assert steps_in_logsnr.sub((logsnr[0] - logsnr[-1]) / 19).abs().max() < 0.3  # even, up to rounding
    with pytest.raises(ValueError, match="needs the schedule's log_snr"):
        ddim_timesteps(1000, 10, "logsnr")
    with pytest.raises(ValueError, match="unknown spacing 'cubic'"):
        ddim_timesteps(1000, 10, "cubic")


def test_ddim_sample_visits_the_spaced_steps(diffusion):
    seen = []

    def model(x, t, y=None):
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    ddim_sample(model, diffusion, torch.randn(2, 1, 2, 2), steps=4, spacing="trailing")
    assert seen == list(reversed(ddim_timesteps(diffusion.timesteps, 4, "trailing")))


def test_ddim_eta_0_is_deterministic(diffusion):
    model = GaussianDenoiser(diffusion, MU, S)
    x_T = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(4))
    a = ddim_sample(model, diffusion, x_T, steps=10, eta=0.0, generator=torch.Generator().manual_seed(5))
    b = ddim_sample(model, diffusion, x_T, steps=10, eta=0.0, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    c = ddim_sample(model, diffusion, x_T, steps=10, eta=1.0, generator=torch.Generator().manual_seed(5))
    d = ddim_sample(model, diffusion, x_T, steps=10, eta=1.0, generator=torch.Generator().manual_seed(6))
    assert not torch.allclose(c, d)  # the noise stream matters once eta > 0


def tiny_unet(num_classes=None, image_size=8, seed=0) -> UNet:
    """A tiny UNet whose zero-initialised output layers are perturbed so its output depends on the input."""
    torch.manual_seed(seed)
    model = UNet(UNetConfig(image_size=image_size, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                            attention_resolutions=(image_size // 2,), num_heads=2, dropout=0.1,
                            num_classes=num_classes))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_ddim_with_all_steps_and_eta_1_is_ddpm():
    diffusion = Diffusion(make_betas("linear", 50, beta_end=0.3))
    model = tiny_unet()
    x_T = ImageGenerator(7, range(4)).randn((4, 1, 8, 8))
    a = ddpm_sample(model, diffusion, x_T, generator=ImageGenerator(8, range(4)))
    b = ddim_sample(model, diffusion, x_T, steps=50, eta=1.0, generator=ImageGenerator(8, range(4)))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # and with the analytic denoiser over the full 1000-step schedule
    diffusion = Diffusion(make_betas("linear", 1000))
    model = GaussianDenoiser(diffusion, MU, S)
    x_T = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(9))
    a = ddpm_sample(model, diffusion, x_T, generator=torch.Generator().manual_seed(10))
    b = ddim_sample(model, diffusion, x_T, steps=1000, eta=1.0, generator=torch.Generator().manual_seed(10))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_ddpm_on_fewer_steps_is_the_strided_ancestral_chain(diffusion):
    """DDPM by default runs all T steps; on S < T it is ancestral sampling on the respaced chain, whose step
    is DDIM's with eta = 1: with an exact denoiser it keeps the data's mean (its variance comes out low on so
    few steps, as the posterior variance's does) and recovers single-point data exactly."""
    model = GaussianDenoiser(diffusion, MU, S)
    full = generate(model, diffusion, 8, (1, 2, 2), seed=0, method="ddpm")
    assert torch.equal(full, generate(model, diffusion, 8, (1, 2, 2), seed=0, method="ddpm", steps=1000))
    strided = generate(model, diffusion, 8, (1, 2, 2), seed=0, method="ddpm", steps=25, spacing="trailing")
    assert torch.equal(strided, generate(model, diffusion, 8, (1, 2, 2), seed=0, method="ddim", steps=25, eta=1.0,
                                         spacing="trailing"))
    assert not torch.equal(strided, full)
    n = 4000
    x_T = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    x0 = ddim_sample(model, diffusion, x_T, steps=50, eta=1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x0.mean(0, keepdim=True), MU, atol=4 * S.max().item() / n**0.5, rtol=0)
    point = ddim_sample(PointDenoiser(diffusion, X_STAR), diffusion, x_T[:16], steps=25, eta=1.0, spacing="trailing",
                        generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(point, X_STAR.expand_as(point), atol=1e-3, rtol=0)


def test_default_steps_are_all_t_for_ddpm_and_50_at_most_t_for_the_others(diffusion):
    assert [default_steps(m, 1000) for m in ("ddpm", "ddim", "dpmsolver")] == [1000, 50, 50]
    assert default_steps("ddim", 20) == 20
    model = GaussianDenoiser(diffusion, MU, S)
    assert torch.equal(generate(model, diffusion, 2, (1, 2, 2), seed=0),
                       generate(model, diffusion, 2, (1, 2, 2), seed=0, steps=50))


def test_sampler_settings_of_ddpm_are_all_steps_or_a_strided_chain():
    settings = sampler_settings("ddpm", 1000, steps=(1000, 25, 2000), etas=(0.0, 0.5), spacing="trailing", cfg=[0.5])
    assert [(s.steps, s.eta, s.spacing, s.tag) for s in settings] == [
        (1000, 1.0, "uniform", "ddpm1000_w0.5"), (25, 1.0, "trailing", "ddpm25_w0.5")]  # 2000 > T: left out


class LabelShift(nn.Module):
    """D(x_t, y) = x_t + y, and x_t + 10 for the null label; counts its calls and the labels it saw."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x_t, t, y=None):
        self.calls.append(None if y is None else y.tolist())
        if y is None:
            return x_t + 10
        return x_t + torch.where(y == NULL_LABEL, 10.0, y.float()).reshape(-1, 1, 1, 1)


def test_classifier_free_guidance_by_hand():
    """(1 + w) D(x_t, y) - w D(x_t, null) = x_t + (1 + w) y - 10 w, from one call on the doubled batch."""
    net = LabelShift()
    x_t, t, y = torch.zeros(3, 1, 1, 1), torch.tensor([5, 5, 5]), torch.tensor([0, 1, 2])
    out = ClassifierFree(net, 0.5)(x_t, t, y)
    assert out.flatten().tolist() == [-5.0, -3.5, -2.0]
    assert net.calls == [[0, 1, 2, NULL_LABEL, NULL_LABEL, NULL_LABEL]]
    net.calls.clear()
    assert ClassifierFree(net, 0.0)(x_t, t, y).flatten().tolist() == [0.0, 1.0, 2.0]  # w = 0: the plain model
    assert ClassifierFree(net, 3.0)(x_t, t).flatten().tolist() == [10.0] * 3         # no labels: the same
    assert net.calls == [[0, 1, 2], None]


def test_guidance_interval_guides_only_its_noise_levels():
    """Kynkäänniemi et al. 2024: sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) in (low, high] guided, the
    plain conditional prediction elsewhere, from one call without the label-free half."""
    diffusion = Diffusion(make_betas("cosine", 100))
    sigma = ((1 - diffusion.alpha_bar.double()) / diffusion.alpha_bar.double()).sqrt()
    active = guidance_interval(diffusion, 0.5, 3.0)
    assert active.tolist() == ((sigma > 0.5) & (sigma <= 3.0)).tolist()
    assert 0 < int(active.sum()) < 100 and not active[0] and not active[-1]
    inside, outside = int(active.nonzero()[0]), 0
    net = LabelShift()
    x_t, y = torch.zeros(2, 1, 1, 1), torch.tensor([1, 2])
    model = ClassifierFree(net, 0.5, active)
    assert model(x_t, torch.full((2,), inside), y).flatten().tolist() == [-3.5, -2.0]  # guided, as by hand
    assert model(x_t, torch.full((2,), outside), y).flatten().tolist() == [1.0, 2.0]   # the conditional model
    assert net.calls == [[1, 2, NULL_LABEL, NULL_LABEL], [1, 2]]
    mixed = model(x_t, torch.tensor([inside, outside]), y).flatten().tolist()
    assert mixed == [-3.5, 2.0]  # a batch of mixed timesteps: each image as its own timestep says
    auto = Autoguided(net, lambda x, t, y=None: x + 4, 1.0, active)
    assert auto(x_t, torch.full((2,), inside), y).flatten().tolist() == [-2.0, 0.0]   # 2 D - D_guide
    assert auto(x_t, torch.full((2,), outside), y).flatten().tolist() == [1.0, 2.0]
    assert guided(net, 0.5, active=active).active is active
    for low, high in ((1.0, 1.0), (-1.0, 2.0)):
        with pytest.raises(ValueError, match="0 <= low < high"):
            guidance_interval(diffusion, low, high)


def test_classifier_free_guidance_combines_conditional_and_unconditional_predictions():
    model = tiny_unet(num_classes=3)
    gen = torch.Generator().manual_seed(11)
    x_t = torch.randn(5, 1, 8, 8, generator=gen)
    t = torch.tensor([0, 10, 50, 80, 99])
    y = torch.tensor([0, 1, 2, 1, 0])
    with torch.no_grad():
        eps_c = model(x_t, t, y)
        eps_u = model(x_t, t, torch.full_like(y, NULL_LABEL))
        assert not torch.allclose(eps_c, eps_u, atol=1e-3)  # the labels matter, or the test proves nothing
        assert torch.equal(ClassifierFree(model, 0.0)(x_t, t, y), eps_c)
        for w in (0.5, 3.0):
            torch.testing.assert_close(ClassifierFree(model, w)(x_t, t, y), (1 + w) * eps_c - w * eps_u,
                                       atol=1e-5, rtol=1e-5)
        # no labels: the plain (unconditional) prediction whatever w is
        torch.testing.assert_close(ClassifierFree(model, 3.0)(x_t, t), eps_u, atol=1e-6, rtol=0)


class TwoCalls(nn.Module):
    """Classifier-free guidance written out with two separate calls, as a reference."""

    def __init__(self, model, w):
        super().__init__()
        self.model, self.w = model, w

    def forward(self, x_t, t, y):
        uncond = self.model(x_t, t, torch.full_like(y, NULL_LABEL))
        return (1 + self.w) * self.model(x_t, t, y) - self.w * uncond


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver"])
def test_every_sampler_samples_a_classifier_free_guided_model(sampler):
    diffusion = Diffusion(make_betas("linear", 20, beta_end=0.3))
    net = tiny_unet(num_classes=3)
    y = torch.tensor([0, 1, 2, 1])
    x_T = ImageGenerator(14, range(4)).randn((4, 1, 8, 8))

    def run(model):
        gen = ImageGenerator(15, range(4))
        if sampler == "ddpm":
            return ddpm_sample(model, diffusion, x_T, y=y, generator=gen)
        if sampler == "ddim":
            return ddim_sample(model, diffusion, x_T, 5, eta=0.5, y=y, generator=gen)
        return dpm_solver_sample(model, diffusion, x_T, 5, y=y)

    with torch.no_grad():
        guided = run(ClassifierFree(net, 2.0))
        torch.testing.assert_close(guided, run(TwoCalls(net, 2.0)), atol=1e-4, rtol=1e-4)
        assert torch.equal(run(ClassifierFree(net, 0.0)), run(net))
        assert not torch.allclose(guided, run(net), atol=1e-2)  # the weight reaches the sampler
    counter = LabelShift()
    run(ClassifierFree(counter, 2.0))
    assert len(counter.calls) == (20 if sampler == "ddpm" else 5)  # one batched call per step
    assert all(c == [0, 1, 2, 1] + [NULL_LABEL] * 4 for c in counter.calls)


def test_autoguidance_extrapolates_from_the_guide_to_the_model():
    model, guide = tiny_unet(seed=0).eval(), tiny_unet(seed=1).eval()
    x_t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(12))
    t = torch.tensor([0, 30, 60, 99])
    with torch.no_grad():
        d, d_guide = model(x_t, t), guide(x_t, t)
        assert not torch.allclose(d, d_guide, atol=1e-3)  # two different networks, or the test proves nothing
        assert torch.equal(Autoguided(model, guide, 0.0)(x_t, t), d)
        for w in (0.5, 2.0):
            torch.testing.assert_close(Autoguided(model, guide, w)(x_t, t), (1 + w) * d - w * d_guide)
    # in a sampler, in place of the model: guided by itself, the model is unchanged
    diffusion = Diffusion(make_betas("linear", 100))
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(13))
    plain = ddim_sample(model, diffusion, x_T, steps=10)
    torch.testing.assert_close(ddim_sample(Autoguided(model, model, 2.0), diffusion, x_T, steps=10), plain)
    assert not torch.allclose(ddim_sample(Autoguided(model, guide, 2.0), diffusion, x_T, steps=10), plain, atol=1e-3)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_per_image_seeds_do_not_depend_on_batching(sampler):
    diffusion = Diffusion(make_betas("linear", 20, beta_end=0.3))
    model = tiny_unet(num_classes=3)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])

    def run(indices):
        idx = list(indices)
        x_T = ImageGenerator(42, idx).randn((len(idx), 1, 8, 8))
        gen = ImageGenerator(43, idx)
        if sampler == "ddpm":
            return ddpm_sample(ClassifierFree(model, 1.0), diffusion, x_T, y=y[idx], generator=gen)
        return ddim_sample(ClassifierFree(model, 1.0), diffusion, x_T, steps=10, eta=1.0, y=y[idx], generator=gen)

    whole = run(range(8))
    halves = torch.cat([run(range(4)), run(range(4, 8))])
    torch.testing.assert_close(whole, halves, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(whole[:4], whole[4:])


def test_image_generator_noise_depends_only_on_seed_and_index():
    a = ImageGenerator(1, range(6)).randn((6, 2, 3, 3))
    b = ImageGenerator(1, [4, 5]).randn((2, 2, 3, 3))
    assert torch.equal(a[4:], b)
    assert not torch.equal(ImageGenerator(2, [4, 5]).randn((2, 2, 3, 3)), b)
    with pytest.raises(AssertionError):
        ImageGenerator(1, range(3)).randn((4, 1, 2, 2))


def test_fold_seed_keeps_the_seeds_that_fit_and_does_not_alias_larger_ones():
    for bits in (32, 64):
        top = 2**bits - 1
        assert [fold_seed(v, bits) for v in (0, 12345, top)] == [0, 12345, top]
        for low in (0, 7, top):  # values that differ only above the low bits
            folded = [fold_seed(low + (high << bits), bits) for high in (0, 1, 2, top)]
            assert len(set(folded)) == 4 and all(0 <= v <= top for v in folded)
    # image i's noise for the seeds that always fitted is what it was: torch seeded with seed * 1_000_003 + i
    seed = 2**24 - 1
    before = torch.randn((2, 3), generator=torch.Generator().manual_seed(seed * 1_000_003 + 5))
    assert torch.equal(ImageGenerator(seed, [5]).randn((1, 2, 3))[0], before)
    assert ImageGenerator(2**63 - 1, range(2)).randn((2, 3)).shape == (2, 3)


def test_return_trajectory():
    diffusion = Diffusion(make_betas("linear", 30))
    model = GaussianDenoiser(diffusion, MU, S)
    x_T = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(12))

    x0, traj = ddpm_sample(model, diffusion, x_T, generator=torch.Generator().manual_seed(13),
                           return_trajectory=True)
    assert len(traj["x_t"]) == 31 and len(traj["x0"]) == 30
    assert torch.equal(traj["x_t"][0], x_T) and torch.equal(traj["x_t"][-1], x0)
    plain = ddpm_sample(model, diffusion, x_T, generator=torch.Generator().manual_seed(13))
    assert torch.equal(plain, x0)

    x0, traj = ddim_sample(model, diffusion, x_T, steps=7, eta=0.5, generator=torch.Generator().manual_seed(13),
                           return_trajectory=True)
    assert len(traj["x_t"]) == 8 and len(traj["x0"]) == 7
    assert torch.equal(traj["x_t"][0], x_T) and torch.equal(traj["x_t"][-1], x0)
    assert all(x.shape == x_T.shape for x in traj["x_t"] + traj["x0"])


class AsV(nn.Module):
    """An eps model's prediction rewritten as v = sqrt(ab) eps - sqrt(1 - ab) x0
    = (eps - sqrt(1 - ab) x_t) / sqrt(ab)."""

    def __init__(self, diffusion: Diffusion, eps_model: nn.Module):
        super().__init__()
        self.alpha_bar, self.eps_model = diffusion.alpha_bar.double(), eps_model

    def forward(self, x_t, t, y=None):
        ab = self.alpha_bar[t].reshape(-1, 1, 1, 1)
        return ((self.eps_model(x_t, t, y).double() - (1 - ab).sqrt() * x_t.double()) / ab.sqrt()).float()


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmsolver"])
def test_v_prediction_samples_like_the_same_model_predicting_eps(diffusion, sampler):
    """A v-predicting network that agrees with an eps-predicting one gives the same samples from the same noise."""
    v_diffusion = Diffusion(DiffusionConfig(schedule="linear", timesteps=1000).betas(), prediction="v")
    eps_model = GaussianDenoiser(diffusion, MU, S)
    x_T = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(4))
    out = {}
    for name, d, model in (("eps", diffusion, eps_model), ("v", v_diffusion, AsV(diffusion, eps_model))):
        gen = torch.Generator().manual_seed(5)
        if sampler == "ddim":
            out[name] = ddim_sample(model, d, x_T, steps=20, eta=0.5, generator=gen, clip_x0=True)
        elif sampler == "dpmsolver":
            out[name] = dpm_solver_sample(model, d, x_T, steps=20, clip_x0=True)
        else:
            out[name] = ddpm_sample(model, d, x_T, generator=gen)
    torch.testing.assert_close(out["v"], out["eps"], atol=2e-3, rtol=0)
    assert out["eps"].std() > 0.1  # a real spread of samples, not a collapse both agree on


TAGS = [  # (setting, tag, label): the tags name the pipeline's sample files (eval.json keys), so change them rarely
    (SamplerSetting("ddpm", 1000, 1.0), "ddpm1000", "DDPM-1000"),
    (SamplerSetting("ddpm", 1000, 1.0, cfg=2.0), "ddpm1000_w2", "DDPM-1000, w=2"),
    (SamplerSetting("ddpm", 25, 1.0, "trailing", autoguidance=1.0), "ddpm25_ag1", "DDPM-25, autoguidance w=1"),
    (SamplerSetting("ddim", 10), "ddim10_eta0", "DDIM-10 η=0"),
    (SamplerSetting("ddim", 10, 0.5, "trailing", cfg=0.5), "ddim10_eta0.5_w0.5", "DDIM-10 η=0.5, w=0.5"),
    (SamplerSetting("ddim", 5, cfg=0.0), "ddim5_eta0_w0", "DDIM-5 η=0, w=0"),  # conditional, even at w 0
    (SamplerSetting("ddim", 50, autoguidance=1.25), "ddim50_eta0_ag1.25", "DDIM-50 η=0, autoguidance w=1.25"),
    (SamplerSetting("dpmsolver", 20), "dpmsolver20", "DPM-Solver++(2M)-20"),
    (SamplerSetting("dpmsolver", 20, autoguidance=0.0), "dpmsolver20", "DPM-Solver++(2M)-20"),
    (SamplerSetting("dpmsolver", 5, spacing="logsnr", autoguidance=1.0), "dpmsolver5_ag1",
     "DPM-Solver++(2M)-5, autoguidance w=1"),
    (SamplerSetting("ddim", 10, cfg=2.0, autoguidance=1.0), "ddim10_eta0_w2_ag1", "DDIM-10 η=0, w=2, autoguidance w=1"),
    (SamplerSetting("ddim", 50, 0.0, "trailing", cfg=1.0, interval=(0.28, 5.42)), "ddim50_eta0_w1_gi0.28-5.42",
     "DDIM-50 η=0, w=1, σ∈(0.28, 5.42]"),
    (SamplerSetting("dpmsolver", 20, autoguidance=2.0, interval=(0, 3)), "dpmsolver20_ag2_gi0-3",
     "DPM-Solver++(2M)-20, autoguidance w=2, σ∈(0, 3]"),
    (SamplerSetting("dpmsolver", 20, autoguidance=1.0, sigma_rel=0.1), "dpmsolver20_ag1_ema0.1",
     "DPM-Solver++(2M)-20, autoguidance w=1, EMA σ_rel=0.1"),
    (SamplerSetting("ddim", 50, cfg=0.75, interval=(0.28, 5.42), sigma_rel=0.05),
     "ddim50_eta0_w0.75_gi0.28-5.42_ema0.05", "DDIM-50 η=0, w=0.75, σ∈(0.28, 5.42], EMA σ_rel=0.05"),
]


@pytest.mark.parametrize("setting, tag, label", TAGS, ids=[t for _, t, _ in TAGS])
def test_sampler_setting_tag_label_and_dict(setting, tag, label):
    assert setting.tag == tag
    assert setting.label == label
    row = json.loads(json.dumps(setting.to_dict()))  # as index.json stores it
    assert row == {"method": setting.method, "steps": setting.steps, "eta": setting.eta, "spacing": setting.spacing,
                   "cfg": setting.cfg, "autoguidance": setting.autoguidance,
                   "interval": list(setting.interval) if setting.interval else None, "sigma_rel": setting.sigma_rel,
                   "tag": tag}
    assert SamplerSetting.from_dict(row) == setting
    assert SamplerSetting.from_dict({**row, "variant": "cond", "seed": 0, "fid": 3.5}) == setting


def test_a_sweep_over_post_hoc_ema_lengths_repeats_every_setting_per_length():
    sweep = sampler_settings("ddim", 100, steps=(10, 20), cfg=(1.0,), sigma_rels=(None, 0.1))
    assert [s.tag for s in sweep] == ["ddim10_eta0_w1", "ddim20_eta0_w1", "ddim10_eta0_w1_ema0.1",
                                      "ddim20_eta0_w1_ema0.1"]


def test_sampler_setting_curve_label_leaves_out_the_steps():
    assert SamplerSetting("ddim", 10, cfg=0.5).curve_label == "DDIM η=0, w=0.5"
    assert SamplerSetting("dpmsolver", 20, autoguidance=1.0).curve_label == "DPM-Solver++(2M), autoguidance w=1"


def test_sampler_setting_rejects_bad_values_and_a_stale_tag():
    with pytest.raises(ValueError, match="does not match its setting, whose tag is 'ddim10_eta0_w2'"):
        SamplerSetting.from_dict({"method": "ddim", "steps": 10, "eta": 0.0, "cfg": 2.0, "tag": "ddim10_eta0"})
    for bad, name in (({"method": "euler"}, "method"), ({"steps": 0}, "steps"), ({"spacing": "cubic"}, "spacing"),
                      ({"cfg": -1.0}, "cfg"), ({"autoguidance": -0.5}, "autoguidance"), ({"eta": -1.0}, "eta"),
                      ({"interval": (2.0, 1.0)}, "interval"), ({"interval": (-1.0, 1.0)}, "interval"),
                      ({"interval": (1.0,)}, "interval"), ({"sigma_rel": 0.0}, "sigma_rel"),
                      ({"sigma_rel": 0.3}, "sigma_rel")):
        with pytest.raises(ValueError, match=f"SamplerSetting.{name} = "):
            SamplerSetting(**{"method": "ddim", "steps": 10, **bad})


def test_sampler_setting_model_wraps_the_network_as_it_says():
    net, guide = tiny_unet(num_classes=3, seed=0), tiny_unet(num_classes=3, seed=1)
    assert SamplerSetting("ddim", 10).model(net) is net
    assert SamplerSetting("ddim", 10, cfg=0.0).model(net) is net  # w = 0 is the plain model
    cfg = SamplerSetting("ddim", 10, cfg=2.0).model(net)
    assert isinstance(cfg, ClassifierFree) and cfg.model is net and cfg.w == 2.0
    auto = SamplerSetting("ddim", 10, autoguidance=1.5).model(net, guide)
    assert isinstance(auto, Autoguided) and (auto.model, auto.guide, auto.w) == (net, guide, 1.5)
    both = SamplerSetting("ddim", 10, cfg=2.0, autoguidance=1.5).model(net, guide)
    assert isinstance(both.model, ClassifierFree) and both.model.w == 2.0 and both.guide is guide
    with pytest.raises(ValueError, match="autoguidance w = 1.5 needs a guide model"):
        SamplerSetting("ddim", 10, autoguidance=1.5).model(net)
    # what a sweep samples: generate with the setting's model and options
    diffusion = Diffusion(make_betas("linear", 20, beta_end=0.3))
    s, labels = SamplerSetting("ddim", 4, cfg=2.0), torch.tensor([0, 1, 2])
    images = generate(s.model(net), diffusion, 3, (1, 8, 8), seed=0, method=s.method, steps=s.steps, eta=s.eta,
                      labels=labels, spacing=s.spacing)
    assert torch.equal(images, generate(ClassifierFree(net, 2.0), diffusion, 3, (1, 8, 8), seed=0, steps=4,
                                        labels=labels))


def test_sampler_setting_guides_only_in_its_interval():
    net, guide = tiny_unet(num_classes=3, seed=0), tiny_unet(num_classes=3, seed=1)
    diffusion = Diffusion(make_betas("cosine", 20))
    s = SamplerSetting("ddim", 4, cfg=2.0, interval=(0.5, 3.0))
    cfg = s.model(net, diffusion=diffusion)
    assert isinstance(cfg, ClassifierFree) and cfg.w == 2.0
    assert torch.equal(cfg.active, guidance_interval(diffusion, 0.5, 3.0))
    auto = SamplerSetting("ddim", 4, autoguidance=1.0, interval=[0.5, 3.0]).model(net, guide, diffusion)
    assert torch.equal(auto.active, cfg.active)
    with pytest.raises(ValueError, match="ddim4_eta0_w2_gi0.5-3: a guidance interval needs the diffusion"):
        s.model(net)
    labels = torch.tensor([0, 1, 2])
    sweep = sampler_settings("ddim", 20, steps=[4], cfg=[2.0], interval=[0.5, 3.0])
    assert sweep == [s]
    limited, everywhere, unguided = (generate(m, diffusion, 3, (1, 8, 8), seed=0, steps=4, labels=labels)
                                     for m in (cfg, ClassifierFree(net, 2.0), net))
    assert not torch.equal(limited, everywhere) and not torch.equal(limited, unguided)  # guided at some steps


def test_a_non_finite_result_is_an_error_naming_its_likely_cause():
    """A NaN sample would become a black picture: generate and the pictures refuse it instead, naming the weights
    when they are not finite, else the guidance weight."""
    from ddpm import NonFiniteImages
    from ddpm.pictures import reverse_strip

    net, labels = tiny_unet(num_classes=3), torch.arange(3)
    diffusion = Diffusion(make_betas("linear", 20, beta_end=0.3))
    assert generate(ClassifierFree(net, 1e10), diffusion, 3, (1, 8, 8), seed=0, steps=3, labels=labels).shape[0] == 3
    with pytest.raises(NonFiniteImages, match="^sampling gave NaN .* guidance weight too large"):
        generate(ClassifierFree(net, 1e30), diffusion, 3, (1, 8, 8), seed=0, steps=3, labels=labels)
    with torch.no_grad():
        next(net.parameters()).fill_(float("nan"))
    for draw in (lambda: generate(net, diffusion, 3, (1, 8, 8), seed=0, steps=3, labels=labels),
                 lambda: reverse_strip(net, diffusion, torch.randn(1, 1, 8, 8), y=labels[:1], steps=3)):
        with pytest.raises(NonFiniteImages, match="^the model's weights are not all finite"):
            draw()


def test_sampler_settings_refuse_values_that_are_not_finite():
    for bad in ({"eta": float("inf")}, {"cfg": float("inf")}, {"cfg": float("nan")}, {"autoguidance": float("inf")},
                {"interval": (0.0, float("inf"))}, {"interval": (float("nan"), 1.0)}):
        with pytest.raises(ValueError, match=f"SamplerSetting.{next(iter(bad))} = .* finite"):
            SamplerSetting(**{"method": "ddim", "steps": 10, **bad})
