"""Sampler settings: `SamplerSetting` names one point of a sampling sweep (method, steps, eta, spacing, guidance
weights and interval, and which EMA of the weights), checks its fields (`ddpm.request`), says itself for files
(`tag`) and for people (`label`, `guidance_label`), and wraps a network as its guidance says (`model`);
`sampler_settings` lists a sweep.
"""

from dataclasses import asdict, dataclass, fields

from torch import nn

from .diffusion import Diffusion
from .guidance import guidance_interval, guided
from .request import check

METHOD_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "dpmsolver": "DPM-Solver++(2M)"}


def interval_text(interval: tuple[float, float]) -> str:
    """A guidance interval for people: "σ∈(0.28, 5.42]"."""
    return f"σ∈({interval[0]:g}, {interval[1]:g}]"


@dataclass(frozen=True)
class SamplerSetting:
    """One sampler setting of a sweep. `cfg` is the classifier-free guidance weight w of a class-conditional
    model (None for an unconditional one, whose tags carry no weight), `autoguidance` the autoguidance
    weight w (0: none), `interval` the noise levels (low, high] where guidance acts (`guidance_interval`;
    None: all). DDPM's `steps` is T (all of them) or a strided chain (see `generate`), its `eta` 1. `sigma_rel`:
    the weights are the post-hoc EMA of that relative length (`ddpm.posthoc_ema.reconstruct`; Karras et al. 2024),
    None: the fixed-decay EMA the training kept."""
    method: str
    steps: int
    eta: float = 0.0
    spacing: str = "uniform"
    cfg: float | None = None
    autoguidance: float = 0.0
    interval: tuple[float, float] | None = None
    sigma_rel: float | None = None

    def __post_init__(self):
        if self.interval is not None:  # a JSON list read back (from_dict) is the same setting
            object.__setattr__(self, "interval", tuple(float(v) for v in self.interval))
        for f in fields(self):
            check(f.name, getattr(self, f.name), f"SamplerSetting.{f.name}")

    @property
    def tag(self) -> str:
        """The file name of its samples: "ddpm1000", "ddim10_eta0", "dpmsolver20", then "_w{cfg}" for a
        conditional model (even at w = 0), "_ag{autoguidance}" when autoguided and "_gi{low}-{high}" with a
        guidance interval, then "_ema{sigma_rel}" with post-hoc EMA weights: "ddim10_eta0_w0.5",
        "ddim50_eta0_w1_gi0.28-5.42", "dpmsolver20_ag1_ema0.1"."""
        name = f"ddim{self.steps}_eta{self.eta:g}" if self.method == "ddim" else f"{self.method}{self.steps}"
        name += f"_w{self.cfg:g}" if self.cfg is not None else ""
        name += f"_ag{self.autoguidance:g}" if self.autoguidance else ""
        name += f"_gi{self.interval[0]:g}-{self.interval[1]:g}" if self.interval else ""
        return name + (f"_ema{self.sigma_rel:g}" if self.sigma_rel is not None else "")

    @property
    def label(self) -> str:
        """For people: "DDPM-1000", "DDIM-10 η=0, w=0.5", "DPM-Solver++(2M)-20, autoguidance w=1",
        "DDIM-50 η=0, w=1, σ∈(0.28, 5.42]", "DDIM-50 η=0, EMA σ_rel=0.1"."""
        return self._label(with_steps=True)

    @property
    def curve_label(self) -> str:
        """The label without the step count, for a curve over steps: "DDIM η=0, w=0.5"."""
        return self._label(with_steps=False)

    @property
    def guidance_label(self) -> str:
        """Its guidance for people, "" when unguided: "w=0.5", "autoguidance w=1", "w=1, σ∈(0.28, 5.42]"; the
        titles of every picture of a guided model end with it."""
        guidance = ([f"w={self.cfg:g}"] if self.cfg is not None else []) + (
            [f"autoguidance w={self.autoguidance:g}"] if self.autoguidance else [])
        interval = [interval_text(self.interval)] if self.interval else []
        return ", ".join([*guidance, *interval])

    def sampler_label(self, with_steps: bool = True) -> str:
        """The sampler without its guidance: "DDIM-10 η=0", "DPM-Solver++(2M)" (`with_steps` False)."""
        name = METHOD_NAMES[self.method] + (f"-{self.steps}" if with_steps else "")
        return name + (f" η={self.eta:g}" if self.method == "ddim" else "")

    @property
    def ema_label(self) -> str:
        """Its weights for people, "" for the fixed-decay EMA: "EMA σ_rel=0.1"."""
        return "" if self.sigma_rel is None else f"EMA σ_rel={self.sigma_rel:g}"

    def _label(self, with_steps: bool) -> str:
        return ", ".join(filter(None, [self.sampler_label(with_steps), self.guidance_label, self.ema_label]))

    def model(self, net: nn.Module, guide: nn.Module | None = None, diffusion: Diffusion | None = None) -> nn.Module:
        """`net` guided as this setting says (see `guided`); raises ValueError when it needs a guide, or the
        diffusion for its guidance interval."""
        if self.interval and diffusion is None:
            raise ValueError(f"{self.tag}: a guidance interval needs the diffusion (its noise levels)")
        active = guidance_interval(diffusion, *self.interval) if self.interval else None
        return guided(net, self.cfg, self.autoguidance, guide, active)

    def to_dict(self) -> dict:
        """The fields and the tag, as an index.json row starts."""
        return asdict(self) | {"tag": self.tag}

    @classmethod
    def from_dict(cls, row: dict) -> "SamplerSetting":
        """The setting of a `to_dict` row; other keys are ignored, and a "tag" must be the setting's own."""
        setting = cls(**{f.name: row[f.name] for f in fields(cls) if f.name in row})
        if "tag" in row and row["tag"] != setting.tag:
            raise ValueError(f"tag {row['tag']!r} does not match its setting, whose tag is {setting.tag!r}")
        return setting


def sampler_settings(method: str, timesteps: int, *, steps=(), etas=(0.0,), spacing: str = "uniform",
                     cfg=None, autoguidance=(0.0,), interval=None, sigma_rels=(None,)) -> list[SamplerSetting]:
    """Every setting of one sampler in a sweep: DDPM at each of `steps` (T: all of them, Algorithm 2; fewer: a
    strided chain, see `generate`), DDIM at each of `steps` x `etas`, DPM-Solver++(2M) at each of `steps`
    (deterministic, eta 0); each at every classifier-free weight of `cfg` (None: an unconditional model) and
    every `autoguidance` weight, guided in `interval` (None: at every step), with the weights of each of
    `sigma_rels` (None: the fixed-decay EMA; a number: that post-hoc EMA). Step counts above `timesteps` are
    left out."""
    etas = etas if method == "ddim" else (1.0 if method == "ddpm" else 0.0,)
    bases = [(s, e) for s in steps for e in etas if s <= timesteps]
    exact = method == "ddpm"  # DDPM over all T steps visits every one: no spacing to speak of
    interval = tuple(interval) if interval else None
    return [SamplerSetting(method, s, e, "uniform" if exact and s == timesteps else spacing, w, ag, interval, sr)
            for sr in sigma_rels for s, e in bases for w in (cfg or [None]) for ag in autoguidance]
