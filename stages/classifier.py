"""classifier: train the small domain CNN whose features and logits score samples (FID/IS).

usage: python -m stages.classifier --data DIR --out DIR --metrics FILE
"""

from ddpm import resolve_device, save_classifier
from ddpm.classifier import fit_classifier

from .pipeline.io import atomic_dir, class_names, load_info, load_prepared, write_json
from .pipeline.params import load_params, sections
from .pipeline.run import check_writable, path_parser, run
from .pipeline.tracking import stage_run


def main(argv: list[str]) -> None:
    a = path_parser("--data", "--out", "--metrics").parse_args(argv)
    p = load_params()
    check_writable(a.out, a.metrics)
    info = load_info(a.data)
    class_names(info, "the classifier behind FID/IS")
    with stage_run("classifier", params=sections(p, "seed", "device", "classifier"),
                   data_hash=info["content_hash"]) as tracker:
        train(a, p, tracker)


def train(a, p, tracker) -> None:
    images, labels, info = load_prepared(a.data, "train")
    test_images, test_labels, _ = load_prepared(a.data, "test")
    c = p.classifier
    model, losses, acc = fit_classifier((images, labels), (test_images, test_labels), len(info["class_names"]),
                                        width=c.width, epochs=c.epochs, lr=c.lr, batch_size=c.batch_size, seed=p.seed,
                                        device=resolve_device(p.device))
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
