"""The network factory: which denoising network a `UNetConfig` builds. It lives apart from both networks
so that each imports only what it builds on (`ddpm.unet_mp` builds on `ddpm.unet`) and neither imports
the other back."""

from torch import nn

from .unet import UNet, UNetConfig
from .unet_mp import MPUNet


def make_unet(config: UNetConfig) -> nn.Module:
    """The network that `config` describes: `UNet`, or `MPUNet` when config.magnitude_preserving."""
    return MPUNet(config) if config.magnitude_preserving else UNet(config)
