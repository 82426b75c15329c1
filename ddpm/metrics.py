"""Sample-quality metrics (FID, IS, KID, precision/recall) computed by torch-fidelity from stored features.

Two feature extractors, both torch-fidelity `FeatureExtractorBase` modules:

- "classifier": the domain classifier (ddpm.classifier), registered with torch-fidelity as `EXTRACTOR_NAME`.
  Its layers are "features" (the penultimate layer: FID, KID, precision/recall) and "logits" (IS).
- "inception": torch-fidelity's Inception-v3 ("inception-v3-compat"), layers "2048" and "logits_unbiased",
  built from a local weights file checked by hash and read as plain tensors (ddpm.inception, which also
  fetches the file when a caller asks it to). Grayscale images are repeated to 3 channels for it.

`extract_features` turns uint8 images into {"features": (N, D), "logits": (N, K)} once, so a reference
set's features can be stored and reused; `metrics_from_features` then calls torch-fidelity's own
feature -> metric functions. The numbers equal those of

    torch_fidelity.calculate_metrics(input1=UInt8Dataset(generated), input2=UInt8Dataset(reference),
                                     fid=True, isc=True, kid=True, prc=True, rng_seed=seed,
                                     feature_extractor=EXTRACTOR_NAME, feature_extractor_classifier=clf)

with the same extractor and seed (input1 generated, input2 real, as torch-fidelity's convention).
"""

import copy
import functools
import warnings
from pathlib import Path

import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.helpers import vassert
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from ddpm.classifier import Classifier, predict, to_unit_range
from ddpm.inception import (  # noqa: F401 (the names callers of make_extractor meet)
    INCEPTION_NAME,
    INCEPTION_SHA256,
    INCEPTION_WEIGHTS_FILE,
    MissingWeightsError,
    find_inception_weights,
    inception_extractor,
    load_inception_weights,
)
from ddpm.noise import fold_seed

EXTRACTOR_NAME = "ddpm-classifier"
EXTRACTORS = {  # our name -> (torch-fidelity's registered name, (layer for FID/KID/PRC, layer for IS))
    "classifier": (EXTRACTOR_NAME, ("features", "logits")),
    "inception": (INCEPTION_NAME, ("2048", "logits_unbiased")),
}
METRICS = ("fid", "isc", "kid", "prc")
KID_SUBSET_SIZE = 1000  # torch-fidelity's default, used whenever both sets are at least this large
KID_SUBSETS, ISC_SPLITS, PRC_NEIGHBORHOOD = 100, 10, 3  # torch-fidelity's defaults
PRC_BATCH_SIZE = 1000  # rows of the distance matrix held at once; the result does not depend on it

_KEYS = {  # torch-fidelity's result keys -> ours
    torch_fidelity.KEY_METRIC_FID: "fid",
    torch_fidelity.KEY_METRIC_ISC_MEAN: "is_mean",
    torch_fidelity.KEY_METRIC_ISC_STD: "is_std",
    torch_fidelity.KEY_METRIC_KID_MEAN: "kid_mean",
    torch_fidelity.KEY_METRIC_KID_STD: "kid_std",
    torch_fidelity.KEY_METRIC_PRECISION: "precision",
    torch_fidelity.KEY_METRIC_RECALL: "recall",
    torch_fidelity.KEY_METRIC_F_SCORE: "f_score",
}


class UInt8Dataset(Dataset):
    """Wraps uint8 images (N, C, H, W); item i is the uint8 tensor (C, H, W) torch-fidelity expects."""

    def __init__(self, images: torch.Tensor):
        to_unit_range(images[:1])  # validates dtype and rank
        self.images = images.cpu()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class ClassifierFeatureExtractor(torch_fidelity.FeatureExtractorBase):
    """torch-fidelity view of a trained Classifier: uint8 (B, C, H, W) -> the requested layers.

    It keeps a private copy of the classifier, because torch-fidelity freezes, evals and moves
    its extractor in place and the caller's model should not change under them.
    """

    def __init__(self, name: str, features_list: list[str], feature_extractor_classifier: Classifier | None = None,
                 **kwargs):
        super().__init__(name, features_list)
        vassert(isinstance(feature_extractor_classifier, Classifier),
                f"{name} needs the trained model as calculate_metrics(feature_extractor_classifier=...)")
        self.classifier = copy.deepcopy(feature_extractor_classifier).cpu()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """uint8 (B, C, H, W) -> one float32 tensor per requested layer, in the requested order."""
        features = self.classifier.features(to_unit_range(x))  # (B, feature_dim)
        layers = {"features": features, "logits": self.classifier.head(features)}  # logits: (B, num_classes)
        return tuple(layers[name].float() for name in self.features_list)


