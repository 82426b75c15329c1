"""Dotted params keys (stages.pipeline.keys): set and flattened as params.yaml nests them, and `-S key=value`
overrides read as `dvc exp run -S` reads them, a bad one refused in one line."""

import pytest

from stages.pipeline.keys import apply_overrides, flatten, set_key
from stages.pipeline.params import ParamsError


def test_overrides_set_dotted_keys_as_dvc_reads_them():
    params = {"train": {"lr": 0.002}, "sample": {"eta": [0.0]}}
    apply_overrides(params, ["train.lr=1.0e-3", "sample.eta=[0.5, 1]", "+data.root=null"])
    assert params == {"train": {"lr": 0.001}, "sample": {"eta": [0.5, 1]}, "data": {"root": None}}
    set_key(params, "train.lr", 0.003)
    assert flatten(params) == {"train.lr": 0.003, "sample.eta": [0.5, 1], "data.root": None}


@pytest.mark.parametrize("override, message", [
    ("train.lr", "-S train.lr: expected KEY=VALUE, e.g. train.lr=1e-3"),
    ("=1", "-S =1: expected KEY=VALUE, e.g. train.lr=1e-3"),
    ("train.lr.max=1", "train.lr.max: train.lr is a value, not a section"),
    ("train.lr=[1", "-S train.lr=[1: '[1' is not valid YAML"),
])
def test_a_bad_override_is_one_line(override, message):
    with pytest.raises(ParamsError) as e:
        apply_overrides({"train": {"lr": 0.002}}, [override])
    assert str(e.value) == message
