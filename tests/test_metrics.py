"""FID / IS / KID / precision-recall through torch-fidelity, with the domain classifier as feature extractor
on synthetic images, and the Inception-v3 path from a local file (weights found or a clear error; the library
downloads only when asked: tests/test_inception.py)."""

import hashlib
import os
import shutil
import socket
import warnings

import numpy as np
import pytest
import torch
import torch_fidelity

from ddpm import CheckpointError
from ddpm.classifier import Classifier, ClassifierConfig, accuracy, to_unit_range, train_classifier
from ddpm.metrics import (
    EXTRACTOR_NAME,
    INCEPTION_WEIGHTS_FILE,
    MissingWeightsError,
    UInt8Dataset,
    conditional_accuracy,
    evaluate_samples,
    extract_features,
    find_inception_weights,
    make_extractor,
)


def quadrant_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class k = a bright 8x8 square in quadrant k over dim noise: uint8 (n, 1, 28, 28), int64 (n,)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = torch.randint(0, 60, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    offsets = torch.randint(1, 6, (n, 2), generator=g)
    for i, (k, (dy, dx)) in enumerate(zip(labels.tolist(), offsets.tolist())):
        y, x = 14 * (k // 2) + dy, 14 * (k % 2) + dx
        images[i, :, y:y + 8, x:x + 8] = 230
    return images, labels


def add_noise(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noisy = images.float() + sigma * torch.randn(images.shape, generator=g)
    return noisy.round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    torch.manual_seed(0)
    model = Classifier(ClassifierConfig(num_classes=4, width=8, feature_dim=16))
    train_classifier(model, *quadrant_images(400, seed=1), epochs=6, lr=1e-2, batch_size=32, seed=0, progress=False)
    return model


@pytest.fixture(scope="module")
def real() -> tuple[torch.Tensor, torch.Tensor]:
    return quadrant_images(300, seed=2)


def fid(generated, reference, classifier) -> float:
    return evaluate_samples(generated, reference, classifier, isc=False, kid=False)["fid"]


def test_fid_of_a_set_with_itself_is_zero(classifier, real):
    images, _ = real
    assert abs(fid(images, images, classifier)) < 1e-3 * fid(add_noise(images, 10), images, classifier)


def test_fid_grows_with_noise(classifier, real):
    images, _ = real
    fids = [fid(add_noise(images, sigma), images, classifier) for sigma in (10, 40, 100)]
    assert 0 < fids[0] < fids[1] < fids[2], fids


def test_inception_score_is_one_for_one_class_and_higher_for_all(classifier, real):
    images, labels = real
    one_class = evaluate_samples(images[labels == 0], images, classifier, fid=False, kid=False)["is_mean"]
    balanced = evaluate_samples(images, images, classifier, fid=False, kid=False)["is_mean"]
    assert one_class == pytest.approx(1.0, abs=0.2)
    assert balanced > 2.5  # at most 4 with 4 classes


def test_kid_subset_shrinks_to_the_smaller_set_with_a_warning(classifier, real):
    images, _ = real
    with pytest.warns(UserWarning, match="KID subset size lowered from 1000 to 200"):
        small = evaluate_samples(images[:200], images, classifier, fid=False, isc=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explicit = evaluate_samples(images[:200], images, classifier, fid=False, isc=False, kid_subset_size=200)
    assert small == explicit
    assert set(small) == {"kid_mean", "kid_std"}


def test_same_numbers_as_torch_fidelity_called_directly(classifier, real):
    images, _ = real
    generated = add_noise(images[:250], 30)
    ours = evaluate_samples(generated, images, classifier, prc=True, kid_subset_size=100)
    direct = torch_fidelity.calculate_metrics(
        input1=UInt8Dataset(generated), input2=UInt8Dataset(images), fid=True, isc=True, kid=True, prc=True,
        kid_subset_size=100, feature_extractor=EXTRACTOR_NAME, feature_extractor_classifier=classifier,
        cuda=False, cache=False, save_cpu_ram=True, verbose=False)
    assert ours["fid"] == pytest.approx(direct[torch_fidelity.KEY_METRIC_FID], rel=1e-6)
    assert ours["is_mean"] == pytest.approx(direct[torch_fidelity.KEY_METRIC_ISC_MEAN], rel=1e-6)
    assert ours["kid_mean"] == pytest.approx(direct[torch_fidelity.KEY_METRIC_KID_MEAN], rel=1e-6)
    assert ours["precision"] == direct[torch_fidelity.KEY_METRIC_PRECISION]
    assert ours["recall"] == direct[torch_fidelity.KEY_METRIC_RECALL]


def psd_sqrt(m: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix (D, D)."""
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(w.clip(min=0))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to features a (N, D) and b (M, D).

    Uses tr sqrt(S_a S_b) = tr sqrt(S_a^1/2 S_b S_a^1/2), which stays real and stable for singular S.
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = psd_sqrt(cov_a)
    tr_covmean = np.trace(psd_sqrt(root_a @ cov_b @ root_a))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_covmean)


def test_fid_matches_the_frechet_distance_of_the_classifier_features(classifier, real):
    images, _ = real
    generated = add_noise(images, 30)
    with torch.no_grad():
        classifier.eval()
        feats = [classifier.features(to_unit_range(x)).double().numpy() for x in (generated, images)]
    assert fid(generated, images, classifier) == pytest.approx(frechet_distance(*feats), rel=1e-4)


def test_leaves_the_classifier_as_it_was(classifier, real):
    images, _ = real
    classifier.train()
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    evaluate_samples(images, images, classifier, kid=False)
    assert classifier.training and all(p.requires_grad for p in classifier.parameters())
    assert all(torch.equal(v, classifier.state_dict()[k]) for k, v in before.items())


def offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tried to open a network connection")
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_needs_no_network_and_writes_no_cache(classifier, real, monkeypatch, tmp_path):
    offline(monkeypatch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # where torch-fidelity would download and cache
    images, _ = real
    evaluate_samples(images, images, classifier, prc=True, kid_subset_size=100)
    assert list(tmp_path.iterdir()) == []


def test_conditional_accuracy_on_real_labels_equals_accuracy(classifier, real):
    images, labels = real
    overall, per_class = conditional_accuracy(classifier, images, labels)
    assert overall == pytest.approx(accuracy(classifier, images, labels))
    assert len(per_class) == 4 and overall == pytest.approx(np.mean(per_class))  # balanced classes
    _, missing = conditional_accuracy(classifier, images[labels != 3], labels[labels != 3])
    assert np.isnan(missing[3])


def test_inception_without_weights_is_a_clear_error_and_no_download(monkeypatch, tmp_path):
    offline(monkeypatch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    with pytest.raises(MissingWeightsError) as error:
        make_extractor("inception")
    message = str(error.value)
    assert message.startswith(f"Inception-v3 weights not found at {expected}: put torch-fidelity's "
                              f"{INCEPTION_WEIGHTS_FILE}")
    assert "\n" not in message
    with pytest.raises(MissingWeightsError, match=f"not found at {tmp_path / 'elsewhere.pth'}"):
        find_inception_weights(tmp_path / "elsewhere.pth")
    assert list(tmp_path.iterdir()) == []


def test_inception_weights_come_from_the_given_path_else_torch_fidelitys_cache(fake_inception, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    cached.symlink_to(fake_inception)
    assert find_inception_weights() == cached
    assert find_inception_weights(fake_inception) == fake_inception


def test_inception_sees_grayscale_as_its_rgb_repeat(fake_inception, real):
    images, _ = real
    extractor = make_extractor("inception", weights=fake_inception)
    gray = extract_features(extractor, images[:2], batch_size=1)
    rgb = extract_features(extractor, images[:2].repeat(1, 3, 1, 1), batch_size=2)
    assert gray["features"].shape == (2, 2048) and gray["logits"].shape == (2, 1008)
    for layer in ("features", "logits"):  # compared at their own scale: a random network's activations are tiny
        scale = gray[layer].abs().max()
        assert scale > 0 and (gray[layer] - rgb[layer]).abs().max() <= 1e-4 * scale
        assert (gray[layer][0] - gray[layer][1]).abs().max() > 1e-2 * scale  # different images, different features


@pytest.mark.parametrize("size", [32, 64])
def test_both_extractors_take_rgb_images_at_32_and_64_px(fake_inception, size):
    images = torch.zeros(3, 3, size, size, dtype=torch.uint8)  # black, a red left half, a white top half
    images[1, 0, :, : size // 2] = 255
    images[2, :, : size // 2] = 255
    classifier = Classifier(ClassifierConfig(in_channels=3, image_size=size, num_classes=2, width=4))
    for name, dims in [("classifier", (3, 128)), ("inception", (3, 2048))]:
        extractor = make_extractor(name, classifier=classifier, weights=fake_inception)
        feats = extract_features(extractor, images, batch_size=2)["features"]
        scale = feats.abs().max()  # a random network's activations are tiny: compare at their own scale
        assert feats.shape == dims and torch.isfinite(feats).all() and scale > 0, name
        assert (feats[0] - feats[1]).abs().max() > 1e-3 * scale, name  # different images, different features


class Shell:
    """Unpickling this runs a shell command that creates `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch '{self.path}'",)


@pytest.mark.parametrize("name", ["evil.pth", INCEPTION_WEIGHTS_FILE])
def test_inception_weights_that_carry_code_are_refused_and_never_run(tmp_path, name):
    marker, weights = tmp_path / "pwned", tmp_path / name
    torch.save({"fc.weight": torch.zeros(1008, 2048), "payload": Shell(marker)}, weights)
    with pytest.raises(CheckpointError) as error:
        make_extractor("inception", weights=weights)
    assert str(error.value).startswith(f"{weights}: ") and "\n" not in str(error.value)
    assert not marker.exists()
    torch.load(weights, weights_only=False)  # the payload is live: an unsafe load would have run it
    assert marker.exists()


def test_inception_is_built_from_the_weights_in_the_file(fake_inception):
    extractor = make_extractor("inception", weights=fake_inception)
    saved = torch.load(fake_inception, weights_only=True)
    loaded = extractor.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    features = extract_features(extractor, torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert features["features"].shape == (2, 2048) and features["logits"].shape == (2, 1008)


def test_torch_fidelitys_file_name_promises_its_hash(fake_inception, tmp_path, monkeypatch):
    renamed = tmp_path / INCEPTION_WEIGHTS_FILE
    shutil.copy(fake_inception, renamed)
    digest = hashlib.sha256(renamed.read_bytes()).hexdigest()
    with pytest.raises(CheckpointError) as error:
        make_extractor("inception", weights=renamed)
    assert str(error.value) == (f"{renamed}: its SHA-256 starts {digest[:8]}, not 6726825d as torch-fidelity's "
                                "published Inception-v3 weights do; a damaged or different file under their name")
    monkeypatch.setattr("ddpm.inception.INCEPTION_SHA256", digest[:8])  # as if it were the published file
    assert make_extractor("inception", weights=renamed).get_name() == "inception-v3-compat"


@pytest.mark.parametrize("content, why", [
    (torch.zeros(3), "a Tensor, not a state dict of tensors)"),
    ({"fc.weight": torch.zeros(1008, 2048)}, "Missing key(s) in state_dict: "),
])
def test_inception_weights_of_the_wrong_kind_are_one_line_naming_the_file(tmp_path, content, why):
    weights = tmp_path / "other.pth"
    torch.save(content, weights)
    with pytest.raises(CheckpointError) as error:
        make_extractor("inception", weights=weights)
    message = str(error.value)
    assert message.startswith(f"{weights}: not Inception-v3 weights in torch-fidelity's format ({why}")
    assert "\n" not in message and len(message) < 300
