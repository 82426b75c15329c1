"""The trained model as an MLflow pyfunc model (models from code): MLflow runs this file when it loads
the model, so it imports only mlflow, numpy, pandas, torch and the `ddpm` package logged beside it.
The network is never pickled: `load_context` reads the logged model files with `ddpm.load_model`.
"""

import numpy as np
import pandas as pd
import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from ddpm import SamplerSetting, default_steps, generate, load_model

COLUMNS = {"num": "long", "seed": "long", "class": "long", "method": "string", "steps": "long",
           "eta": "double", "spacing": "string", "guidance": "double", "interval_low": "double",
           "interval_high": "double"}


class DiffusionSampler(PythonModel):
    """Draws images from the trained model; `predict` returns uint8 images, an (N, C, H, W) numpy array
    with the images of every input row one after the other.

    Each row of the input (a pandas DataFrame, or a dict of columns) asks for one set of images:
      num       number of images (required)
      seed      noise seed (default 0); image i depends only on (seed, i), so a row is reproducible
      class     the class of every image, for a class-conditional model (default: the classes in turn,
                0, 1, ..., k-1, 0, ...); an unconditional model takes none
      method    ddpm | ddim | dpmsolver (default ddim)
      steps     sampling steps (default 50; ddpm: all T steps, or fewer on a strided chain)
      eta       DDIM's eta (default 0)
      spacing   uniform | trailing | quadratic | logsnr (default uniform)
      guidance  the guidance weight w (default 0): classifier-free guidance for a class-conditional model,
                autoguidance by the logged guide model for an unconditional one
      interval_low, interval_high  guide only at noise levels sigma in (low, high] (both or neither;
                default: every step; see ddpm.guidance_interval)
    model_config {"device": "cuda"} samples on that device (default cpu).
    """

    def load_context(self, context):
        device = (context.model_config or {}).get("device", "cpu")
        self.net, self.diffusion, self.meta = load_model(context.artifacts["model"], device)
        self.guide = load_model(context.artifacts["guide"], device)[0] if "guide" in context.artifacts else None

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        rows = pd.DataFrame(model_input).to_dict("records")
        return np.concatenate([self._draw(row) for row in rows]) if rows else np.zeros((0,), np.uint8)

    def _draw(self, row: dict) -> np.ndarray:
        def get(name, default):
            value = row.get(name)
            return default if value is None or pd.isna(value) else value

        config, k = self.net.config, self.net.config.num_classes
        num, w = int(row["num"]), float(get("guidance", 0.0))
        if get("class", None) is not None and not k:
            raise ValueError("an unconditional model takes no class")
        labels = None if not k else (torch.full((num,), int(get("class", 0))) if get("class", None) is not None
                                     else torch.arange(num) % k)
        method = get("method", "ddim")
        steps = int(get("steps", default_steps(method, self.diffusion.timesteps)))
        low, high = get("interval_low", None), get("interval_high", None)
        if (low is None) != (high is None):
            raise ValueError("a guidance interval needs both interval_low and interval_high")
        setting = SamplerSetting(method, steps, float(get("eta", 0.0)), get("spacing", "uniform"),
                                 cfg=w if k else None, autoguidance=0.0 if k else w,
                                 interval=None if low is None else (low, high))
        images = generate(setting.model(self.net, self.guide, self.diffusion), self.diffusion, num,
                          (config.in_channels, config.image_size, config.image_size), seed=int(get("seed", 0)),
                          method=setting.method, steps=setting.steps, eta=setting.eta, labels=labels,
                          spacing=setting.spacing)
        return images.numpy()


set_model(DiffusionSampler())