if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:  # a module reload must not register twice
    torch_fidelity.register_feature_extractor(EXTRACTOR_NAME, ClassifierFeatureExtractor)


def make_extractor(name: str, *, classifier: Classifier | None = None, weights: str | Path | None = None,
                   sha256: str | None = None,
                   device: str | torch.device = "cpu") -> torch_fidelity.FeatureExtractorBase:
    """torch-fidelity's extractor for `name` (a key of EXTRACTORS), frozen, in eval mode on `device`.

    "classifier" needs the trained `classifier` (copied, the caller's model is untouched); "inception"
    reads `weights`, else the file in torch-fidelity's cache, checked against `sha256` (MissingWeightsError if
    neither exists; CheckpointError for a file that is not plain Inception-v3 weights: `load_inception_weights`)."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r}; valid: {', '.join(EXTRACTORS)}")
    if name == "inception":
        return inception_extractor(weights, list(EXTRACTORS[name][1]), sha256).to(device)
    registered, layers = EXTRACTORS[name]
    extractor = create_feature_extractor(registered, list(layers), cuda=False, verbose=False,
                                         feature_extractor_classifier=classifier)
    return extractor.to(device)


@torch.no_grad()
def extract_features(extractor: torch_fidelity.FeatureExtractorBase, images: torch.Tensor, *,
                     batch_size: int = 256, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """uint8 images (N, C, H, W) -> {"features": (N, D), "logits": (N, K)}, float32 on the CPU.

    The batch loop of torch-fidelity's own extraction, on any device; a 1-channel image is repeated to
    3 channels for an extractor that takes RGB (Inception)."""
    to_unit_range(images[:1])  # validates dtype and rank
    rgb = EXTRACTORS["inception"][0] == extractor.get_name()
    chunks = []
    for batch in images.split(batch_size):
        if rgb and batch.shape[1] == 1:
            batch = batch.repeat(1, 3, 1, 1)  # (B, 3, H, W)
        chunks.append([f.float().cpu() for f in extractor(batch.to(device))])
    features, logits = (torch.cat(layer) for layer in zip(*chunks))
    return {"features": features, "logits": logits}


def _kid_subset_size(n_generated: int, n_reference: int, requested: int | None) -> int:
    """torch-fidelity's 1000, or the size of the smaller set (with a warning) when it has fewer samples."""
    if requested is not None:
        return requested
    smallest = min(n_generated, n_reference)
    if smallest < KID_SUBSET_SIZE:
        warnings.warn(f"KID subset size lowered from {KID_SUBSET_SIZE} to {smallest}, the size of the smaller set; "
                      "KID from small subsets is noisier", stacklevel=3)
    return min(smallest, KID_SUBSET_SIZE)


def fid_statistics(features: torch.Tensor) -> dict[str, torch.Tensor]:
    """torch-fidelity's FID statistics of features (N, D) as tensors that store as plain tensors:
    {"mu": (D,) float32, "sigma": (D, D) float64}, the dtypes of its own numpy statistics."""
    return {k: torch.from_numpy(v) for k, v in fid_features_to_statistics(features).items()}


