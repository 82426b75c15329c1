"""The commands in README.md and benchmarks/RESULTS.md stay true: every `-S key=value` names a key of
params.yaml with a valid value, and every module or script they run exists."""

import importlib.util
import re
import shlex

import pytest
import yaml
from helpers import ROOT

from stages.pipeline.keys import apply_overrides, flatten
from stages.pipeline.params import validate

DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md"]


def commands(path) -> list[str]:
    """The shell commands in the ```bash blocks of a Markdown file, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


ALL = [(path.name, c) for path in DOCS for c in commands(path)]


def test_the_docs_have_commands():
    assert len(ALL) > 20


@pytest.mark.parametrize("doc, command", [(d, c) for d, c in ALL if " -S " in c])
def test_every_override_is_a_valid_param(doc, command):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    words = shlex.split(command)
    overrides = [words[i + 1] for i, w in enumerate(words) if w in ("-S", "--set")]
    for key in (item.partition("=")[0].lstrip("+") for item in overrides):
        assert key in flatten(params), f"{doc}: {command}: {key} is not a key of params.yaml"
    apply_overrides(params, overrides)  # as `dvc exp run -S` parses them
    if str(params["device"]).startswith("cuda"):  # a GPU machine's command; validation checks devices that exist
        params["device"] = "cpu"
    validate(params)


@pytest.mark.parametrize("doc, command", [(d, c) for d, c in ALL if "python" in c and ("-m " in c or ".py" in c)])
def test_every_module_and_script_exists(doc, command):
    words = shlex.split(command)
    if "-m" in words:
        module = words[words.index("-m") + 1]
        if module not in ("venv", "pytest"):
            assert importlib.util.find_spec(module) is not None, f"{doc}: {command}"
    for script in (w for w in words if w.endswith(".py")):
        assert (ROOT / script).is_file(), f"{doc}: {command}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_picture_a_doc_shows_exists_beside_it(doc):
    """Image links are relative to the Markdown file, as a repository browser resolves them."""
    text = doc.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)
    assert len(links) == text.count("!["), "an image's alt text holds a ']', which ends it early"
    assert links and not [link for link in links if not (doc.parent / link).is_file()]
