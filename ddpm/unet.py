"""The denoising network: a UNet `model(x_t, t, y=None) -> eps` (or v; see `ddpm.diffusion`) that
knows nothing of betas.

Residual blocks with GroupNorm and a sinusoidal time embedding (Ho et al. 2020, appendix B),
self-attention at chosen resolutions, and for class-conditional models a learned class embedding
with one extra "null" row used for classifier-free guidance (Ho & Salimans 2022).
Odd sizes (28 -> 14 -> 7 -> 4) work: each upsampling step returns to its skip connection's size.
With patch_size p > 1 the network runs on p x p patches folded into channels (pixel unshuffle,
as in Hoogeboom et al. 2023's "simple diffusion"): a 28 x 28 x 1 image enters as 14 x 14 x 4, and
the output is unfolded back, so the costly full-resolution level is skipped.
With magnitude_preserving the same layout is built from EDM2's magnitude-preserving layers instead
(`ddpm.unet_mp`; `ddpm.networks.make_unet` builds either).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .diffusion import NULL_LABEL


def default_channel_mults(image_size: int) -> tuple[int, ...]:
    """The channel multipliers per resolution level when none are given (params.yaml's model.channel_mults:
    null): (1, 2, 2) up to 32 px (28 -> 14 -> 7), (1, 2, 2, 2) above (64 -> 32 -> 16 -> 8)."""
    return (1, 2, 2) if image_size <= 32 else (1, 2, 2, 2)


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 1
    image_size: int = 28
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (7,)
    num_heads: int = 4
    dropout: float = 0.1
    num_classes: int | None = None
    patch_size: int = 1          # fold p x p pixels into channels; resolutions below count patches
    magnitude_preserving: bool = False  # EDM2's layers (Karras et al. 2024; ddpm.unet_mp.MPUNet)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W): the shape of one image the network denoises, so of one sample."""
        return (self.in_channels, self.image_size, self.image_size)

    @classmethod
    def for_images(cls, in_channels: int, image_size: int, num_classes: int | None = None, *,
                   channel_mults: tuple[int, ...] | None = None,
                   attention_resolutions: tuple[int, ...] | None = None, patch_size: int = 1,
                   **fields) -> "UNetConfig":
        """The config for images of this shape, with the size-dependent choices left as None filled in:
        channel_mults (default_channel_mults); attention at the resolution after two downsamplings (7 at
        28 px, 8 at 32, 16 at 64; counted in patches)."""
        if image_size % patch_size:
            raise ValueError(f"patch_size {patch_size} does not divide the image size {image_size}")
        size = image_size // patch_size
        quarter = (((size + 1) // 2) + 1) // 2  # the UNet halves sizes rounding up
        return cls(in_channels=in_channels, image_size=image_size, num_classes=num_classes, patch_size=patch_size,
                   channel_mults=channel_mults or default_channel_mults(image_size),
                   attention_resolutions=attention_resolutions if attention_resolutions is not None else (quarter,),
                   **fields)


def norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 2 channels: a group of one channel would subtract
    the per-channel time/class embedding that ResBlock adds just before it, erasing t and y."""
    groups = math.gcd(32, channels)
    if groups == channels and channels > 1:
        groups //= 2
    return nn.GroupNorm(groups, channels)


def zero(module: nn.Module) -> nn.Module:
    """Zero-initialise the last layer of a residual branch so each block starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(norm(cout), nn.SiLU(), nn.Dropout(dropout),
                                        zero(nn.Conv2d(cout, cout, 3, padding=1)))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)                          # (B, cout, H, W)
        h = h + self.emb(emb)[:, :, None, None]        # add the time/class embedding per channel
        return self.skip(x) + self.out_layers(h)


class Attention(nn.Module):
    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)      # each (B, heads, HW, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)    # (B, heads, HW, C/heads)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """H -> ceil(H / 2): a strided convolution, or (learned=False) 2 x 2 average pooling, whose windows
    at an odd edge average the pixels they cover."""

    def __init__(self, channels: int, learned: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if learned else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return F.avg_pool2d(x, 2, ceil_mode=True) if self.conv is None else self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to a given size, followed by a convolution unless learned=False."""

    def __init__(self, channels: int, learned: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if learned else nn.Identity()

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class UNet(nn.Module):
    """The layout: an input convolution, num_res_blocks blocks per level and a downsampling between levels,
    a middle (block, attention, block), then num_res_blocks + 1 blocks per level that each take one skip, and
    an output convolution. The layers come from the `_`-methods below, which `MPUNet` overrides."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        if c.image_size % c.patch_size:
            raise ValueError(f"image_size {c.image_size} is not a multiple of patch_size {c.patch_size}")
        ch = c.base_channels
        emb_dim = 4 * ch
        self._embeddings(ch, emb_dim)
        pixels = c.in_channels * c.patch_size ** 2   # channels of the folded input and output
        self.input_conv = self._input(pixels, ch)

        # Encoder: num_res_blocks per level, then a downsampling; remember each output's channels.
        self.down = nn.ModuleList()
        skips, resolutions = [ch], [c.image_size // c.patch_size]
        for level, mult in enumerate(c.channel_mults):
            for _ in range(c.num_res_blocks):
                self.down.append(self._block(ch, c.base_channels * mult, emb_dim, resolutions[level], True))
                ch = c.base_channels * mult
                skips.append(ch)
            if level < len(c.channel_mults) - 1:
                self.down.append(self._downsample(ch))
                skips.append(ch)
                resolutions.append((resolutions[level] + 1) // 2)
        self.middle = self._middle(ch, emb_dim)

        # Decoder: num_res_blocks + 1 per level, each eating one skip; upsample at the end of a level.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mults))):
            for _ in range(c.num_res_blocks + 1):
                cout = c.base_channels * mult
                self.up.append(self._block(ch + skips.pop(), cout, emb_dim, resolutions[level], False))
                ch = cout
            if level > 0:
                self.up.append(self._upsample(ch))
        self.out = self._output(ch, pixels)

    def _embeddings(self, ch: int, emb_dim: int) -> None:
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # one extra row for NULL_LABEL, the "no class" input of classifier-free guidance
        self.class_embed = nn.Embedding(self.config.num_classes + 1, emb_dim) if self.config.num_classes else None

    def _input(self, cin: int, cout: int) -> nn.Module:
        return nn.Conv2d(cin, cout, 3, padding=1)

    def _block(self, cin: int, cout: int, emb_dim: int, res: int, encoder: bool) -> nn.Module:
        block = ResBlock(cin, cout, emb_dim, self.config.dropout)
        if res in self.config.attention_resolutions:
            return _ResAttention(block, Attention(cout, self.config.num_heads))
        return block

    def _downsample(self, ch: int) -> nn.Module:
        return Downsample(ch)

    def _upsample(self, ch: int) -> nn.Module:
        return Upsample(ch)

    def _middle(self, ch: int, emb_dim: int) -> nn.ModuleList:
        c = self.config
        return nn.ModuleList([ResBlock(ch, ch, emb_dim, c.dropout), Attention(ch, c.num_heads),
                              ResBlock(ch, ch, emb_dim, c.dropout)])

    def _output(self, cin: int, cout: int) -> nn.Module:
        return nn.Sequential(norm(cin), nn.SiLU(), zero(nn.Conv2d(cin, cout, 3, padding=1)))

    def class_index(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor | None:
        """The row of the class embedding for labels y (NULL_LABEL and None: the extra "no class" row);
        None for an unconditional model."""
        if not self.config.num_classes:
            if y is not None:
                raise ValueError("labels were given to an unconditional model (num_classes is None)")
            return None
        if y is None:
            y = torch.full_like(t, NULL_LABEL)
        return torch.where(y == NULL_LABEL, self.config.num_classes, y)

    def embed(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The time (and class) embedding that every block receives: (B,), (B,) -> (B, emb_dim)."""
        emb = self.time_embed(timestep_embedding(t, self.config.base_channels))
        row = self.class_index(t, y)
        return emb if row is None else emb + self.class_embed(row)

    def concat(self, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.cat([h, skip], dim=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x_t (B, C, H, W), t (B,) int, y (B,) int or None -> predicted eps or v (B, C, H, W)."""
        emb = self.embed(t, y)
        h = self.input_conv(F.pixel_unshuffle(x_t, self.config.patch_size))
        hs = [h]
        for block in self.down:
            h = block(h, emb)
            hs.append(h)
        for block in self.middle:
            h = block(h, emb)
        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h, hs[-1].shape[-2:])        # back to the size of the next skip
            else:
                h = block(self.concat(h, hs.pop()), emb)
        return F.pixel_shuffle(self.out(h), self.config.patch_size)


class _ResAttention(nn.Module):
    """A residual block followed by self-attention at the same resolution."""

    def __init__(self, res: ResBlock, attn: Attention):
        super().__init__()
        self.res, self.attn = res, attn

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.attn(self.res(x, emb))