def metrics_from_features(generated: dict, reference: dict | None = None, *, metrics=METRICS,
                          reference_stats: dict | None = None, subset: int | None = None,
                          kid_subset_size: int | None = None, kid_subsets: int = KID_SUBSETS,
                          isc_splits: int = ISC_SPLITS, prc_neighborhood: int = PRC_NEIGHBORHOOD,
                          seed: int = 2020) -> dict[str, float]:
    """FID / IS / KID / precision-recall of `generated` against `reference`, by torch-fidelity's functions.

    generated, reference: {"features": (N, D), "logits": (N, K)} from `extract_features` (IS uses the
    generated logits alone; `reference` is needed for kid, prc, and fid unless `reference_stats`, the
    `fid_statistics` of a larger reference set, are given). `subset`: KID and precision/recall use the first
    `subset` rows of each set (precision/recall costs N^2). Returns the keys of the requested `metrics`: fid;
    is_mean, is_std; kid_mean, kid_std; precision, recall, f_score. `seed` drives the IS split shuffling and
    the KID subset draws; the KID subset size defaults to min(1000, N, M).
    """
    gen, ref = generated["features"], reference["features"] if reference is not None else None
    seed, out = fold_seed(seed, 32), {}  # torch-fidelity draws with numpy's RandomState, which takes 32 bits
    if "fid" in metrics:
        stats = ({k: v.numpy() for k, v in reference_stats.items()} if reference_stats is not None
                 else fid_features_to_statistics(ref))
        out.update(fid_statistics_to_metric(fid_features_to_statistics(gen), stats, False))
    if "isc" in metrics:
        out.update(isc_features_to_metric(generated["logits"], splits=isc_splits, shuffle=True, rng_seed=seed))
    gen, ref = (gen[:subset], ref[:subset]) if subset and ref is not None else (gen, ref)
    if "kid" in metrics:
        size = _kid_subset_size(len(gen), len(ref), kid_subset_size)
        out.update(kid_features_to_metric(gen, ref, kid_subsets=kid_subsets, kid_subset_size=size, rng_seed=seed,
                                          verbose=False))
    if "prc" in metrics:
        out.update(prc_features_to_metric(gen, ref, prc_neighborhood=prc_neighborhood, prc_batch_size=PRC_BATCH_SIZE,
                                          save_cpu_ram=True, verbose=False))
    return {_KEYS[k]: float(v) for k, v in out.items()}


def metric_settings(n_generated: int, n_reference: int) -> dict:
    """The settings `metrics_from_features` uses by default for sets of these sizes, to report with the numbers."""
    return {"kid_subset_size": min(KID_SUBSET_SIZE, n_generated, n_reference), "kid_subsets": KID_SUBSETS,
            "isc_splits": ISC_SPLITS, "prc_neighborhood": PRC_NEIGHBORHOOD}


def evaluate_samples(generated: torch.Tensor, reference: torch.Tensor, classifier: Classifier | None, *,
                     fid: bool = True, isc: bool = True, kid: bool = True, prc: bool = False,
                     kid_subset_size: int | None = None, kid_subsets: int = KID_SUBSETS,
                     isc_splits: int = ISC_SPLITS, extractor: str = "classifier", weights: str | Path | None = None,
                     device: str | torch.device = "cpu", batch_size: int = 256, seed: int = 2020) -> dict[str, float]:
    """FID / IS / KID / precision-recall of uint8 `generated` (N, C, H, W) against uint8 `reference` (M, C, H, W).

    Extracts both sets' features with `extractor` and calls `metrics_from_features`; see there for the keys."""
    metrics = [m for m, on in zip(METRICS, (fid, isc, kid, prc)) if on]
    fe = make_extractor(extractor, classifier=classifier, weights=weights, device=device)
    gen = extract_features(fe, generated, batch_size=batch_size, device=device)
    ref = extract_features(fe, reference, batch_size=batch_size, device=device) if metrics != ["isc"] else None
    return metrics_from_features(gen, ref, metrics=metrics, kid_subset_size=kid_subset_size, kid_subsets=kid_subsets,
                                 isc_splits=isc_splits, seed=seed)


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[float, list[float]]:
    """Overall and per-class accuracy of logits (N, K) against int64 labels (N,); nan for an absent class."""
    hit = (logits.argmax(dim=1) == labels).float()
    return hit.mean().item(), [hit[labels == c].mean().item() for c in range(num_classes)]


def conditional_accuracy(classifier: Classifier, images: torch.Tensor, requested_labels: torch.Tensor, *,
                         batch_size: int = 512, device: str | torch.device = "cpu") -> tuple[float, list[float]]:
    """How often the classifier recognises the class a conditional sample was asked for.

    images: uint8 (N, C, H, W); requested_labels: int64 (N,). Returns the overall accuracy and one
    accuracy per class (nan for a class that was never requested). The classifier is moved to `device`.
    """
    logits = predict(classifier, images, batch_size=batch_size, device=device)
    return class_accuracy(logits, requested_labels, classifier.config.num_classes)


