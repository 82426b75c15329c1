"""profile: write the values of params.yaml's `profile` (profiles.yaml) into params.yaml.

usage: python -m stages.profile OUT
The first stage: `dvc exp run -S profile=gpu`, or `profile: gpu` typed into params.yaml and then `dvc
repro`, runs it, and DVC then reruns exactly the stages whose values changed. A value that is not the
previous profile's (a hand edit or a -S override) is kept and reported (stages/pipeline/profiles.py).
OUT records the profile and the values kept.
"""

import yaml

from .pipeline.io import write_json
from .pipeline.params import ParamsError
from .pipeline.profiles import rewrite_params
from .pipeline.run import run


def main(argv: list[str]) -> None:
    (out,) = argv
    try:
        name = (yaml.safe_load(open("params.yaml")) or {})["profile"]
    except KeyError:
        raise ParamsError("params.yaml: missing key 'profile' (laptop, gpu, paper: see profiles.yaml)") from None
    changed, kept = rewrite_params("params.yaml", name)
    print(f"profile {name}: {len(changed)} values set in params.yaml, {len(kept)} of yours kept")
    for key, value in kept.items():
        print(f"  kept {key} = {value!r}")
    write_json(out, {"profile": name, "kept": {k: v for k, v in kept.items()}})


if __name__ == "__main__":
    run(main)
