"""Sample-quality metrics (FID, IS, KID, precision/recall) through torch-fidelity.

The features come from the domain classifier (ddpm.classifier), registered with torch-fidelity as the
feature extractor `EXTRACTOR_NAME`. torch-fidelity builds extractors by name as
`cls(name, features_list, **kwargs)` from the keyword arguments of `calculate_metrics`, so the trained
classifier travels in the keyword `feature_extractor_classifier`:

    torch_fidelity.calculate_metrics(input1=UInt8Dataset(gen), input2=UInt8Dataset(ref), fid=True,
                                     feature_extractor=EXTRACTOR_NAME, feature_extractor_classifier=clf,
                                     cuda=False, cache=False, save_cpu_ram=True, verbose=False)

The extractor offers two layers: "features" (the penultimate layer, for FID, KID and precision/recall)
and "logits" (for IS; torch-fidelity applies the softmax itself). Nothing is downloaded or cached.
"""

import copy
import warnings

import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.helpers import vassert
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from ddpm.classifier import Classifier, predict, to_unit_range

EXTRACTOR_NAME = "ddpm-classifier"
KID_SUBSET_SIZE = 1000  # torch-fidelity's default, used whenever both sets are at least this large

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


def _kid_subset_size(n_generated: int, n_reference: int, requested: int | None) -> int:
    """torch-fidelity's 1000, or the size of the smaller set (with a warning) when it has fewer samples."""
    if requested is not None:
        return requested
    smallest = min(n_generated, n_reference)
    if smallest < KID_SUBSET_SIZE:
        warnings.warn(f"KID subset size lowered from {KID_SUBSET_SIZE} to {smallest}, the size of the smaller set; "
                      "KID from small subsets is noisier", stacklevel=3)
    return min(smallest, KID_SUBSET_SIZE)


def evaluate_samples(generated: torch.Tensor, reference: torch.Tensor, classifier: Classifier, *, fid: bool = True,
                     isc: bool = True, kid: bool = True, prc: bool = False, kid_subset_size: int | None = None,
                     kid_subsets: int = 100, isc_splits: int = 10, device: str | torch.device = "cpu",
                     batch_size: int = 256, seed: int = 2020) -> dict[str, float]:
    """FID / IS / KID / precision-recall of uint8 `generated` (N, C, H, W) against uint8 `reference` (M, C, H, W).

    IS is computed on `generated` alone. Returns a subset of the keys fid, is_mean, is_std, kid_mean,
    kid_std, precision, recall, f_score. `seed` drives IS split shuffling and KID subset draws.
    """
    device = torch.device(device)
    kwargs = dict(fid=fid, isc=isc, kid=kid, prc=prc, isc_splits=isc_splits, kid_subsets=kid_subsets)
    if kid:
        kwargs["kid_subset_size"] = _kid_subset_size(len(generated), len(reference), kid_subset_size)
    metrics = torch_fidelity.calculate_metrics(
        input1=UInt8Dataset(generated), input2=UInt8Dataset(reference), **kwargs,
        feature_extractor=EXTRACTOR_NAME, feature_extractor_classifier=classifier,
        cuda=device.type == "cuda", batch_size=batch_size, rng_seed=seed,
        cache=False, save_cpu_ram=True, verbose=False)  # no file cache, no DataLoader worker processes
    return {_KEYS[k]: float(v) for k, v in metrics.items()}


def conditional_accuracy(classifier: Classifier, images: torch.Tensor, requested_labels: torch.Tensor, *,
                         batch_size: int = 512, device: str | torch.device = "cpu") -> tuple[float, list[float]]:
    """How often the classifier recognises the class a conditional sample was asked for.

    images: uint8 (N, C, H, W); requested_labels: int64 (N,). Returns the overall accuracy and one
    accuracy per class (nan for a class that was never requested). The classifier is moved to `device`.
    """
    predicted = predict(classifier, images, batch_size=batch_size, device=device).argmax(dim=1)
    hit = (predicted == requested_labels).float()
    per_class = [hit[requested_labels == c].mean().item() for c in range(classifier.config.num_classes)]
    return hit.mean().item(), per_class
