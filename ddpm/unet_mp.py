"""The magnitude-preserving UNet: `UNet`'s layout built from the layers of Karras et al. (2024), "Analyzing
and Improving the Training Dynamics of Diffusion Models" (EDM2, config G).

Every layer keeps activations at unit magnitude (RMS 1 per pixel) at initialisation and throughout
training, so that no layer's effective learning rate drifts as weights grow:
- convolutions and linear layers have no biases and normalise their weights to unit RMS per output channel
  in every call, and in training also write the normalised weights back ("forced weight normalisation",
  their section 3.4), so the weights' scale, and with it the update size Adam's lr sets, stays fixed;
- SiLU is divided by its output RMS for a unit normal input, sums of residual branches and the concatenation
  of skips are weighted so that unit inputs give unit outputs (section 3.3);
- no GroupNorm: the encoder's blocks normalise each pixel's feature vector (pixel norm), attention
  normalises q, k and v per head (cosine attention), and the block outputs are clipped to +-256;
- the input gets a constant channel of ones (the biases' role), and the output and each block's embedding
  scale are learned gains that start at 0 (so the network starts as 0 and its blocks unmodulated).
Down- and upsampling have no weights (average pooling, nearest neighbour). The weights have unit RMS, not
the usual 1/sqrt(fan-in), so the learning rate that suits this network is far larger: EDM2 trains at 1e-2
(batch 2048); at batch 128, 4e-2 scored best in benchmarks/RESULTS.md, where `UNet` trains at 2e-3.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .unet import Downsample, UNet, Upsample, timestep_embedding

RESIDUAL_BALANCE = 0.3   # the residual branch's share of a block's output (EDM2's res_balance)
ATTENTION_BALANCE = 0.3  # the same for attention
SKIP_BALANCE = 0.5       # the skip's share of the decoder's concatenation
LABEL_BALANCE = 0.5      # the class embedding's share of the embedding
CLIP = 256.0             # block outputs are clipped to +-CLIP (EDM2: against bf16 overflow)


def normalize(x: torch.Tensor, dim: int | tuple[int, ...] | None = None, eps: float = 1e-4) -> torch.Tensor:
    """x scaled to unit RMS along `dim` (default: all but the first)."""
    dim = tuple(range(1, x.ndim)) if dim is None else dim
    rms = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    rms = rms * math.sqrt(rms.numel() / x.numel())
    return x / (eps + rms).to(x.dtype)


SILU_RMS = 0.596         # E[silu(z)^2]^(1/2) for z ~ N(0, 1)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU scaled to unit RMS for unit normal input. (Where a convolution follows, the blocks fold the
    1 / SILU_RMS into its gain instead: the same result, two fewer passes over the activations.)"""
    return F.silu(x) / SILU_RMS


def mp_sum_weights(t: float) -> tuple[float, float]:
    """The weights (wa, wb) of mp_sum(a, b, t) = wa a + wb b."""
    norm = math.sqrt((1 - t) ** 2 + t ** 2)
    return (1 - t) / norm, t / norm


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """(1 - t) a + t b, scaled so that independent unit inputs give a unit output."""
    wa, wb = mp_sum_weights(t)
    return torch.add(a * wa, b.to(a.dtype), alpha=wb)


