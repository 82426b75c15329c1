"""Profiles: named sets of values for the keys that size and tune a run (profiles.yaml), written into
params.yaml by the profile stage, so that params.yaml always holds every value in force.

Switching from one profile to another replaces only the values that are the previous profile's: any
other value (a hand edit, a `-S` override) is kept, and reported. The previous profile is the one whose
values params.yaml holds most of; there is no other state to go stale.
"""

from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedSeq

from ddpm.files import atomic_write

from .params import ParamsError
from .tracking import flatten


def _same(a, b) -> bool:
    """YAML values equal as params.yaml reads them ("2e-3" is the number 2e-3, a list equals a tuple)."""
    def norm(v):
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                return v
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v
    return norm(a) == norm(b)


def read_profiles(path: str | Path = "profiles.yaml") -> dict[str, dict]:
    """profiles.yaml as {name: {"section.key": value}}; every profile sets the same keys."""
    profiles = {name: flatten(values or {}) for name, values in (YAML(typ="safe").load(Path(path)) or {}).items()}
    keys = {name: set(values) for name, values in profiles.items()}
    first = next(iter(profiles))
    for name, k in keys.items():
        if k != keys[first]:
            odd = sorted(k ^ keys[first])
            raise ParamsError(f"{path}: profile {name!r} and profile {first!r} differ in the keys they set: {odd[0]}")
    return profiles


def apply_profile(params: dict, profiles: dict[str, dict], name: str) -> tuple[dict, dict]:
    """Write profile `name`'s values into `params` (params.yaml's mapping, changed in place); returns
    ({key: value} set, {key: value} kept because it is not the previous profile's)."""
    if name not in profiles:
        raise ParamsError(f"params.yaml: profile = {name!r} is not a profile; valid: {', '.join(profiles)}")
    current = flatten(params)
    missing = [k for k in profiles[name] if k not in current]
    if missing:
        raise ParamsError(f"profiles.yaml: {name}.{missing[0]} is not a key of params.yaml")
    previous = max(profiles, key=lambda q: sum(_same(current[k], v) for k, v in profiles[q].items()))
    changed, kept = {}, {}
    for key, value in profiles[name].items():
        if not _same(current[key], profiles[previous][key]):
            kept[key] = current[key]
        elif not _same(current[key], value):
            *parents, last = key.split(".")
            node = params
            for part in parents:
                node = node[part]
            node[last] = value
            changed[key] = value
    return changed, kept


def _flow(value):
    """Lists as params.yaml writes them: [a, b] on one line."""
    if not isinstance(value, list):
        return value
    seq = CommentedSeq(value)
    seq.fa.set_flow_style()
    return seq


def rewrite_params(path: str | Path, name: str, profiles_path: str | Path = "profiles.yaml") -> tuple[dict, dict]:
    """apply_profile on the params file at `path`, keeping its comments and layout."""
    yaml = YAML()
    yaml.width = 120
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    params = yaml.load(Path(path))
    profiles = {q: {k: _flow(v) for k, v in values.items()} for q, values in read_profiles(profiles_path).items()}
    changed, kept = apply_profile(params, profiles, name)
    if changed:
        with atomic_write(path) as tmp, open(tmp, "w") as f:
            yaml.dump(params, f)
    return changed, kept
