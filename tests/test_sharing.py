"""README's "Sharing a model" works as written: its lines, run as they are (the remote and the repository's
address replaced by folders here), set up a DVC remote, push, tag, get the model with its guide into a fresh
folder from the remote alone, and sample it with autoguidance."""

import re
import shutil

import pytest
from helpers import ROOT, run

pytestmark = pytest.mark.slow
REMOTE, REPO = "/srv/dvc-storage", "https://github.com/you/ddpm-pipeline"  # what the README's lines name


def sharing_lines() -> tuple[list[str], list[str]]:
    """The lines of the section's bash block: those run in the project, and those from `cd` on."""
    section = (ROOT / "README.md").read_text().split("## Sharing a model", 1)[1]
    (block,) = re.findall(r"```bash\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
    lines = block.strip().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("cd "))
    return lines[:at], lines[at:]


def test_the_readme_shares_a_model_that_samples_with_autoguidance(tiny_repo, tmp_path):
    repo = tmp_path / "repo"  # a copy as committed: no remote of another test, no experiment in the workspace
    shutil.copytree(tiny_repo[0], repo, symlinks=True, ignore=shutil.ignore_patterns("config.local"))
    run("git reset -q --hard && dvc checkout -q --force train@uncond", repo)
    publish, fetch = ([line.replace(REMOTE, str(tmp_path / "remote")).replace(REPO, str(repo)) for line in lines]
                      for lines in sharing_lines())
    assert any(line.startswith("dvc push") for line in publish) and any("--autoguidance" in line for line in fetch)
    run(" && ".join(publish), repo)
    shutil.rmtree(repo / ".dvc/cache")  # elsewhere there is only the remote
    (tmp_path / "elsewhere").mkdir()
    run(" && ".join(fetch), tmp_path, env={"TMPDIR": str(tmp_path / "elsewhere"), "PYTHONPATH": str(repo)})
    (fresh,) = [d for d in (tmp_path / "elsewhere").iterdir() if d.is_dir()]  # mktemp -d's
    assert (fresh / "ddpm-uncond/model.pt").read_bytes() == (repo / "models/uncond/model.pt").read_bytes()
    assert (fresh / "ddpm-uncond/model-guide.pt").is_file() and (fresh / "samples.png").stat().st_size > 0
