"""reference: the real-data features every evaluation compares against, computed once per
(dataset, extractor, N) instead of once per sample set.

usage: python -m stages.reference --data DIR --classifier FILE --out DIR
Writes OUT/<extractor>.pt for each of evaluate.extractors: the features and logits of the whole test
split (the reference set) and of a class-stratified train subset of sample.num_samples images, the
same N as each generated set (the floor: real data scored as if it were generated), with both sets'
labels.
"""

import warnings

from ddpm import atomic_save, load_classifier, resolve_device
from ddpm.data import floor_subset
from ddpm.metrics import make_extractor, reference_features

from .pipeline.io import atomic_dir, load_prepared
from .pipeline.params import load_params, sections
from .pipeline.results import inception_weights
from .pipeline.run import check_writable, path_parser, run, seed_everything
from .pipeline.tracking import stage_run


def main(argv: list[str]) -> None:
    a = path_parser("--data", "--classifier", "--out").parse_args(argv)
    p = load_params()
    check_writable(a.out)
    weights = inception_weights(p)
    params = sections(p, "seed", "device", "evaluate.batch_size", "evaluate.extractors", "evaluate.inception_weights",
                      "sample.num_samples")
    test_images, test_labels, info = load_prepared(a.data, "test")
    with stage_run("reference", params=params, data_hash=info["content_hash"]) as tracker:
        seed_everything(p.seed)
        images, labels, _ = load_prepared(a.data, "train")
        n = p.sample.num_samples
        if n > len(images):
            warnings.warn(f"the floor uses all {len(images)} train images, fewer than the {n} generated", stacklevel=1)
        floor_images, floor_labels = floor_subset(images, labels, n, p.seed)
        device = resolve_device(p.device)
        classifier = load_classifier(a.classifier, device)
        with atomic_dir(a.out) as tmp:
            for name in p.evaluate.extractors:
                extractor = make_extractor(name, classifier=classifier, weights=weights, device=device)
                ref = reference_features(extractor, (test_images, test_labels), (floor_images, floor_labels),
                                         batch_size=p.evaluate.batch_size, device=device)
                atomic_save({"extractor": name, "dataset": info["dataset"], "data_hash": info["content_hash"],
                             "floor_split": "train", "seed": p.seed, **ref}, tmp / f"{name}.pt")
                print(f"reference {name}: {len(test_images)} test and {len(floor_images)} train images, "
                      f"{ref['test']['features'].shape[1]} features")
        tracker.log_metrics({"num_real": len(test_images), "num_floor": len(floor_images)})


if __name__ == "__main__":
    run(main)
