"""evaluate: score every sample set against the stored real-data reference (the reference stage) with
FID, IS, KID and precision/recall (torch-fidelity, on each extractor the reference holds), each next to its
floor (real images scored the same way; which ones, and what the reference is, evaluate.protocol says:
stages/pipeline/protocol.py), and, for the conditional model, the classifier's accuracy on the requested classes.

usage: python -m stages.evaluate --data DIR --classifier FILE --reference DIR --metrics FILE --details FILE
         --table CSV --plot CSV --figure PNG --cfg-plot CSV --cfg-figure PNG --ema-plot CSV SAMPLE_DIR...
--metrics: the headline that DVC shows (`headline`), under the protocol's key (fast-1k, standard-50k).
--details: results[variant][tag] = the classifier's metrics (+ fid_over_floor, cond_accuracy), with each other
extractor's under its name; results["floor"][extractor]; results["protocol"] (how the numbers were made).
--table: one row per sample set. Every output is written to a temporary first and moved into place only when
all are written and logged, the metrics last: a stage that fails or is killed leaves the previous outputs as
they were.
"""

import json
import warnings
from pathlib import Path

from ddpm import SamplerSetting, safe_load
from ddpm.metrics import extract_features

from .pipeline.inception import inception_weights
from .pipeline.io import load_info, staged_files
from .pipeline.params import load_params, sections
from .pipeline.protocol import FLOOR_SPLIT, REFERENCE_SPLIT, protocol_key, scorer_for, subset
from .pipeline.registry import describe_model_versions
from .pipeline.results import headline, sampler_tags, write_results
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

# moved into place in this order, the metrics last
OUTPUTS = ("plot", "figure", "cfg_plot", "cfg_figure", "ema_plot", "table", "details", "metrics")


def main(argv: list[str]) -> None:
    ap = path_parser("--data", "--classifier", "--reference", "--metrics", "--details", "--table", "--plot",
                     "--figure", "--cfg-plot", "--cfg-figure", "--ema-plot")
    ap.add_argument("samples", type=Path, nargs="+")
    a = ap.parse_args(argv)
    p = load_params()
    check_writable(*(getattr(a, name) for name in OUTPUTS))
    join_or_relaunch(p.train, "stages.evaluate", argv)  # the numbers do not depend on the number of processes
    rank, world_size, device = init_distributed(p.device)
    inception = rank0_first(lambda: inception_weights(p), rank)
    extract = sharded_features(extract_features, rank, world_size)
    if rank > 0:  # only rank 0 writes files and talks to MLflow; the others extract their share of each set
        scorer, _ = scorer_for(p, inception, data=a.data, reference=a.reference, classifier=a.classifier,
                               device=device, extract=extract)
        for _, _, data in sample_sets(a.samples):
            scorer.features(data["images"])
        return
    params = sections(p, "seed", "device", "evaluate", "sample.num_samples")
    with stage_run("evaluate", params=params, data_hash=load_info(a.data)["content_hash"]) as tracker:
        results, rows = evaluate(a, p, inception, device, extract)
        tracker.set_tags({"processes": str(world_size)})
        outputs = [getattr(a, name) for name in OUTPUTS]  # the metrics last
        with staged_files(outputs, ".evaluate") as tmp:
            write_results({name: tmp[getattr(a, name)] for name in OUTPUTS}, results, rows)
            tracker.set_tags(sampler_tags(results["protocol"]))
            summary = headline(rows, results["floor"], results["protocol"])
            tracker.log_metrics(summary, parent=True)  # the headline; every number as one table artifact
            tracker.log_dict(results, "eval.json")
            (numbers,) = summary.values()
            describe_model_versions(tracker, {v: {"sampler": h["best"], "fid": h["fid"],
                                                  "fid_over_floor": h["fid_over_floor"]}
                                              for v, h in numbers.items() if v not in ("floor", "inception")},
                                    results["protocol"], model_hashes(a.samples))
            for f in outputs:
                tracker.log_artifact(tmp[f])


def evaluate(a, p, inception, device, extract=extract_features) -> tuple[dict, list[dict]]:
    """(results, table rows) of every sample set; `extract`: how features are extracted (sharded_features)."""
    seed_everything(p.seed)
    info, protocol = load_info(a.data), p.evaluate.protocol
    scorer, status = scorer_for(p, inception, data=a.data, reference=a.reference, classifier=a.classifier,
                                device=device, extract=extract)
    results, rows, samplers, n = {}, [], {}, p.sample.num_samples
    for folder, s, data in sample_sets(a.samples):
        if len(data["images"]) != n:
            warnings.warn(f"{folder}/{s['tag']}: {len(data['images'])} images, not sample.num_samples {n}",
                          stacklevel=1)
        scores = scorer(data["images"], data["labels"] if len(data["labels"]) else None)
        entry = scores.pop("classifier")  # the classifier's numbers at the top level, the others nested
        if "cond_accuracy_per_class" in entry:
            entry["cond_accuracy_per_class"] = dict(zip(info["class_names"], entry["cond_accuracy_per_class"]))
        results.setdefault(s["variant"], {})[s["tag"]] = entry | scores
        setting = SamplerSetting.from_dict(s).to_dict()
        if "precision" in s:  # the network's while sampling; another name than precision/recall's precision
            setting["sample_precision"] = s["precision"]
        samplers.setdefault(s["variant"], {})[s["tag"]] = setting | {k: s[k] for k in ("seed", "num_samples")}
        others = {f"{e}.{k}": v for e, m in scores.items() for k, v in m.items() if isinstance(v, float)}
        rows.append({"variant": s["variant"]} | setting | entry | others)
        print(f"{s['variant']} {s['tag']}: FID {entry['fid']:.3f} ({entry['fid_over_floor']:.2f} x floor)  "
              f"IS {entry['is_mean']:.3f}  P {entry['precision']:.3f}  R {entry['recall']:.3f}"
              + "".join(f"  {e} FID {m['fid']:.3f} IS {m['is_mean']:.3f}" for e, m in scores.items()))
    results["floor"] = scorer.floor
    results["protocol"] = {"name": protocol, "key": protocol_key(protocol, n), "extractor": "classifier",
                           "extractors": list(scorer.extractors), "inception": status,
                           "reference_split": REFERENCE_SPLIT[protocol], "floor_split": FLOOR_SPLIT[protocol],
                           "kid_prc_subset": subset(protocol), "num_generated": n, "seed": p.seed,
                           **scorer.settings(), "dataset": info["dataset"], "data_hash": info["content_hash"],
                           "samplers": samplers}
    return results, rows


def sample_sets(folders: list[Path]):
    """(folder, index row, {"images", "labels"}) of each sample set the folders' index.json files list, in order."""
    for folder in folders:
        for s in json.loads((folder / "index.json").read_text()):
            yield folder, s, safe_load(folder / f"{s['tag']}.pt", ("images", "labels"))


def model_hashes(folders: list[Path]) -> dict[str, str | None]:
    """Per model, the hash of the model file that its samples were drawn from (None where they do not say)."""
    index = [s for folder in folders for s in json.loads((folder / "index.json").read_text())]
    return {s["variant"]: s.get("model_hash") for s in index}


if __name__ == "__main__":
    run(main)
