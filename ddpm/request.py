"""What a sampler request may ask for, checked in one place: the fields of a `SamplerSetting` (method, steps, eta,
spacing, the guidance weights and interval), the seed, and what a request asks of a model (`check_request`: its
image count, steps and class). params.yaml's sample section, the `ddpm` command, the served pyfunc model and
`ddpm export` all check through here and name the offending field their own way (a key, a flag, a column), so a
value refused by one is refused by all, in one line, before any sampling.

Bounds per request (`ddpm sample --num`, the served model's `num` summed over its rows): 1 to MAX_IMAGES images
and at most MAX_IMAGE_BYTES of uint8 pixels, so a request cannot ask for more memory than a picture needs.
"""

import math

from .samplers import METHODS, SPACINGS

MAX_IMAGES = 10_000        # images per request
MAX_IMAGE_BYTES = 10**9    # their uint8 pixels: 10,000 RGB images of 256 x 256 would be 2 GB
# The largest int64 (the served model's seed column is one). Every use takes it: torch's generators take seeds
# below 2**64 (seed + 2, + rank, + epoch included), python's random any int, and the seeds derived from it that
# do not fit are folded (ddpm.noise.fold_seed: training's per-step seeds, the per-image noise, the metrics' numpy
# draws), which leaves them unchanged for every seed below 2**24.
MAX_SEED = 2**63 - 1
WEIGHT = "a finite number >= 0"
INTERVAL = "[low, high] with 0 <= low < high, both finite (noise levels sigma)"


def _weight(w) -> bool:
    return math.isfinite(w) and w >= 0


def _interval(v) -> bool:
    return len(v) == 2 and all(math.isfinite(x) for x in v) and 0 <= v[0] < v[1]


RULES = {  # field: (whether a value is allowed, what is allowed)
    "method": (lambda v: v in METHODS, "one of " + ", ".join(METHODS)),
    "steps": (lambda v: v >= 1, ">= 1"),
    "eta": (_weight, WEIGHT),
    "spacing": (lambda v: v in SPACINGS, "one of " + ", ".join(SPACINGS)),
    "cfg": (lambda v: v is None or _weight(v), WEIGHT),  # None: an unconditional model, which has no such weight
    "autoguidance": (_weight, WEIGHT),
    "interval": (lambda v: v is None or _interval(v), INTERVAL),  # None: guided at every step
    "sigma_rel": (lambda v: v is None or 0 < v < 12 ** -0.5, "null (the fixed-decay EMA) or in (0, 0.2887)"),
    "seed": (lambda v: 0 <= v <= MAX_SEED, f"in [0, {MAX_SEED}] (2**63 - 1, the largest signed 64-bit integer)"),
}


class RequestError(ValueError):
    """A value a sampler request may not ask for: `field` (a SamplerSetting field, "seed", "num" or "class"),
    its `value` and what is `allowed`. Each entry point says it with its own name for the field (`named`)."""

    def __init__(self, field: str, value, allowed: str, name: str | None = None, flag: bool = False):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(self.named(name or field, flag))

    def named(self, name: str, flag: bool = False) -> str:
        """One line naming the field `name`: "sample.eta = (inf,) is out of range; allowed: ...", or for a
        command-line `flag` as it was typed, "--guidance-interval 3 1 is out of range; allowed: ..."."""
        if not flag:
            return f"{name} = {self.value!r} is out of range; allowed: {self.allowed}"
        values = self.value if isinstance(self.value, (tuple, list)) else [self.value]
        typed = " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
        return f"{name} {typed} is out of range; allowed: {self.allowed}"


def valid(field: str, value) -> bool:
    """Whether `value` is allowed for `field` (a key of RULES); a value of the wrong type is not."""
    try:
        return bool(RULES[field][0](value))
    except (TypeError, ValueError):
        return False


def check(field: str, value, name: str | None = None, flag: bool = False) -> None:
    """Raise RequestError unless `value` is allowed for `field` (a key of RULES); its message names `name`
    (default: the field), a command-line flag when `flag` (see RequestError.named)."""
    if not valid(field, value):
        raise RequestError(field, value, RULES[field][1], name, flag)


def check_flag(flag: str, field: str, values) -> None:
    """check() each value that command-line `flag` gave for `field`: a list (None: the flag was not given)."""
    for value in values or ():
        check(field, value, flag, flag=True)


def max_images(shape: tuple[int, ...]) -> int:
    """The most images of `shape` (C, H, W) one request may ask for."""
    return min(MAX_IMAGES, MAX_IMAGE_BYTES // math.prod(shape))


def check_request(setting, num: int, shape: tuple[int, int, int], timesteps: int, num_classes: int | None,
                  klass: int | None = None, has_guide: bool = False) -> None:
    """Raise RequestError unless a model of `timesteps`, `num_classes` (None: unconditional) and a guide model or
    not (`has_guide`) can draw `num` images of `shape` with `setting` (a SamplerSetting, whose fields it checked
    when made), of class `klass` (None: the classes in turn, or unconditional)."""
    most = max_images(shape)
    if not 1 <= num <= most:
        raise RequestError("num", num, f"in [1, {most}] (images per request: at most {MAX_IMAGES:,} and "
                                       f"{MAX_IMAGE_BYTES / 1e9:g} GB of pixels)")
    if setting.steps > timesteps:
        raise RequestError("steps", setting.steps, f"in [1, T = {timesteps}] (the model's timesteps)")
    if klass is not None and num_classes is None:
        raise RequestError("class", klass, "none: the model is unconditional")
    if klass is not None and not 0 <= klass < num_classes:
        raise RequestError("class", klass, f"a class index in [0, {num_classes - 1}]")
    if setting.autoguidance and not has_guide:
        raise RequestError("autoguidance", setting.autoguidance, "0: the model has no guide model")
