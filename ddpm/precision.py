"""Devices and numeric precision, for training and sampling alike: `resolve_device`, `resolve_precision`
(what "auto" means on a device) and `Autocast`, a network that runs its forward pass at a precision and
returns its prediction in fp32, so that a sampler's state (x_t, the solver's history, the guidance
combination) stays fp32 whatever the network runs in.
"""

import contextlib

import torch
from torch import nn

# fp32; tf32: fp32 weights, TensorFloat-32 matmuls and convolutions (CUDA); bf16/fp16: autocast (training fp16
# with a gradient scaler); auto: what suits the device (resolve_precision)
PRECISIONS = ("fp32", "tf32", "bf16", "fp16", "auto")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" picks cuda, then mps, then cpu; any other name is passed to torch.device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bfloat16 natively (AVX512-BF16, AMX). oneDNN also runs it on AVX2-only CPUs,
    emulated and about 16x slower than fp32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and torch.backends.cpu.get_cpu_capability() != "AVX2"


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The precision a run on `device` uses for `precision`: one of fp32, tf32, bf16, fp16.

    auto: on CUDA bf16 where the GPU has it natively, else fp16; on a CPU bf16 where it is native, else
    fp32; fp32 elsewhere (mps). tf32 is fp32 off CUDA (TensorFloat-32 is an NVIDIA tensor-core format)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    kind = torch.device(device).type
    if precision == "auto":
        if kind == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        return "bf16" if kind == "cpu" and cpu_has_native_bf16() else "fp32"
    if precision == "tf32" and kind != "cuda":
        return "fp32"
    return precision


@contextlib.contextmanager
def tf32(enabled: bool):
    """TensorFloat-32 for CUDA matmuls and cuDNN convolutions on (or off) inside the block. cuDNN allows
    it by default, so plain fp32 must switch it off."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def autocast(precision: str, device: torch.device | str):
    """The context that runs a forward pass at a resolved `precision` (fp32, tf32, bf16, fp16) on `device`:
    torch.autocast for bf16/fp16; on CUDA TensorFloat-32 on for tf32 and off for the others."""
    kind = torch.device(device).type
    dtype = AUTOCAST.get(precision)
    stack = contextlib.ExitStack()
    if kind == "cuda":
        stack.enter_context(tf32(precision == "tf32"))
    stack.enter_context(torch.autocast(kind, dtype=dtype or torch.bfloat16, enabled=dtype is not None))
    return stack


class Autocast(nn.Module):
    """`net` run at `precision` (resolved on its device by `resolve_precision`; `self.precision` says what it
    became): called as the network, model(x_t, t, y), it returns the prediction in fp32. Wrap the network and
    its guide before guidance (`SamplerSetting.model`), so that only the network's arithmetic is 16-bit."""

    def __init__(self, net: nn.Module, precision: str = "fp32"):
        super().__init__()
        device = next(net.parameters()).device
        self.net, self.precision = net, resolve_precision(precision, device)

    @property
    def config(self):
        return self.net.config

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        with autocast(self.precision, x_t.device):
            return self.net(x_t, t, y).float()
