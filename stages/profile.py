"""profile: write the values of params.yaml's `profile` (profiles.yaml) into params.yaml.

usage: python -m stages.profile OUT
The first stage: `dvc exp run -S profile=gpu`, or `profile: gpu` typed into params.yaml and then `dvc
repro`, runs it, and DVC then reruns exactly the stages whose values changed. Values of yours (by hand, or
by -S on the same command) are kept and reported (stages/pipeline/profiles.py). OUT records the profile
applied, every value it left for the keys profiles set, and which were yours: the next switch reads it.
"""

from .pipeline.io import write_json
from .pipeline.profiles import read_profiles, read_record, rewrite_params
from .pipeline.run import run
from .pipeline.workspace import set_by_command


def main(argv: list[str]) -> None:
    (out,) = argv
    profiles = read_profiles()
    last = read_record(out, profiles)
    switch, kept_comments = rewrite_params("params.yaml", profiles, last, set_by_command())
    name = switch.record["profile"]
    if last is None:
        print(f"no record in {out} yet: profile {switch.previous} taken as the one in force")
    print(f"profile {name}: {len(switch.set)} values set in params.yaml, {len(switch.yours)} of yours kept")
    for key, value in switch.yours.items():
        print(f"  kept {key} = {value!r}")
    if not kept_comments:
        print("params.yaml: its comments could not be kept in place and were left out (the values are all there)")
    write_json(out, switch.record)


if __name__ == "__main__":
    run(main)
