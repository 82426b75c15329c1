"""evaluate: score every sample set against the prepared test split with FID, IS and KID
(torch-fidelity, the domain classifier as feature extractor) and, for the conditional model,
the classifier's accuracy on the requested classes.

usage: python -m stages.evaluate --data DIR --classifier FILE --metrics FILE --plot CSV --figure PNG SAMPLE_DIR...
"""

import argparse
import json
from pathlib import Path

from ddpm import load_classifier, resolve_device, safe_load
from ddpm.metrics import conditional_accuracy, evaluate_samples
from ddpm.plots import fid_vs_steps

from .common import (
    load_prepared,
    run,
    save_figure,
    seed_everything,
    write_json,
    write_text,
)
from .params import load_params


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    for name in ("--data", "--classifier", "--metrics", "--plot"):
        ap.add_argument(name, type=Path, required=True)
    ap.add_argument("--figure", type=Path, required=True)
    ap.add_argument("samples", type=Path, nargs="+")
    a = ap.parse_args(argv)
    p = load_params()
    seed_everything(p.seed)
    device = resolve_device(p.device)
    classifier = load_classifier(a.classifier, device)
    reference, _, info = load_prepared(a.data, "test")
    results, rows = {}, []
    for folder in a.samples:
        for s in json.loads((folder / "index.json").read_text()):
            data = safe_load(folder / f"{s['tag']}.pt", ("images", "labels"))
            scores = evaluate_samples(data["images"], reference, classifier, device=device,
                                      batch_size=p.evaluate.batch_size, seed=p.seed)
            if len(data["labels"]):
                overall, per_class = conditional_accuracy(classifier, data["images"], data["labels"], device=device)
                scores["cond_accuracy"] = overall
                scores["cond_accuracy_per_class"] = dict(zip(info["class_names"], per_class))
            results.setdefault(s["variant"], {})[s["tag"]] = scores
            rows.append({k: s[k] for k in ("variant", "method", "steps", "eta", "guidance")} | {"fid": scores["fid"]})
            print(f"{s['variant']} {s['tag']}: FID {scores['fid']:.3f}  IS {scores['is_mean']:.3f}")
    results["protocol"] = {"extractor": "domain classifier", "reference_split": "test",
                           "num_real": len(reference), "num_generated": p.sample.num_samples, "seed": p.seed,
                           "dataset": info["dataset"], "data_hash": info["content_hash"]}
    write_json(a.metrics, results)
    write_text(a.plot, "variant,method,steps,eta,guidance,fid\n" + "".join(
        f"{r['variant']},{r['method']},{r['steps']},{r['eta']},{r['guidance']},{r['fid']:.5f}\n" for r in rows))
    save_figure(fid_vs_steps(rows), a.figure)


if __name__ == "__main__":
    run(main)
