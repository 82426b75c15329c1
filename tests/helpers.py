"""Helpers for end-to-end tests: a tiny copy of the project in a temporary git + DVC repo."""

import contextlib
import http.server
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks.project import TINY, copy_project, merge  # noqa: F401 (TINY, merge: for the tests)

ROOT = Path(__file__).resolve().parents[1]

ALL_STAGES = {"profile", "check", "prepare", "classifier", "reference", "init-from", "train@uncond", "train@cond",
              "sample-ddpm@uncond", "sample-ddim@uncond", "sample-dpmsolver@uncond", "sample-ddpm@cond",
              "sample-ddim@cond", "sample-dpmsolver@cond", "evaluate", "visualize"}

def run(cmd: list[str] | str, cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command with the test interpreter's bin/ first on PATH, capturing its output."""
    full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, shell=isinstance(cmd, str))
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def stages_run(output: str) -> set[str]:
    """The names of the stages `dvc repro` / `dvc exp run` actually ran."""
    return set(re.findall(r"Running stage '([^']+)'", output))


def make_repo(path: Path, overrides: dict) -> Path:
    """A git + DVC repo at `path` holding the project with `overrides` merged into params.yaml."""
    return copy_project(path, overrides, {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
                                                              f"{os.environ['PATH']}"})


def make_image_folder(root: Path, per_class: int = 12, classes=("circle", "square")) -> Path:
    """A folder of RGB PNGs of odd sizes, one subfolder per class (none if `classes` is empty):
    a bright red disc or a bright blue square on a dark, noisy background."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    for k, name in enumerate(classes or ("",)):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = int(rng.integers(30, 70)), int(rng.integers(30, 70))
            img = Image.fromarray(rng.integers(0, 60, (h, w, 3), dtype=np.uint8))
            box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
            draw = ImageDraw.Draw(img)
            (draw.ellipse if k == 0 else draw.rectangle)(box, fill=(230, 40, 40) if k == 0 else (40, 40, 230))
            img.save(folder / f"{name or 'img'}_{i:03d}.png")
    return root


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` with a SQLite backend and an artifact root in `folder`, on a free port of 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
                             "--artifacts-destination", str(folder / "server-artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            return proc, uri
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                stop(proc)
                raise AssertionError("mlflow server did not start") from None
            time.sleep(0.5)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop the server and its workers (its process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    proc.wait(timeout=30)


class FileServer(http.server.ThreadingHTTPServer):
    """A real HTTP server on 127.0.0.1 serving `files` {"/name": bytes}; "/truncated-<name>" promises the whole
    file (its Content-Length) but sends half of it. `requests` lists the paths asked for."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests = files, []
        super().__init__(("127.0.0.1", 0), _FileHandler)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class _FileHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.requests.append(self.path)
        body = self.server.files.get(self.path.replace("/truncated-", "/"))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:len(body) // 2] if self.path.startswith("/truncated-") else body)

    def log_message(self, *args):
        pass
