"""prepare: load a dataset, take the requested subset, write uint8 tensors + info.json.

usage: python -m stages.prepare OUT_DIR
"""

from ddpm import atomic_save
from ddpm.data import class_histogram, stratified_subset

from .pipeline.io import atomic_dir, load_data, write_json
from .pipeline.params import load_params, sections
from .pipeline.run import check_writable, run, seed_everything
from .pipeline.tracking import stage_run


def main(argv: list[str]) -> None:
    (out,) = argv
    p = load_params()
    check_writable(out)
    # the output goes in place only once its MLflow run has ended FINISHED: a tracking failure leaves none
    with atomic_dir(out) as tmp, stage_run("prepare", params=sections(p, "seed", "data")) as tracker:
        prepare(p, tmp, tracker)


def prepare(p, folder, tracker) -> None:
    """Write train.pt, test.pt and info.json into `folder`, and log them to `tracker`."""
    seed_everything(p.seed)
    data = load_data(p)
    train = stratified_subset(data.train_images, data.train_labels, p.data.limit, p.seed)
    test = stratified_subset(data.test_images, data.test_labels, p.data.test_limit, p.seed + 1)
    num_classes = len(data.class_names)  # 0: an unlabelled image folder
    atomic_save({"images": train[0], "labels": train[1]}, folder / "train.pt")
    atomic_save({"images": test[0], "labels": test[1]}, folder / "test.pt")
    subset = type(data)(train[0], train[1], test[0], test[1], data.class_names)
    info = {
        "dataset": p.data.name,
        "shape": list(train[0].shape[1:]),
        "class_names": list(data.class_names),
        "train_count": len(train[0]),
        "test_count": len(test[0]),
        "train_histogram": class_histogram(train[1], num_classes) if num_classes else [],
        "test_histogram": class_histogram(test[1], num_classes) if num_classes else [],
        "content_hash": subset.content_hash(),
    }
    write_json(folder / "info.json", info)
    tracker.set_tags({"data_hash": info["content_hash"]})
    tracker.log_metrics({"train_count": info["train_count"], "test_count": info["test_count"]})
    tracker.log_artifact(folder / "info.json")
    print(f"prepared {p.data.name}: {len(train[0])} train / {len(test[0])} test images of shape "
          f"{tuple(train[0].shape[1:])}")


if __name__ == "__main__":
    run(main)
