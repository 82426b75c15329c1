"""Pictures of a trained model: the reverse process as a strip, noise interpolations, samplers side by
side, the noise schedules, and grids with row and column labels.

Functions return a `Picture` (uint8 images (N, C, H, W) with their grid layout and labels), uint8
images, or matplotlib figures; the caller decides where to save them. For guided pictures pass a guided
model (`ClassifierFree`, `Autoguided`, `SamplerSetting.model`) as the model.
"""

import math
import textwrap
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from .diffusion import Diffusion
from .samplers import ddim_sample, ddim_timesteps, ddpm_sample, generate, to_images
from .schedules import make_betas

GRID_PADDING = 2


def make_grid(images: torch.Tensor, nrow: int, padding: int = GRID_PADDING, pad_value: int = 255) -> torch.Tensor:
    """Tile images (N, C, H, W) `nrow` to a row, `padding` pixels between and around them:
    (C, rows * (H + padding) + padding, cols * (W + padding) + padding), torchvision's make_grid layout."""
    n, c, h, w = images.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = images.new_full((c, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value)
    for i, image in enumerate(images):
        row, col = divmod(i, cols)
        top, left = padding + row * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = image
    return grid


def grid_image(images: torch.Tensor, nrow: int) -> Image.Image:
    """make_grid(images, nrow) of uint8 images as a PIL image: grayscale for one channel, else RGB."""
    grid = make_grid(images, nrow)
    return Image.fromarray(grid[0].numpy() if grid.shape[0] == 1 else grid.permute(1, 2, 0).numpy())


@dataclass
class Picture:
    """uint8 images (N, C, H, W) shown `nrow` to a row, with optional labels per grid row and column."""
    images: torch.Tensor
    nrow: int
    title: str = ""
    row_labels: list[str] | None = None
    col_labels: list[str] | None = None

    def figure(self):
        """The grid as a matplotlib figure with the labels and the title."""
        return labelled_grid(self.images, self.nrow, row_labels=self.row_labels, col_labels=self.col_labels,
                             title=self.title)


def frame_indices(length: int, num_frames: int) -> list[int]:
    """`num_frames` evenly spaced indices into a sequence of `length` items, the first and the last included."""
    if num_frames >= length:
        return list(range(length))
    if num_frames == 1:
        return [length - 1]
    return [round(i * (length - 1) / (num_frames - 1)) for i in range(num_frames)]


def sample_trajectory(model: nn.Module, diffusion: Diffusion, x_T: torch.Tensor, *, y=None, method: str = "ddim",
                      steps: int = 50, generator=None, progress: bool = False):
    """Run a sampler with `return_trajectory=True`: (x_t list of S + 1, x0 prediction list of S, timesteps).

    method "ddim" is DDIM with eta = 0; "ddpm" is ancestral sampling (eta = 1, Song et al. 2020 eq. 16)
    over the same S-step sub-sequence, which for S = T is Ho et al.'s Algorithm 2 itself.
    timesteps[j] is the t at which the network saw x_t[j]."""
    if method == "ddpm" and steps == diffusion.timesteps:
        _, traj = ddpm_sample(model, diffusion, x_T, y=y, generator=generator, return_trajectory=True,
                              progress=progress)
        return traj["x_t"], traj["x0"], list(reversed(range(diffusion.timesteps)))
    if method not in ("ddpm", "ddim"):
        raise ValueError(f"unknown method {method!r}; valid: ddpm, ddim")
    _, traj = ddim_sample(model, diffusion, x_T, steps, eta=1.0 if method == "ddpm" else 0.0, y=y,
                          generator=generator, return_trajectory=True, progress=progress)
    return traj["x_t"], traj["x0"], list(reversed(ddim_timesteps(diffusion.timesteps, steps)))


def reverse_strip(model: nn.Module, diffusion: Diffusion, x_T: torch.Tensor, *, y=None, num_frames: int = 10,
                  method: str = "ddim", steps: int = 50, generator=None, progress: bool = False) -> Picture:
    """The reverse process of B images at F = `num_frames` evenly spaced steps, from x_T to the sample.

    Images uint8 (2 * B * F, C, H, W), F to a row (fewer if the sampler has fewer steps): row 2b is
    image b's x_t, row 2b + 1 the network's x0 prediction from that x_t; the last column is the final
    sample in both rows. Column labels give the timestep t the network saw."""
    xs, x0s, ts = sample_trajectory(model, diffusion, x_T, y=y, method=method, steps=steps, generator=generator,
                                    progress=progress)
    x0s = [*x0s, xs[-1]]  # the final sample is its own x0
    frames = frame_indices(len(xs), num_frames)
    top = torch.stack([xs[j] for j in frames], 1)    # (B, F, C, H, W)
    bottom = torch.stack([x0s[j] for j in frames], 1)
    images = torch.stack([top, bottom], 1).flatten(0, 2)  # (B * 2 * F, C, H, W), image-major
    labels = [f"t={ts[j]}" if j < len(ts) else "sample" for j in frames]
    return Picture(to_images(images, model), len(frames), row_labels=["x_t", "predicted x0"] * len(x_T),
                   col_labels=labels)


def slerp(a: torch.Tensor, b: torch.Tensor, alphas) -> torch.Tensor:
    """Spherical interpolation between noise tensors a and b (same shape S), (len(alphas), *S).

    Gaussian noise lives near a sphere; a straight line between two draws passes through low-norm
    points the model never saw, the great circle does not (Shoemake 1985; Song et al. 2020, sec. 5.3)."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = (a64 @ b64 / (a64.norm() * b64.norm())).clamp(-1, 1)
    theta = torch.arccos(cos)
    alphas = torch.as_tensor(alphas, dtype=torch.float64, device=a.device).reshape(-1, 1)
    if theta.abs() < 1e-6:  # (almost) parallel: the linear blend is exact
        out = (1 - alphas) * a64 + alphas * b64
    else:
        out = (torch.sin((1 - alphas) * theta) * a64 + torch.sin(alphas * theta) * b64) / torch.sin(theta)
    return out.to(a.dtype).reshape(-1, *a.shape)


def interpolation_row(model: nn.Module, diffusion: Diffusion, x_a: torch.Tensor, x_b: torch.Tensor, n: int, *,
                      y: int | None = None, steps: int = 50, progress: bool = False) -> torch.Tensor:
    """n images decoded by deterministic DDIM (eta = 0) from slerp(x_a, x_b) at n evenly spaced points.

    x_a, x_b: noise (C, H, W); y: one class for the whole row or None. Returns uint8 (n, C, H, W)."""
    x_T = slerp(x_a, x_b, torch.linspace(0, 1, n))
    labels = torch.full((n,), int(y), device=x_T.device) if y is not None else None
    x = ddim_sample(model, diffusion, x_T, steps, eta=0.0, y=labels, progress=progress)
    return to_images(x, model)


def interpolation(model: nn.Module, diffusion: Diffusion, x_a: torch.Tensor, x_b: torch.Tensor, n: int, *,
                  y: torch.Tensor | None = None, steps: int = 50, progress: bool = False) -> Picture:
    """One `interpolation_row` per pair: x_a, x_b noise (R, C, H, W), y (R,) or None -> R rows of n."""
    rows = [interpolation_row(model, diffusion, x_a[r], x_b[r], n, y=None if y is None else int(y[r]),
                              steps=steps, progress=progress) for r in range(len(x_a))]
    return Picture(torch.cat(rows), n, col_labels=[f"{a:.2f}" for a in torch.linspace(0, 1, n).tolist()])


def sampler_comparison(model: nn.Module, diffusion: Diffusion, num: int, shape: tuple[int, int, int], *, seed: int,
                       steps=(5, 10, 20, 50), y: torch.Tensor | None = None, progress: bool = False) -> Picture:
    """The same starting noise (image i's from (seed, i)) decoded by DDPM and by DDIM at each step count.

    Columns "DDPM S" (ancestral, eta = 1 over S steps; S = T is Algorithm 2 of Ho et al.) then "DDIM S"
    (eta = 0) for every S in `steps`; each column equals `generate(..., seed=seed)` with that sampler.
    Images uint8 (num * columns, C, H, W), one row per image, labelled columns."""
    columns, labels = [], []
    for method in ("ddpm", "ddim"):
        for s in steps:
            columns.append(generate(model, diffusion, num, shape, seed=seed, method=method, steps=s, labels=y,
                                    batch_size=num, progress=progress))
            labels.append(f"{method.upper()} {s}")
    return Picture(torch.stack(columns, 1).flatten(0, 1), len(columns), col_labels=labels)


def schedule_figure(timesteps: int = 1000, schedules=("linear", "cosine")):
    """beta_t, alpha_bar_t and log-SNR log(alpha_bar / (1 - alpha_bar)) against t for each schedule."""
    from matplotlib.figure import Figure  # imported here: the sampling commands need no matplotlib

    fig = Figure(figsize=(12, 3.6))
    axes = fig.subplots(1, 3)
    t = torch.arange(timesteps)
    for name in schedules:
        betas = make_betas(name, timesteps)
        alpha_bar = torch.cumprod(1 - betas, 0)
        axes[0].plot(t, betas, label=name)
        axes[1].plot(t, alpha_bar, label=name)
        axes[2].plot(t, torch.log(alpha_bar / (1 - alpha_bar)), label=name)
    for ax, title in zip(axes, ("beta_t", "alpha_bar_t", "log-SNR = log(alpha_bar / (1 - alpha_bar))")):
        ax.set(xlabel="t", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_yscale("log")
    fig.suptitle(f"Noise schedules, T = {timesteps}")
    fig.tight_layout()
    return fig


def labelled_grid(images: torch.Tensor, nrow: int, *, row_labels=None, col_labels=None, title: str | None = None,
                  scale: float = 2.5):
    """A matplotlib figure of the make_grid(images, nrow) grid with a label beside each row and above
    each column; images uint8 (N, C, H, W) with C = 1 or 3. `scale` screen pixels per image pixel at 100 dpi."""
    from matplotlib.figure import Figure

    grid = make_grid(images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images, nrow).permute(1, 2, 0)
    rows, cols = math.ceil(len(images) / min(nrow, len(images))), min(nrow, len(images))
    h, w = images.shape[-2] + GRID_PADDING, images.shape[-1] + GRID_PADDING
    left = 0.08 * max(map(len, row_labels)) + 0.1 if row_labels else 0.1
    width = grid.shape[1] * scale / 100 + left + 0.2
    title = textwrap.fill(title, max(20, int(width * 100 / 7))) if title else ""
    height = grid.shape[0] * scale / 100 + 0.3 * bool(col_labels) + 0.25 * (title.count("\n") + 1) * bool(title)
    fig = Figure(figsize=(width, height + 0.2))
    ax = fig.subplots()
    ax.imshow(grid.numpy(), interpolation="nearest")
    ax.set_xticks([GRID_PADDING / 2 + w * (c + 0.5) for c in range(cols)], col_labels or [""] * cols, fontsize=8)
    ax.set_yticks([GRID_PADDING / 2 + h * (r + 0.5) for r in range(rows)], row_labels or [""] * rows, fontsize=8)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=10, pad=16 if col_labels else 6)
    fig.tight_layout(pad=0.3)
    return fig
