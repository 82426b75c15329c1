"""`ddpm export`: a model file as a folder to share (`write_export`), with a model card (`model_card`, built from
the folder's config.json and, when given, the params that trained the model and the evaluate stage's eval.json)
that opens with the YAML front matter model hubs read (`front_matter`: license, tags, datasets, and the scores in
Hugging Face's model-index form)."""

import json
from pathlib import Path

from PIL import Image

from .checkpoint import EXPORT_CONFIG, export_model
from .files import atomic_dir


class ExportError(ValueError):
    """An --out folder or a --params/--metrics file that `ddpm export` cannot use."""

# the datasets' ids on the Hugging Face Hub, for the card's `datasets`; others go by their own name
HUB_DATASETS = {"mnist": "ylecun/mnist", "fashion_mnist": "zalando-datasets/fashion_mnist",
                "cifar10": "uoft-cs/cifar10"}
FILES = {"model.safetensors": "the UNet's EMA weights (safetensors: tensors only, nothing runs when loaded)",
         "config.json": "UNet and diffusion configs, class names, training meta, the guide model",
         "samples.png": "a sample grid drawn by `ddpm export` (see below)"}


def model_card(folder: str, config: dict, sample_note: str, params: dict | None = None,
               scores: dict | None = None, license: str = "unknown") -> str:
    """Markdown: the front matter (`front_matter`), what the model is, its files, how to sample it (from
    `folder`), its configs, the params that trained it (`params`, as the caller picks them: data.name names the
    dataset) and the FID/floor table of its variant (`scores`: the evaluate stage's eval.json)."""
    meta, unet, guide = config["meta"], config["unet"], config.get("guide")
    variant, conditional = meta.get("variant", "?"), bool(unet.get("num_classes"))
    dataset = (params or {}).get("data", {}).get("name") or (scores or {}).get("protocol", {}).get("dataset")
    about = [f"A {'class-conditional' if conditional else 'unconditional'} DDPM (Ho et al. 2020), the {variant} "
             f"model of this project, trained on {dataset or 'data not recorded here (export with --params)'}"]
    if config.get("class_names"):
        about.append(f"{'classes' if conditional else 'data classes'}: {', '.join(map(str, config['class_names']))}")
    if meta.get("steps") is not None:
        about.append(f"{meta['steps']} training steps, EMA weights")
    files = dict(FILES)
    if guide:
        files[guide["weights"]] = "the guide model for autoguidance: the EMA weights " + (
            f"at step {guide['steps']}" if guide.get("steps") is not None else "of an earlier step")
    flag = " --autoguidance 1" if guide else " --guidance 0.5" if conditional else ""
    lines = [front_matter(config, dataset, scores, license), f"# ddpm-{variant}", "", "; ".join(about) + ".", "",
             "## Files", "", "| file | what |", "| --- | --- |", *(f"| `{f}` | {what} |" for f, what in files.items()),
             "", "## Use", "", "With this project installed (`pip install -e .`):", "", "```",
             f"ddpm sample --model {folder}{flag} --out samples.png", "```", "",
             "or in Python: `model, diffusion, meta = ddpm.load_model(FOLDER)`, then `ddpm.generate`.", "",
             "## Model", "", "| | |", "| --- | --- |",
             *(f"| {k} | {json.dumps(v)} |" for k, v in {**unet, **config["diffusion"]}.items()), "",
             *training(params), *evaluation(scores, variant),
             "## Samples", "", sample_note, "", "![samples](samples.png)", ""]
    return "\n".join(lines)