def over_floor(scores: dict[str, float], floor: dict[str, float]) -> dict[str, float]:
    """`scores` with fid_over_floor = FID / the floor's FID (1: as good as real data) right after fid."""
    ratio = scores["fid"] / floor["fid"] if floor["fid"] > 0 else float("nan")
    out = {}
    for key, value in scores.items():
        out[key] = value
        if key == "fid":
            out["fid_over_floor"] = ratio
    return out


def reference_features(extractor: torch_fidelity.FeatureExtractorBase, reference: tuple[torch.Tensor, torch.Tensor],
                       floor: tuple[torch.Tensor, torch.Tensor], *, batch_size: int = 256,
                       device: str | torch.device = "cpu") -> dict:
    """The real data a sample set is scored against, as features: the reference set `reference` and the floor set
    `floor` (real images scored as if generated), each (uint8 images, int64 labels).

    Returns {"reference": features, "floor": features, "reference_labels": (M,), "floor_labels": (N,)}; a
    Scorer also takes "stats" (`fid_statistics` of a larger set the FID is computed against)."""
    out = {}
    for name, (images, labels) in (("reference", reference), ("floor", floor)):
        out[name] = extract_features(extractor, images, batch_size=batch_size, device=device)
        out[f"{name}_labels"] = labels
    return out


class Scorer:
    """Scores uint8 image sets against stored reference features, once per extractor, next to the floor.

    extractors: {name: extractor from `make_extractor`}; references: {name: `reference_features` of that
    extractor, with "stats" where FID is against a larger set}; `subset`: as in `metrics_from_features`.
    `floor[name]` holds the floor set's metrics (for "classifier" also its accuracy on the reference set's
    labels, the best conditional accuracy to expect), computed on first use. `extract`: how features are
    extracted, `extract_features` by default; one that spreads the images over processes returns the features
    in one of them and None in the others, which call only `features`, in the same order, to take their share."""

    def __init__(self, extractors: dict, references: dict[str, dict], *, seed: int = 2020, batch_size: int = 256,
                 subset: int | None = None, device: str | torch.device = "cpu", extract=extract_features):
        self.extractors, self.references, self.subset = extractors, references, subset
        self.seed, self.batch_size, self.device, self.extract = seed, batch_size, device, extract

    @functools.cached_property
    def floor(self) -> dict[str, dict]:
        floor = {e: self._metrics(e, r["floor"]) for e, r in self.references.items()}
        if "classifier" in self.references:
            ref = self.references["classifier"]
            floor["classifier"]["cond_accuracy"] = class_accuracy(
                ref["reference"]["logits"], ref["reference_labels"], ref["reference"]["logits"].shape[1])[0]
        return floor

    def _metrics(self, e: str, features: dict) -> dict[str, float]:
        r = self.references[e]
        return metrics_from_features(features, r["reference"], reference_stats=r.get("stats"), subset=self.subset,
                                     seed=self.seed)

    def features(self, images: torch.Tensor) -> dict[str, dict] | None:
        """{extractor: features} of uint8 images (N, C, H, W); None where `extract` leaves them to another process."""
        out = {e: self.extract(x, images, batch_size=self.batch_size, device=self.device)
               for e, x in self.extractors.items()}
        return None if any(f is None for f in out.values()) else out

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, dict]:
        """{extractor: metrics with fid_over_floor} of uint8 images (N, C, H, W); with the requested `labels`
        (N,) the classifier's entry adds cond_accuracy and cond_accuracy_per_class (a list)."""
        out = {}
        for e, feats in self.features(images).items():
            out[e] = over_floor(self._metrics(e, feats), self.floor[e])
            if e == "classifier" and labels is not None:
                overall, per_class = class_accuracy(feats["logits"], labels, feats["logits"].shape[1])
                out[e] |= {"cond_accuracy": overall, "cond_accuracy_per_class": per_class}
        return out

    def settings(self) -> dict:
        """The settings behind the numbers, to report with them (sizes of the classifier's sets)."""
        ref = self.references[next(iter(self.references))]
        n_ref, n_floor = len(ref["reference_labels"]), len(ref["floor_labels"])
        n_kid = min(n_ref, n_floor, self.subset or n_floor)
        return {"num_real": int(ref.get("num_real", n_ref)), "num_floor": n_floor, **metric_settings(n_kid, n_kid)}
