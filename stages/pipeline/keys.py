"""Dotted keys of params.yaml ("train.lr"): the one way the project flattens its nested sections to them,
sets one, and reads `key=value` overrides as `dvc exp run -S` does (the value parsed as YAML)."""

from collections.abc import MutableMapping

import yaml

from .params import ParamsError


def flatten(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, f"{key}.") if isinstance(v, dict) else {key: v})
    return out


def set_key(tree: MutableMapping, key: str, value) -> None:
    """tree["train"]["lr"] = value for key "train.lr", adding the sections on the way that are missing;
    a value on the way that is not a section is refused in one line."""
    *parents, last = key.split(".")
    node = tree
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, MutableMapping):
            raise ParamsError(f"{key}: {'.'.join(parents[:i + 1])} is a value, not a section")
    node[last] = value


def apply_overrides(tree: MutableMapping, overrides: list[str]) -> MutableMapping:
    """`tree` with each "key=value" of `overrides` set, the value read as YAML ("[1, 2]" a list, "null" None),
    as `dvc exp run -S key=value` reads it; returns `tree`, changed in place."""
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key.lstrip("+"):
            raise ParamsError(f"-S {item}: expected KEY=VALUE, e.g. train.lr=1e-3")
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ParamsError(f"-S {item}: {value!r} is not valid YAML") from None
        set_key(tree, key.lstrip("+"), value)  # +key: DVC's way to add a key params.yaml lacks
    return tree
