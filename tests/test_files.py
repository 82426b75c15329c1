"""Files written whole or not at all, and a full disk as one error naming the file, whoever writes it: the
writers really write to a full device (/dev/full, which answers every write with ENOSPC) or to a disk that
fills up part-way, and report it in their own ways (torch wraps it in a RuntimeError, safetensors in its own
error)."""

import errno
import io
import json
import os
from pathlib import Path

import matplotlib
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError

from ddpm import atomic_save, save_model
from ddpm.cli import main as ddpm_main
from ddpm.diffusion import DiffusionConfig
from ddpm.export import write_export
from ddpm.files import atomic_dir, atomic_write, disk_full
from ddpm.unet import UNet, UNetConfig
from stages.pipeline.io import save_figure, save_grid, staged_files, write_json
from stages.pipeline.run import run

matplotlib.use("Agg")
pytestmark = pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full to write to")
UNET = UNetConfig(image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(),
                  num_heads=1)


def full_disk_at(path: Path) -> None:
    """Have `atomic_write(path)` write to a full device: its temporary is made a link to /dev/full."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}").symlink_to("/dev/full")


def figure():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot(range(1000))
    return fig


WRITERS = {  # what the stages and the library write, each by its own means
    "checkpoint.pt": lambda path: atomic_save({"w": torch.zeros(10_000)}, path),
    "metrics.json": lambda path: write_json(path, {"fid": list(range(10_000))}),
    "samples.png": lambda path: save_grid(torch.randint(0, 255, (64, 1, 28, 28), dtype=torch.uint8), path),
    "loss.png": lambda path: save_figure(figure(), path),
}


@pytest.mark.parametrize("name", WRITERS)
def test_a_full_disk_is_one_error_naming_the_file_and_keeps_the_previous_one(tmp_path, name):
    path = tmp_path / "out" / name
    with atomic_write(path) as tmp:
        tmp.write_bytes(b"the previous version")
    full_disk_at(path)
    with pytest.raises(OSError) as error:
        WRITERS[name](path)
    assert (error.value.errno, error.value.filename) == (errno.ENOSPC, str(path))
    assert str(error.value) == f"[Errno {errno.ENOSPC}] No space left on device: '{path}'"
    assert path.read_bytes() == b"the previous version"
    assert [p.name for p in path.parent.iterdir()] == [name], "a temporary was left behind"


class FillingDisk(io.FileIO):
    """A file on a disk with 1,000 bytes free: the write that would pass them fails with ENOSPC."""

    def __init__(self, path, mode="wb"):
        super().__init__(path, "w")
        self.free = 1000

    def write(self, data):
        if len(data) > self.free:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.free -= len(data)
        return super().write(data)


def test_a_disk_filling_up_mid_checkpoint_is_torchs_runtime_error_named_as_a_full_disk(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError) as wrapped:  # what torch makes of it
        torch.save({"w": torch.zeros(10_000)}, FillingDisk(tmp_path / "raw.pt"))
    assert "No space left" not in str(wrapped.value)
    assert disk_full(wrapped.value).errno == errno.ENOSPC

    monkeypatch.setattr("ddpm.checkpoint.open", FillingDisk, raising=False)  # atomic_save's file
    with pytest.raises(OSError) as error:
        atomic_save({"w": torch.zeros(10_000)}, tmp_path / "ck" / "last.pt")
    assert (error.value.errno, error.value.filename) == (errno.ENOSPC, str(tmp_path / "ck" / "last.pt"))
    assert not list((tmp_path / "ck").iterdir())


def test_a_full_disk_under_an_export_is_one_error_naming_its_weights(tmp_path, monkeypatch):
    """safetensors writes through a temporary of its own (so not to /dev/full); on a full tmpfs it raises
    SafetensorError with these words."""
    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    save_model(tmp_path / "model.pt", UNet(UNET), UNET, DiffusionConfig(timesteps=10))
    monkeypatch.setattr("ddpm.checkpoint.save_file", full)
    with pytest.raises(OSError) as error:
        write_export(tmp_path / "model.pt", tmp_path / "export", Image.new("L", (8, 8)), "", None, None)
    assert (error.value.errno, error.value.filename) == (errno.ENOSPC, str(tmp_path / "export" / "model.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_a_full_disk_in_a_staged_folder_names_the_output_and_leaves_nothing(tmp_path):
    out, metrics = tmp_path / "models" / "uncond", tmp_path / "metrics" / "train.json"
    with pytest.raises(OSError) as error, staged_files([out, metrics], ".train") as tmp:
        write_json(tmp[metrics], {"loss": 0.1})
        with atomic_dir(tmp[out]) as folder:
            full_disk_at(folder / "model.pt")
            atomic_save({"w": torch.zeros(10_000)}, folder / "model.pt")
    assert (error.value.errno, error.value.filename) == (errno.ENOSPC, str(out / "model.pt"))
    assert [p for p in tmp_path.rglob("*") if p.is_file() or p.is_symlink()] == []


def test_a_stage_on_a_full_disk_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "metrics" / "eval.json"

    def main(argv):
        full_disk_at(path)
        write_json(path, {"fid": 1.0})
    monkeypatch.setattr("sys.argv", ["stage"])
    with pytest.raises(SystemExit) as code:
        run(main)
    lines = capsys.readouterr().err.splitlines()
    assert code.value.code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: No space left on device writing {path}; free some space and rerun")


def test_the_ddpm_command_on_a_full_disk_says_so_in_one_line(tmp_path, capsys):
    out = tmp_path / "schedule.png"
    full_disk_at(out)
    assert ddpm_main(["schedule", "--timesteps", "50", "--out", str(out)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: No space left on device writing {out}; free some space and rerun"]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_a_folder_whole_and_a_failure_leaves_the_previous_one(tmp_path):
    out = tmp_path / "a" / "b"
    with atomic_dir(out) as tmp:
        (tmp / "x.json").write_text(json.dumps(1))
    with pytest.raises(ValueError), atomic_dir(out) as tmp:
        (tmp / "y.json").write_text(json.dumps(2))
        raise ValueError("failed half-way")
    assert [p.name for p in out.iterdir()] == ["x.json"]
    (out.parent / f".b.tmp{os.getpid() + 1}").mkdir()  # what a killed run left
    with atomic_dir(out) as tmp:
        (tmp / "y.json").write_text(json.dumps(2))
    assert [p.name for p in out.iterdir()] == ["y.json"] and [p.name for p in out.parent.iterdir()] == ["b"]
