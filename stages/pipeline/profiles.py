"""Profiles: named sets of values for the keys that size and tune a run (profiles.yaml), written into
params.yaml by the profile stage, so that params.yaml always holds every value in force.

The stage records what it did (data/profile.json, committed with params.yaml): the profile it applied,
every value it left for the keys profiles set, and which of those were yours. A switch then knows yours
without guessing: a value is yours if it differs from what the stage last wrote (a hand edit, a `-S`),
if `-S` set it on the same command, or if it was yours the last time; set back to the value the profile in
force gives it, it follows the profiles again. Every other value becomes the new profile's. Without a
record (a repository that never ran the stage), the values last written are taken to be those of the
profile that the committed params.yaml names.

params.yaml is rewritten in its own layout (lists on one line, comments after their values) whatever
layout another tool (`dvc exp run -S`) left, checked by reading it back, and replaced in one rename.
"""

import io
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml as pyyaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

from .io import write_text
from .keys import flatten, set_key
from .params import ParamsError

_MISSING = object()


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


def check_name(name, profiles: dict[str, dict]) -> str:
    """`name` if it names a profile; else one line listing the valid ones (a list or a number too)."""
    if not isinstance(name, str) or name not in profiles:
        raise ParamsError(f"params.yaml: profile = {name!r} is not a profile; valid: {', '.join(profiles)}")
    return name


def unrecorded(profiles: dict[str, dict], name: str) -> dict:
    """The record to assume when there is none: profile `name`'s values written, none of them yours."""
    return {"profile": name, "values": dict(profiles[name]), "yours": {}}