def front_matter(config: dict, dataset: str | None, scores: dict | None, license: str) -> str:
    """The card's YAML header, as the Hugging Face Hub reads it: license, tags, datasets, pipeline_tag and, with
    `scores` (eval.json), model-index: the best sampler setting's FID, FID over the floor, IS and conditional
    accuracy on the test split (https://huggingface.co/docs/hub/model-cards#evaluation-results)."""
    import yaml

    variant, conditional = config["meta"].get("variant", "model"), bool(config["unet"].get("num_classes"))
    task = "image-generation" if conditional else "unconditional-image-generation"
    header = {"license": license, "library_name": "pytorch",
              "tags": ["diffusion", "ddpm", "class-conditional" if conditional else "unconditional", task,
                       "safetensors"]}
    if dataset:
        header["datasets"] = [HUB_DATASETS.get(dataset, dataset)]
    if not conditional:
        header["pipeline_tag"] = task
    best = min((scores or {}).get(variant, {}).items(), key=lambda item: item[1]["fid"], default=None)
    if best is not None:
        tag, entry = best
        names = {"fid": ("fid", f"FID (domain-classifier features; {tag})"),
                 "fid_over_floor": ("fid_over_floor", "FID over the real-data floor"),
                 "is_mean": ("inception_score", "IS (domain classifier)"),
                 "cond_accuracy": ("accuracy", "Accuracy on the class asked for")}
        metrics = [{"type": kind, "value": round(float(entry[k]), 4), "name": name}
                   for k, (kind, name) in names.items() if k in entry]
        header["model-index"] = [{"name": f"ddpm-{variant}", "results": [{
            "task": {"type": task, "name": "Class-conditional image generation" if conditional else
                     "Unconditional image generation"},
            "dataset": {"type": header.get("datasets", [dataset or "unknown"])[0], "name": dataset or "unknown",
                        "split": "test"},
            "metrics": metrics}]}]
    return "---\n" + yaml.safe_dump(header, sort_keys=False, width=110) + "---\n"


def training(params: dict | None) -> list[str]:
    """The card's training section: `params` as YAML."""
    import yaml

    if params is None:
        return ["## Training", "", "Params not given (`ddpm export --params params.yaml`).", ""]
    return ["## Training", "", "From the pipeline's params.yaml:", "", "```yaml",
            yaml.safe_dump(params, sort_keys=False, default_flow_style=None, width=110).strip(), "```", ""]


def evaluation(scores: dict | None, variant: str) -> list[str]:
    """The FID/floor table of every sampler setting of `variant`, best first."""
    if scores is None:
        return []
    if variant not in scores:
        return ["## Evaluation", "", f"The metrics given hold no {variant} model.", ""]
    floor, protocol = scores["floor"]["classifier"], scores.get("protocol", {})
    rows = sorted(scores[variant].items(), key=lambda item: item[1]["fid"])
    cell = lambda e, k: f"{e[k]:.3f}" if k in e else "–"
    return ["## Evaluation", "",
            f"FID on the domain classifier's features, {protocol.get('num_generated', '?')} samples against "
            f"{protocol.get('num_real', '?')} real test images; the floor is real train images scored the same way "
            f"(FID {floor['fid']:.3f}), so × floor near 1 is as good as the metric can tell.", "",
            "| setting | FID | × floor | IS | conditional accuracy |", "| --- | --- | --- | --- | --- |",
            *(f"| {tag} | {e['fid']:.3f} | {e['fid_over_floor']:.2f} | {cell(e, 'is_mean')} | "
              f"{cell(e, 'cond_accuracy')} |" for tag, e in rows),
            f"| floor (real train images) | {floor['fid']:.3f} | 1.00 | {cell(floor, 'is_mean')} | "
            f"{cell(floor, 'cond_accuracy')} |", ""]


def check_folder(path: Path) -> None:
    """An export goes to a new folder, an empty one or an earlier export (which it replaces)."""
    if path.is_file() or (path.is_dir() and any(path.iterdir()) and not (path / EXPORT_CONFIG).is_file()):
        raise ExportError(f"--out {path} exists and is not an export folder; give a new folder")


def read_inputs(params: Path | None, metrics: Path | None) -> tuple[dict | None, dict | None]:
    """params.yaml and eval.json as dicts (None where not given)."""
    import yaml

    out = []
    for path, load in ((params, yaml.safe_load), (metrics, json.loads)):
        try:
            out.append(None if path is None else load(path.read_text()))
        except OSError as e:
            raise ExportError(f"{path}: {e.strerror}") from None
        except (ValueError, yaml.YAMLError) as e:
            raise ExportError(f"{path}: cannot be read ({str(e).splitlines()[0]})") from None
        if out[-1] is not None and not isinstance(out[-1], dict):
            raise ExportError(f"{path}: not a mapping of names to values")
    return out[0], out[1]


def write_export(model_file: Path, out: Path, samples: Image.Image, sample_note: str, params: dict | None,
                 scores: dict | None, license: str = "unknown") -> None:
    """The folder `out`, written beside it and renamed into place when complete (`atomic_dir`); `params`,
    `scores` and `license` as `model_card` takes them."""
    with atomic_dir(out) as tmp:
        config = export_model(model_file, tmp)
        samples.save(tmp / "samples.png")
        (tmp / "README.md").write_text(model_card(str(out), config, sample_note, params, scores, license))
