"""The trained model as an MLflow pyfunc model (models from code): MLflow runs this file when it loads
the model, so it imports only mlflow, numpy, pandas, torch and the `ddpm` package logged beside it.
The network is never pickled: `load_context` reads the logged model files with `ddpm.load_model`.
"""

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from ddpm import Autocast, NonFiniteImages, SamplerSetting, default_steps, generate, load_model, resolve_precision
from ddpm.precision import PRECISIONS
from ddpm.request import MAX_IMAGES, RequestError, check, check_request, max_images

COLUMNS = {"num": "long", "seed": "long", "class": "long", "method": "string", "steps": "long",
           "eta": "double", "spacing": "string", "guidance": "double", "interval_low": "double",
           "interval_high": "double"}
# the column of each field a sampler request checks (ddpm.request) where it is not the field's name
NAMES = {"cfg": "guidance", "autoguidance": "guidance", "interval": "interval_low, interval_high"}


class DiffusionSampler(PythonModel):
    """Draws images from the trained model; `predict` returns uint8 images, an (N, C, H, W) numpy array
    with the images of every input row one after the other.

    Each row of the input (a pandas DataFrame, or a dict of columns) asks for one set of images:
      num       number of images (required; at most MAX_IMAGES = 10,000 over all rows of a request, fewer for
                images above 1 GB, ddpm.request)
      seed      noise seed in [0, 2**63 - 1] (default 0); image i depends only on (seed, i), so a row is reproducible
      class     the class of every image, in [0, k), for a class-conditional model of k classes (default: the
                classes in turn, 0, 1, ..., k-1, 0, ...); an unconditional model takes none
      method    ddpm | ddim | dpmsolver (default ddim)
      steps     sampling steps in [1, T] (default 50; ddpm: all T steps, or fewer on a strided chain)
      eta       DDIM's eta, finite and >= 0 (default 0)
      spacing   uniform | trailing | quadratic | logsnr (default uniform)
      guidance  the guidance weight w, finite and >= 0 (default 0): classifier-free guidance for a
                class-conditional model, autoguidance by the logged guide model for an unconditional one
      interval_low, interval_high  guide only at noise levels sigma in (low, high] (both or neither;
                default: every step; see ddpm.guidance_interval)
    A column that is given needs a value in every row: a missing one (NaN) is refused, never taken as the default.
    Every row is checked before any image is drawn; a bad one is an MlflowException (HTTP 400 when served) of
    one line naming the row and the column, and so are images that come out NaN.
    model_config {"device": "cuda"} samples on that device (default cpu), {"precision": "bf16"} runs the network
    at that precision (fp32 | tf32 | bf16 | fp16 | auto, ddpm.resolve_precision; default fp32; the sampler's
    state stays fp32).
    """

    def load_context(self, context):
        config = context.model_config or {}
        device, precision = config.get("device", "cpu"), config.get("precision", "fp32")
        if precision not in PRECISIONS:
            raise MlflowException.invalid_parameter_value(
                f"model_config precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
        self.net, self.diffusion, self.meta = load_model(context.artifacts["model"], device)
        self.guide = load_model(context.artifacts["guide"], device)[0] if "guide" in context.artifacts else None
        self.precision = resolve_precision(precision, device)  # what it means on this device

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        rows = pd.DataFrame(model_input).to_dict("records")
        requests = [self._request(i, row) for i, row in enumerate(rows)]
        most, total = max_images(self.net.config.sample_shape), sum(num for _, num, _, _ in requests)
        if total > most:
            raise MlflowException.invalid_parameter_value(
                f"num: {total} images over all rows; a request makes at most {most} (MAX_IMAGES = {MAX_IMAGES})")
        try:
            images = [self._draw(*request) for request in requests]
        except NonFiniteImages as e:
            raise MlflowException(str(e)) from None
        return np.concatenate(images) if images else np.zeros((0,), np.uint8)

    def _request(self, i: int, row: dict) -> tuple[SamplerSetting, int, torch.Tensor | None, int]:
        """Row `i` as (setting, num, labels, seed), checked as every sampler request is (ddpm.request)."""
        for name, value in row.items():
            if pd.isna(value):
                raise MlflowException.invalid_parameter_value(
                    f"row {i}: {name} has no value (NaN); give one in every row, or leave the column out")
        k, T = self.net.config.num_classes, self.diffusion.timesteps
        num, w, klass = int(row["num"]), float(row.get("guidance", 0.0)), row.get("class")
        low, high = row.get("interval_low"), row.get("interval_high")
        if (low is None) != (high is None):
            raise MlflowException.invalid_parameter_value(
                f"row {i}: a guidance interval needs both interval_low and interval_high")
        method = row.get("method", "ddim")
        try:
            check("seed", int(row.get("seed", 0)))
            setting = SamplerSetting(method, int(row.get("steps", default_steps(method, T))),
                                     float(row.get("eta", 0.0)), row.get("spacing", "uniform"),
                                     cfg=w if k else None, autoguidance=0.0 if k else w,
                                     interval=None if low is None else (low, high))
            check_request(setting, num, self.net.config.sample_shape, T, k, klass, self.guide is not None)
        except RequestError as e:
            raise MlflowException.invalid_parameter_value(f"row {i}: {e.named(NAMES.get(e.field, e.field))}") from None
        labels = None if not k else torch.full((num,), klass) if klass is not None else torch.arange(num) % k
        return setting, num, labels, int(row.get("seed", 0))

    def _draw(self, setting: SamplerSetting, num: int, labels: torch.Tensor | None, seed: int) -> np.ndarray:
        guide = None if self.guide is None else Autocast(self.guide, self.precision)
        images = generate(setting.model(Autocast(self.net, self.precision), guide, self.diffusion), self.diffusion, num,
                          self.net.config.sample_shape, seed=seed, method=setting.method, steps=setting.steps,
                          eta=setting.eta, labels=labels, spacing=setting.spacing)
        return images.numpy()


set_model(DiffusionSampler())