def read_record(path: str | Path, profiles: dict[str, dict]) -> dict | None:
    """The profile stage's record at `path` ({"profile", "values", "yours"}), or None if there is none.
    A record of the earlier form ({"profile", "kept"}) reads as that profile's values plus those kept."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        name, yours = record["profile"], record.get("yours", record.get("kept"))
        values = record.get("values", {**profiles.get(name, {}), **(yours or {})})
        if not (isinstance(name, str) and isinstance(values, dict) and isinstance(yours, dict)):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise ParamsError(f"{path}: not a record of the profile stage; delete it to take the values in "
                          "params.yaml as those of the profile the committed params.yaml names") from None
    return {"profile": name, "values": values, "yours": yours}


def committed_profile(path: str | Path, profiles: dict[str, dict], current: dict) -> str:
    """The profile that the params file at `path` names in git's HEAD; without one, the profile whose values
    `current` (its flat params) holds most of."""
    path = Path(path).resolve()
    proc = subprocess.run(["git", "show", f"HEAD:./{path.name}"], cwd=path.parent, capture_output=True, text=True)
    try:
        name = (pyyaml.safe_load(proc.stdout) or {}).get("profile") if proc.returncode == 0 else None
    except (pyyaml.YAMLError, AttributeError):
        name = None
    if isinstance(name, str) and name in profiles:
        return name
    return max(profiles, key=lambda q: sum(_same(current.get(k, _MISSING), v) for k, v in profiles[q].items()))


@dataclass(frozen=True)
class Switch:
    """A profile applied after `previous`: the values set, the values of yours kept, and the record to keep."""
    previous: str
    set: dict
    yours: dict
    record: dict


def switch(current: dict, profiles: dict[str, dict], name: str, last: dict, overridden=frozenset()) -> Switch:
    """Profile `name` applied to `current` (flat params.yaml), given the `last` record and the keys that `-S`
    set on this command (`overridden`): see the module docstring for which values are yours."""
    check_name(name, profiles)
    missing = [k for k in profiles[name] if k not in current]
    if missing:
        raise ParamsError(f"profiles.yaml: {name}.{missing[0]} is not a key of params.yaml")
    in_force = profiles.get(last["profile"], {})
    changed, yours, values = {}, {}, {}
    for key, value in profiles[name].items():
        now, wrote = current[key], last["values"].get(key, _MISSING)
        edited = wrote is not _MISSING and not _same(now, wrote)
        given_back = edited and _same(now, in_force.get(key, _MISSING))
        if key in overridden or (edited and not given_back) or (not edited and key in last["yours"]):
            yours[key] = values[key] = now
        else:
            values[key] = value
            if not _same(now, value):
                changed[key] = value
    return Switch(last["profile"], changed, yours, {"profile": name, "values": values, "yours": yours})


def _flow(value):
    """A list as params.yaml writes it: [a, b] on one line."""
    seq = CommentedSeq(value)
    seq.fa.set_flow_style()
    return seq


def _restyle(node: CommentedMap) -> None:
    """params.yaml's own layout, whatever another tool left: lists of plain values on one line, with the
    comment that headed a block list after the value (where ruamel would join the next line to it) and the
    blank lines and comments that followed the list kept after it."""
    for key, value in node.items():
        if isinstance(value, CommentedMap):
            _restyle(value)
        elif isinstance(value, list) and not any(isinstance(v, (list, dict)) for v in value):
            node[key] = _flow(value)
            slots = node.ca.items.setdefault(key, [None, None, None, None])
            if slots[2] is None and isinstance(value, CommentedSeq) and value.ca.comment:
                slots[2] = value.ca.comment[0]
            slots[3] = None
            last = value.ca.items.get(len(value) - 1) if isinstance(value, CommentedSeq) else None
            follow = last[0].value.partition("\n")[2] if last and last[0] else ""
            if follow and slots[2] is not None:
                slots[2].value += follow
            elif follow:
                last[0].value, slots[2] = "\n" + follow, last[0]


def _dump(tree) -> str:
    yaml = YAML()
    yaml.width = 120
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    out = io.StringIO()
    yaml.dump(tree, out)
    return out.getvalue()


def _plain(node):
    """The tree as plain Python values (ruamel's commented and styled types stripped)."""
    if isinstance(node, dict):
        return {_plain(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    for kind in (bool, int, float, str):
        if isinstance(node, kind):
            return kind(node)
    return node


def _reads_back(text: str, expected: dict) -> bool:
    """Whether `text` holds exactly `expected`, as DVC (YAML 1.2) reads it, and the stages (PyYAML) can read it."""
    try:
        pyyaml.safe_load(text)
        return YAML(typ="safe").load(text) == expected
    except (YAMLError, pyyaml.YAMLError):
        return False


def render(tree: CommentedMap) -> tuple[str, bool]:
    """params.yaml's text for `tree` and whether its comments were kept: with them when that text reads back
    as the tree's values, else without (the values are what matter)."""
    expected = _plain(tree)
    text = _dump(tree)
    if _reads_back(text, expected):
        return text, True
    bare = YAML().load(_dump(expected))  # the values alone
    _restyle(bare)
    text = _dump(bare)
    if not _reads_back(text, expected):
        raise ParamsError("params.yaml: its values could not be written back as YAML that reads the same; "
                          "the file was left as it was")
    return text, False


def load_tree(path: str | Path) -> CommentedMap:
    """params.yaml with its comments and layout; one line if it is not a YAML mapping."""
    try:
        tree = YAML().load(Path(path))
    except YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(tree, CommentedMap):
        raise ParamsError(f"{path}: not a mapping of sections")
    return tree


def rewrite_params(path: str | Path, profiles: dict[str, dict], last: dict | None,
                   overridden=frozenset()) -> tuple[Switch, bool]:
    """Apply the profile that params.yaml at `path` names (`switch`), given the `last` record (None: none
    kept) and the keys `-S` set on this command; params.yaml is written whole or not at all. Returns the
    switch and whether the file's comments were kept."""
    tree = load_tree(path)
    if "profile" not in tree:
        raise ParamsError(f"{path}: missing key 'profile' ({', '.join(profiles)}: see profiles.yaml)")
    name = check_name(tree["profile"], profiles)
    current = flatten(_plain(tree))
    last = last or unrecorded(profiles, committed_profile(path, profiles, current))
    result = switch(current, profiles, name, last, overridden)
    _restyle(tree)
    for key, value in result.set.items():
        set_key(tree, key, _flow(value) if isinstance(value, list) else value)
    text, kept_comments = render(tree)
    if text != Path(path).read_text():
        write_text(path, text)
    return result, kept_comments
