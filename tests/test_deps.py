"""dvc.yaml's code deps are the files each stage's module runs (stages.pipeline.deps), so that a code change
reruns exactly the stages it can affect, and the train stage's checkpoint hash covers the same files."""

import json
import shutil
from pathlib import Path

import pytest
from helpers import run

from stages.pipeline.deps import NO_RERUN, Module, code_deps, mismatches, stage_modules
from stages.pipeline.resume import source_hash

ROOT = Path(__file__).resolve().parents[1]


def test_every_stage_lists_exactly_the_code_it_runs():
    problems = mismatches(ROOT)
    assert not problems, "\n".join(problems) + "\n(`python -m stages.pipeline.deps` prints each stage's code deps)"


@pytest.fixture
def project(tmp_path) -> Path:
    """A copy of the project's code and dvc.yaml, to edit."""
    for name in ("ddpm", "stages"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    return tmp_path


def test_a_stage_script_that_gains_an_import_fails_the_check_naming_the_stage_and_files(project):
    assert mismatches(project) == []
    script = project / "stages/prepare.py"
    script.write_text(script.read_text() + "\nfrom ddpm import make_unet\n\nmake_unet\n")
    (problem,) = mismatches(project)
    assert problem.startswith("dvc.yaml stage prepare (stages.prepare) lacks deps ddpm/networks.py (used by "
                              "stages.prepare), ddpm/unet_mp.py (used by ddpm.networks.make_unet)"), problem


def test_a_listed_file_that_the_stage_does_not_run_fails_the_check(project):
    dvc = project / "dvc.yaml"
    dvc.write_text(dvc.read_text().replace("      - stages/prepare.py\n", "      - stages/prepare.py\n"
                                           "      - ddpm/ema.py\n", 1))
    assert mismatches(project) == ["dvc.yaml stage prepare (stages.prepare) lists deps ['ddpm/ema.py'] that its "
                                   "code does not import"]


def test_names_resolve_through_the_package_to_the_module_that_defines_them():
    train, prepare = code_deps("stages.train"), code_deps("stages.prepare")
    # `from ddpm import make_unet` is ddpm/networks.py, which builds the magnitude-preserving network
    assert {"ddpm/networks.py", "ddpm/unet_mp.py", "stages/pipeline/resume.py"} <= train
    # prepare writes with ddpm/checkpoint.py's atomic_save but never builds a network
    assert "ddpm/checkpoint.py" in prepare and "ddpm/unet_mp.py" not in prepare
    # the re-export tables and what NO_RERUN allows are nobody's deps
    assert not {"ddpm/__init__.py", "stages/pipeline/tracking.py", "ddpm/pictures.py"} & (train | prepare)
    assert "ddpm/pictures.py" in code_deps("stages.visualize")
    assert "stages/pipeline/bounds.py" in code_deps("stages.check")


def test_each_no_rerun_entry_names_a_file_or_definition_and_stages_that_exist():
    modules = set(stage_modules(ROOT).values())
    for entry, stages in NO_RERUN.items():
        path, _, name = entry.partition(":")
        assert (ROOT / path).is_file(), entry
        if name:
            assert name in Module(path.removesuffix(".py").replace("/", "."), ROOT / path, ROOT).defs, entry
        assert set(stages) <= modules, entry


def test_the_checkpoint_hash_follows_the_train_stage_code_and_not_its_figures(project):
    before = source_hash(root=project)
    (project / "ddpm/pictures.py").write_text((project / "ddpm/pictures.py").read_text() + "\n# a figure tweak\n")
    assert source_hash(root=project) == before
    (project / "ddpm/unet_mp.py").write_text((project / "ddpm/unet_mp.py").read_text() + "\n# a layer tweak\n")
    assert source_hash(root=project) != before


@pytest.mark.slow
def test_editing_the_magnitude_preserving_network_reruns_the_stages_that_build_it(tiny_repo):
    repo, _ = tiny_repo
    path = repo / "ddpm/unet_mp.py"
    original = path.read_text()
    try:
        path.write_text(original + "\n# an edit\n")
        status = json.loads(run(["dvc", "status", "--json"], repo).stdout)
    finally:
        path.write_text(original)
    samples = {f"sample-{m}@{v}" for m in ("ddpm", "ddim", "dpmsolver") for v in ("uncond", "cond")}
    # and the check stage, whose size bounds count the network's parameters (built on the meta device), and
    # init-from, which loads the model a train stage starts from (and is always changed: it looks at its source)
    assert set(status) == {"check", "init-from", "train@uncond", "train@cond", "visualize"} | samples, status
