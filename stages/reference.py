"""reference: the real-data features every evaluation compares against, computed once per (dataset, extractor,
evaluate.protocol): the number of samples and the samplers are not among its params, so changing them never
recomputes it.

usage: python -m stages.reference --data DIR --classifier FILE --out DIR
Writes OUT/<extractor>.pt for each of evaluate.extractors that can be had (Inception-v3 is left out, with the
reason, when its weights cannot be downloaded), and OUT/extractors.json naming them. Each holds the FID
statistics of the whole reference split (fast: the test split; standard: the training split; see
stages/pipeline/protocol.py), and the features, logits and labels of the images kept for KID and
precision/recall (fast: all of them; standard: a class-stratified 10,000).
"""

from ddpm import atomic_save, load_classifier
from ddpm.metrics import extract_features, fid_statistics, make_extractor

from .pipeline.inception import inception_weights
from .pipeline.io import atomic_dir, load_prepared, write_json
from .pipeline.params import load_params, sections
from .pipeline.protocol import REFERENCE_SPLIT, reference_rows
from .pipeline.run import (
    check_writable,
    init_distributed,
    join_or_relaunch,
    path_parser,
    rank0_first,
    run,
    seed_everything,
)
from .pipeline.shard import sharded_features
from .pipeline.tracking import stage_run


def main(argv: list[str]) -> None:
    a = path_parser("--data", "--classifier", "--out").parse_args(argv)
    p = load_params()
    check_writable(a.out)
    join_or_relaunch(p.train, "stages.reference", argv)  # the features do not depend on the number of processes
    rank, world_size, device = init_distributed(p.device)
    inception = rank0_first(lambda: inception_weights(p), rank)
    extractors = [e for e in p.evaluate.extractors if e != "inception" or inception.path]
    images, labels, info = load_prepared(a.data, REFERENCE_SPLIT[p.evaluate.protocol])
    extract = sharded_features(extract_features, rank, world_size)
    features = extracted(a, p, inception, extractors, images, device, extract)
    if rank > 0:  # only rank 0 writes files and talks to MLflow; the others extract their share of each
        list(features)
        return
    params = sections(p, "seed", "device", "evaluate.protocol", "evaluate.batch_size", "evaluate.extractors",
                      "evaluate.inception_weights")
    with stage_run("reference", params=params, data_hash=info["content_hash"]) as tracker:
        rows = reference_rows(p.evaluate.protocol, labels, p.seed)
        split = REFERENCE_SPLIT[p.evaluate.protocol]
        with atomic_dir(a.out) as tmp:
            for name, feats in features:
                atomic_save({"extractor": name, "protocol": p.evaluate.protocol, "reference_split": split,
                             "dataset": info["dataset"], "data_hash": info["content_hash"], "seed": p.seed,
                             "num_real": len(images), "stats": fid_statistics(feats["features"]),
                             "reference": {k: v[rows] for k, v in feats.items()}, "reference_labels": labels[rows]},
                            tmp / f"{name}.pt")
                print(f"reference {name}: FID statistics of {len(images)} {split} images, {len(rows)} kept for KID "
                      f"and precision/recall, {feats['features'].shape[1]} features ({world_size} processes)")
            write_json(tmp / "extractors.json", {"extractors": extractors, "inception": inception.status()})
        tracker.set_tags({"inception": inception.status(), "processes": str(world_size)})
        tracker.log_metrics({"num_real": len(images), "num_kept": len(rows)})


def extracted(a, p, inception, extractors: list[str], images, device, extract):
    """(name, features of `images`) for each extractor in turn, by `extract` (None in the processes that
    are not rank 0 of several)."""
    seed_everything(p.seed)
    classifier = load_classifier(a.classifier, device)
    for name in extractors:
        extractor = make_extractor(name, classifier=classifier, weights=inception.path, sha256=inception.sha256,
                                   device=device)
        yield name, extract(extractor, images, batch_size=p.evaluate.batch_size, device=device)


if __name__ == "__main__":
    run(main)
