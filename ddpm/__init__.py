"""ddpm: Denoising Diffusion Probabilistic Models (Ho et al. 2020) with DDIM sampling
(Song et al. 2020), the DPM-Solver++(2M) ODE solver (Lu et al. 2022) and classifier-free
guidance (Ho & Salimans 2022) and autoguidance (Karras et al. 2024) as model wrappers.

The vocabulary (x0, x_t, t, eps, alpha_bar, y, w) is declared in `ddpm.diffusion`.
"""

from .checkpoint import (
    CheckpointError,
    atomic_save,
    config_hash,
    guide_path,
    load_classifier,
    load_guide,
    load_model,
    posthoc_path,
    safe_load,
    save_classifier,
    save_model,
)
from .diffusion import NULL_LABEL, Diffusion, DiffusionConfig, extract, to_model_range, to_uint8
from .ema import EMA
from .files import atomic_write
from .guidance import Autoguided, ClassifierFree, guidance_interval, guided
from .networks import make_unet
from .noise import ImageGenerator
from .precision import Autocast, resolve_device, resolve_precision
from .request import RequestError, check_request
from .samplers import (
    NonFiniteImages,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    default_steps,
    dpm_solver_sample,
    generate,
)
from .schedules import make_betas
from .settings import SamplerSetting, interval_text, sampler_settings
from .training import TrainConfig, Trainer
from .unet import UNet, UNetConfig

__all__ = [
    "CheckpointError", "atomic_save", "atomic_write", "config_hash", "guide_path", "load_classifier", "load_guide",
    "load_model", "posthoc_path", "safe_load",
    "save_classifier", "save_model",
    "NULL_LABEL", "Diffusion", "DiffusionConfig", "extract", "EMA",
    "Autoguided", "ClassifierFree", "ImageGenerator", "NonFiniteImages", "RequestError",
    "check_request", "SamplerSetting", "ddim_sample", "ddim_timesteps", "ddpm_sample", "default_steps",
    "dpm_solver_sample", "generate", "guidance_interval", "guided", "interval_text", "make_betas", "sampler_settings",
    "Autocast", "Trainer", "TrainConfig", "resolve_device", "resolve_precision",
    "to_model_range", "to_uint8", "UNet", "UNetConfig", "make_unet",
]
