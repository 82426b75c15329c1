"""The evaluation protocols (evaluate.protocol): which real images the samples are scored against (the reference,
stages/reference.py) and which are scored beside them as if generated (the floor, stages/evaluate.py).

- fast (the laptop profile's): the reference is the whole test split; the floor a class-stratified subset of N
  training images (N = sample.num_samples, as many as are generated). Every metric on every image.
- standard (the papers'): FID against the statistics of the whole training split, as Heusel et al. (2017) define
  it and Ho et al. (2020), Song et al. (2021) and Nichol & Dhariwal (2021) report it for CIFAR-10 at N = 50,000;
  IS over 10 splits of the N samples (Salimans et al. 2016). KID and precision/recall (which costs N^2) compare
  the first SUBSET samples with a class-stratified SUBSET of the training split. The floor is the whole test
  split: real images the model never saw, scored the same way.

FID depends on N and on the reference, so numbers of two protocols, or of one protocol at two N, are not
comparable: the headline files them under `protocol_key` (fast-1k, standard-50k), so that `dvc metrics diff`
and `dvc exp show` never put them in one column.
"""

import json
import warnings
from pathlib import Path

import torch

from ddpm import load_classifier, safe_load
from ddpm.data import floor_subset, stratified_subset
from ddpm.metrics import Scorer, extract_features, make_extractor

from .io import load_prepared

SUBSET = 10_000
REFERENCE_SPLIT = {"fast": "test", "standard": "train"}
FLOOR_SPLIT = {"fast": "train", "standard": "test"}


def protocol_key(protocol: str, num_samples: int) -> str:
    """The headline's key for numbers of `protocol` at `num_samples`: "fast-1k", "standard-50k", "fast-40"."""
    return f"{protocol}-{num_samples // 1000}k" if num_samples % 1000 == 0 else f"{protocol}-{num_samples}"


def subset(protocol: str) -> int | None:
    """How many images of each set KID and precision/recall use (None: all)."""
    return SUBSET if protocol == "standard" else None


def reference_rows(protocol: str, labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Indices of the reference split whose features are kept for KID and precision/recall (the FID statistics
    use all): all of the test split (fast), a class-stratified SUBSET of the training split drawn with seed + 3
    (standard)."""
    rows = torch.arange(len(labels))
    return stratified_subset(rows, labels, subset(protocol), seed + 3)[0]


def floor_set(protocol: str, data, num_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(uint8 images, labels, split) of the floor: N stratified training images (fast), the test split (standard)."""
    split = FLOOR_SPLIT[protocol]
    images, labels, _ = load_prepared(data, split)
    if protocol == "fast":
        if num_samples > len(images):
            warnings.warn(f"the floor uses all {len(images)} train images, fewer than the {num_samples} generated",
                          stacklevel=2)
        images, labels = floor_subset(images, labels, num_samples, seed)
    return images, labels, split


def scorer_for(p, inception, *, data: Path, reference: Path, classifier: Path, device,
               extract=extract_features) -> tuple[Scorer, str]:
    """A Scorer on each extractor that the `reference` folder holds and this run can build (`inception`:
    stages.pipeline.inception.InceptionWeights), with the features of evaluate.protocol's floor set, and what
    became of Inception-v3, for the headline. `extract`: as the Scorer's (stages.pipeline.shard.sharded_features
    spreads it over processes), the floor's features too."""
    held = json.loads((reference / "extractors.json").read_text())["extractors"]
    names = [e for e in held if e != "inception" or inception.path]
    status = ("unavailable (not in the reference: `dvc repro -f reference`)" if inception.path and "inception" not in
              names else inception.status())
    model = load_classifier(classifier, device)
    images, labels, _ = floor_set(p.evaluate.protocol, data, p.sample.num_samples, p.seed)
    extractors, refs = {}, {}
    for e in names:
        extractors[e] = make_extractor(e, classifier=model, weights=inception.path, sha256=inception.sha256,
                                       device=device)
        refs[e] = safe_load(reference / f"{e}.pt", ("reference", "reference_labels", "stats")) | {
            "floor": extract(extractors[e], images, batch_size=p.evaluate.batch_size, device=device),
            "floor_labels": labels}
    return Scorer(extractors, refs, seed=p.seed, batch_size=p.evaluate.batch_size, subset=subset(p.evaluate.protocol),
                  device=device, extract=extract), status
