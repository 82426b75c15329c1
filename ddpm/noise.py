"""Per-image noise: image i's starting noise and every later draw depend only on (seed, i), never on how the
images were batched (EDM's StackedRandomGenerator), so a grid is reproducible however it was batched."""

import torch


def fold_seed(value: int, bits: int = 64) -> int:
    """`value` (>= 0) as a seed below 2**bits, the range a generator takes (torch's: 64 bits, numpy's
    RandomState: 32): the bits above, times an odd constant, are xored into the low ones. A value below
    2**bits is returned as it is (so the seeds that always fitted give bit-identical results), and values
    below 2**(2 * bits) that differ only above the low bits never fold to the same seed."""
    return (value ^ (value >> bits) * 0x9E3779B97F4A7C15) & ((1 << bits) - 1)


class ImageGenerator:
    """Per-image random streams: image i's noise depends only on (seed, i), never on the batching.

    Compare EDM's StackedRandomGenerator. `ImageGenerator(seed, range(32, 64))` draws the noise
    of images 32..63 exactly as a batch of all 64 images would."""

    def __init__(self, seed: int, indices, device: torch.device | str = "cpu"):
        self.generators = [torch.Generator(device).manual_seed(fold_seed(seed * 1_000_003 + int(i)))
                           for i in indices]

    def randn(self, shape, device=None, dtype=torch.float32) -> torch.Tensor:
        """Noise of shape (len(indices), *shape[1:]) (shape[0] must equal the number of images)."""
        assert shape[0] == len(self.generators), "batch size must match the number of images"
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype)
                            for g in self.generators]).to(device or self.generators[0].device)


def randn(shape, generator, device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise from an ImageGenerator, a torch.Generator or the global RNG."""
    if isinstance(generator, ImageGenerator):
        return generator.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)
