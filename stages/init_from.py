"""init-from: copy the model that each model's train_<variant>.init_from names (a model file, an export folder
or an MLflow model URI) into OUT/<variant>/, beside source.json saying where it came from (an alias: which
version); with init_from null, only source.json (stages/pipeline/finetune.py).

usage: python -m stages.init_from --out DIR --trained DIR
DVC runs this stage at every `dvc repro` (always_changed: a registry alias moves and a file changes without
params.yaml changing); what it writes changes only when the model it copies does, so a train stage reruns
exactly then. --trained: the models this pipeline trains, which no init_from may name.
"""

from ddpm.sources import is_model_uri

from .pipeline.finetune import fetch
from .pipeline.io import atomic_dir
from .pipeline.params import VARIANTS, load_params
from .pipeline.run import check_writable, path_parser, run


def main(argv: list[str]) -> None:
    a = path_parser("--out", "--trained").parse_args(argv)
    p = load_params()
    check_writable(a.out)
    sources = {variant: getattr(p, f"train_{variant}").init_from for variant in VARIANTS}
    uri = None
    if any(is_model_uri(s) for s in sources.values()):
        from .pipeline.tracking import tracking_uri  # MLflow only for a URI

        uri = tracking_uri()
    for variant, init_from in sources.items():
        with atomic_dir(a.out / variant) as tmp:
            source = fetch(init_from, tmp, f"train_{variant}.init_from", a.trained, uri)
        if init_from is not None:
            print(f"train@{variant} starts from {source['resolved']} (weights {source['model_hash'][:12]})")


if __name__ == "__main__":
    run(main)
