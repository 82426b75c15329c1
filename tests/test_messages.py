"""Advice that works: every params.yaml key that the project's messages name exists. The dotted `section.key`
words in its strings (errors, warnings, help texts and the modules' usage docstrings) are checked against
params.yaml's schema, the dataclasses of stages.pipeline.params."""

import ast
import dataclasses
import re
import typing
from pathlib import Path

from stages.pipeline.params import RENAMED, Params

ROOT = Path(__file__).resolve().parents[1]
HINTS = typing.get_type_hints(Params)
SCHEMA = {f.name: {g.name for g in dataclasses.fields(HINTS[f.name])}
          for f in dataclasses.fields(Params) if dataclasses.is_dataclass(HINTS[f.name])}
FILE_SUFFIXES = {"pt", "safetensors", "json", "csv", "png", "yaml", "py", "txt"}  # model.pt is a file, not a key
# `section.key`, not inside a path (models/cond/model.pt) or a longer dotted name (ddpm.sampling.generate)
NAME = re.compile(rf"(?<![\w./-])({'|'.join(sorted(SCHEMA, key=len, reverse=True))})\.([a-z_][a-z0-9_]*)")


def unknown_params(text: str) -> list[str]:
    """The `section.key` words of `text` that params.yaml's schema does not know."""
    return [m.group(0) for m in NAME.finditer(text)
            if m.group(2) not in SCHEMA[m.group(1)] and m.group(2) not in FILE_SUFFIXES]


def messages(path: Path):
    """(line, text) of each string a user may read in module `path`: every string literal but the docstrings
    of functions and classes (which describe code), and not the old names that the params check explains
    (RENAMED's keys)."""
    tree = ast.parse(path.read_text())
    code_docs = {id(node.body[0].value) for node in ast.walk(tree)
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body
                 and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in code_docs
                and node.value not in RENAMED):
            yield node.lineno, node.value


def test_every_param_a_message_names_exists():
    files = sorted(p for folder in ("ddpm", "stages", "benchmarks") for p in (ROOT / folder).rglob("*.py"))
    stale = [f"{path.relative_to(ROOT)}:{line}: {name}" for path in files for line, text in messages(path)
             for name in unknown_params(text)]
    assert not stale, "messages name params that params.yaml does not have:\n" + "\n".join(stale)


def test_the_check_finds_a_renamed_key_and_leaves_files_and_code_alone():
    assert unknown_params("--autoguidance needs the guide model; train with train.guide_at > 0") == ["train.guide_at"]
    assert unknown_params("set sample.etaa or model.dropout_rate") == ["sample.etaa", "model.dropout_rate"]
    assert unknown_params("models/cond/model.pt, model.safetensors, train_uncond.guide_at, sample.eta, "
                          "ddpm.sampling.generate, data.classes") == []
