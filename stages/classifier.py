"""classifier: train the small domain CNN whose features and logits score samples (FID/IS).

usage: python -m stages.classifier --data DIR --out DIR --metrics FILE
"""

import torch

from ddpm import resolve_device, save_classifier
from ddpm.classifier import Classifier, ClassifierConfig, accuracy, train_classifier

from .common import atomic_dir, class_names, load_info, load_prepared, path_parser, run, seed_everything, write_json
from .params import load_params, sections
from .tracking import stage_run


def main(argv: list[str]) -> None:
    a = path_parser("--data", "--out", "--metrics").parse_args(argv)
    p = load_params()
    info = load_info(a.data)
    class_names(info, "the classifier behind FID/IS")
    with stage_run("classifier", params=sections(p, "seed", "device", "classifier"),
                   data_hash=info["content_hash"]) as tracker:
        train(a, p, tracker)


def fit(p, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
        num_classes: int) -> tuple[Classifier, list[float], float]:
    """The domain classifier trained with `p.classifier` on (images, labels): (model, loss per epoch,
    test accuracy)."""
    seed_everything(p.seed)
    device = resolve_device(p.device)
    (images, labels), (test_images, test_labels) = train, test
    config = ClassifierConfig(in_channels=images.shape[1], image_size=images.shape[2], num_classes=num_classes,
                              width=p.classifier.width)
    model = Classifier(config)
    losses = train_classifier(model, images, labels, epochs=p.classifier.epochs, lr=p.classifier.lr,
                              batch_size=p.classifier.batch_size, seed=p.seed, device=device)
    return model, losses, accuracy(model, test_images, test_labels, device=device)


def train(a, p, tracker) -> None:
    images, labels, info = load_prepared(a.data, "train")
    test_images, test_labels, _ = load_prepared(a.data, "test")
    model, losses, acc = fit(p, (images, labels), (test_images, test_labels), len(info["class_names"]))
    with atomic_dir(a.out) as tmp:
        save_classifier(tmp / "classifier.pt", model.cpu())
    metrics = {"test_accuracy": round(acc, 5), "final_loss": round(losses[-1], 5)}
    write_json(a.metrics, metrics)
    tracker.log_history("loss", list(enumerate(losses, 1)))
    tracker.log_metrics({"classifier_test_accuracy": acc}, parent=True)
    tracker.log_metrics(metrics)
    print(f"classifier test accuracy {acc:.4f}")


if __name__ == "__main__":
    run(main)
