"""The domain classifier learns a tiny synthetic task, deterministically, without side effects."""

import dataclasses

import pytest
import torch

from ddpm.classifier import Classifier, ClassifierConfig, accuracy, predict, to_unit_range, train_classifier

TINY = ClassifierConfig(in_channels=1, image_size=28, num_classes=4, width=8, feature_dim=16)


def quadrant_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class k = a bright 8x8 square somewhere in quadrant k over a dim noisy background.

    Returns uint8 images (n, 1, 28, 28) and int64 labels (n,).
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = torch.randint(0, 60, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    offsets = torch.randint(1, 6, (n, 2), generator=g)
    for i, (k, (dy, dx)) in enumerate(zip(labels.tolist(), offsets.tolist())):
        y, x = 14 * (k // 2) + dy, 14 * (k % 2) + dx
        images[i, :, y:y + 8, x:x + 8] = 230
    return images, labels


def train_tiny(seed: int = 0, n: int = 400, epochs: int = 3) -> tuple[Classifier, list[float]]:
    torch.manual_seed(seed)
    model = Classifier(TINY)
    images, labels = quadrant_images(n, seed=1)
    losses = train_classifier(model, images, labels, epochs=epochs, lr=1e-2, batch_size=32, seed=seed,
                              progress=False)
    return model, losses


def test_config_asdict_round_trips():
    config = ClassifierConfig(in_channels=3, image_size=32, width=16)
    assert ClassifierConfig(**dataclasses.asdict(config)) == config


@pytest.mark.parametrize("config", [TINY, ClassifierConfig(in_channels=3, image_size=32, width=8, feature_dim=24)])
def test_feature_and_logit_shapes(config):
    model = Classifier(config).eval()
    x = torch.rand(5, config.in_channels, config.image_size, config.image_size) * 2 - 1
    assert model.features(x).shape == (5, config.feature_dim)
    assert model(x).shape == (5, config.num_classes)


def test_rejects_wrong_inputs():
    model = Classifier(TINY).eval()
    with pytest.raises(ValueError, match="expected input"):
        model(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match="uint8"):
        predict(model, torch.zeros(2, 1, 28, 28))  # float images where uint8 is expected


def test_to_unit_range_maps_0_255_to_minus_one_one():
    x = to_unit_range(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2))
    assert x.flatten().tolist() == [-1.0, 1.0]


def test_learns_the_synthetic_task():
    model, losses = train_tiny()
    images, labels = quadrant_images(200, seed=2)  # held out
    assert losses[-1] < 0.5 * losses[0]
    assert accuracy(model, images, labels) > 0.9  # chance is 0.25


def test_training_is_deterministic_for_a_seed():
    (a, losses_a), (b, losses_b) = train_tiny(seed=3, epochs=1), train_tiny(seed=3, epochs=1)
    assert losses_a == losses_b
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)


def test_training_leaves_the_global_rng_alone():
    images, labels = quadrant_images(64, seed=1)
    model = Classifier(TINY)
    state = torch.get_rng_state()
    expected = torch.rand(3)
    torch.set_rng_state(state)
    train_classifier(model, images, labels, epochs=1, lr=1e-2, batch_size=32, seed=9, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_predict_restores_training_mode_and_batches_consistently():
    model = Classifier(TINY).train()
    images, _ = quadrant_images(10, seed=4)
    one_batch = predict(model, images, batch_size=10)
    assert model.training
    torch.testing.assert_close(predict(model, images, batch_size=3), one_batch)
    assert one_batch.shape == (10, 4)