def mp_cat(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Concatenation along channels (B, Ca + Cb, H, W) at unit RMS, b's channels holding t^2 / (t^2 + (1 - t)^2)
    of the energy and a's the rest, whatever Ca and Cb."""
    ca, cb = a.shape[1], b.shape[1]
    scale = math.sqrt((ca + cb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (scale * (1 - t) / math.sqrt(ca)), b.to(a.dtype) * (scale * t / math.sqrt(cb))], dim=1)


class MPConv(nn.Module):
    """A convolution with a k x k kernel (k = 0: a linear layer) and no bias, whose weights are normalised
    in every call (and in training written back normalised); `gain` scales the output."""

    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, *([kernel] * 2 if kernel else [])))

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        w = self.weight.float()
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))  # forced weight normalisation
        w = normalize(w) * (gain / math.sqrt(w[0].numel()))  # unit output for unit input
        if w.ndim == 2:
            return F.linear(x, w.to(x.dtype))
        return F.conv2d(x, w.to(x.dtype), padding=w.shape[-1] // 2)


class MPAttention(nn.Module):
    """Self-attention with q, k and v normalised per head and pixel, added by mp_sum."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = MPConv(channels, 3 * channels, 1)
        self.proj = MPConv(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = normalize(self.qkv(x).reshape(B, 3, self.num_heads, C // self.num_heads, H * W), dim=3)
        q, k, v = qkv.transpose(-1, -2).unbind(1)       # each (B, heads, HW, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)     # (B, heads, HW, C/heads)
        wx, wh = mp_sum_weights(ATTENTION_BALANCE)      # mp_sum(x, proj(h)), wh folded into proj's gain
        return torch.add(self.proj(h.transpose(-1, -2).reshape(B, C, H, W), gain=wh), x, alpha=wx)


class MPBlock(nn.Module):
    """EDM2's residual block. An encoder block maps its input to cout channels first (1 x 1) and pixel-norms
    it; a decoder block (whose input holds a concatenated skip) maps the residual path's input last."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, encoder: bool, num_heads: int = 0):
        super().__init__()
        self.encoder, self.dropout = encoder, dropout
        self.skip = MPConv(cin, cout, 1) if cin != cout else None
        self.conv0 = MPConv(cout if encoder else cin, cout, 3)
        self.emb = MPConv(emb_dim, cout, 0)
        self.emb_gain = nn.Parameter(torch.zeros([]))  # 0: the block starts unmodulated by t and y
        self.conv1 = MPConv(cout, cout, 3)
        self.attn = MPAttention(cout, num_heads) if num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.encoder:
            x = normalize(x if self.skip is None else self.skip(x), dim=1)  # (B, cout, H, W), unit RMS per pixel
        # conv(mp_silu(.)) as conv(silu(.)) with the 1 / SILU_RMS in the gain
        h = self.conv0(F.silu(x), gain=1 / SILU_RMS)
        scale = self.emb(emb, gain=self.emb_gain) + 1                # (B, cout): the time/class modulation
        h = F.silu(h * scale[:, :, None, None].to(h.dtype))
        wx, wh = mp_sum_weights(RESIDUAL_BALANCE)                    # x = mp_sum(x, h), wh in conv1's gain
        h = self.conv1(F.dropout(h, self.dropout, self.training), gain=wh / SILU_RMS)
        if not self.encoder and self.skip is not None:
            x = self.skip(x)
        x = torch.add(h, x, alpha=wx)
        if self.attn is not None:
            x = self.attn(x)
        return x.clamp(-CLIP, CLIP)


class MPInput(nn.Module):
    """The input convolution, over the image and a constant channel of ones."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = MPConv(cin + 1, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([x, torch.ones_like(x[:, :1])], dim=1))


class MPOutput(nn.Module):
    """The output convolution, scaled by a learned gain that starts at 0."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = MPConv(cin, cout, 3)
        self.gain = nn.Parameter(torch.zeros([]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, gain=self.gain)


class MPUNet(UNet):
    """`UNet`'s layout and interface, `model(x_t, t, y=None)`, with magnitude-preserving layers."""

    def _embeddings(self, ch: int, emb_dim: int) -> None:
        self.time_embed = MPConv(ch, emb_dim, 0)
        # one-hot labels, one extra class for NULL_LABEL ("no class", classifier-free guidance)
        self.class_embed = MPConv(self.config.num_classes + 1, emb_dim, 0) if self.config.num_classes else None

    def _input(self, cin: int, cout: int) -> nn.Module:
        return MPInput(cin, cout)

    def _block(self, cin: int, cout: int, emb_dim: int, res: int, encoder: bool) -> nn.Module:
        heads = self.config.num_heads if res in self.config.attention_resolutions else 0
        return MPBlock(cin, cout, emb_dim, self.config.dropout, encoder, heads)

    def _downsample(self, ch: int) -> nn.Module:
        return Downsample(ch, learned=False)

    def _upsample(self, ch: int) -> nn.Module:
        return Upsample(ch, learned=False)

    def _middle(self, ch: int, emb_dim: int) -> nn.ModuleList:
        c = self.config
        return nn.ModuleList([MPBlock(ch, ch, emb_dim, c.dropout, False, c.num_heads),
                              MPBlock(ch, ch, emb_dim, c.dropout, False)])

    def _output(self, cin: int, cout: int) -> nn.Module:
        return MPOutput(cin, cout)

    def embed(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        # the sinusoids have RMS 1/sqrt(2): scaled to 1
        emb = self.time_embed(math.sqrt(2) * timestep_embedding(t, self.config.base_channels))
        row = self.class_index(t, y)
        if row is not None:
            k = self.config.num_classes + 1
            emb = mp_sum(emb, self.class_embed(F.one_hot(row, k).float() * math.sqrt(k)), LABEL_BALANCE)
        return mp_silu(emb)

    def concat(self, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return mp_cat(h, skip, SKIP_BALANCE)
