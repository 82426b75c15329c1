"""One GPU's numbers for this project, measured unattended within --budget-s seconds.

Writes --out/gpu_check.md and gpu_check.json, rewritten after every measurement so that a run cut short
keeps what it measured, and stops itself before the budget is up:

1. the GPU's torch.mm rate in fp32, tf32, bf16 and fp16;
2. training images/s and achieved GFLOP/s (FLOPs counted by torch.utils.flop_counter) of the UNet of
   the gpu profile in each precision, compiled, and in channels-last memory format;
3. sampling images/s with DDIM and DPM-Solver++(2M) at 50 and 20 steps, unguided and with classifier-free
   guidance (two network evaluations per step);
4. the pipeline end to end: `dvc repro` of a copy of the project with the gpu profile on the MNIST test split
   (benchmarks.mnist_split), each stage's seconds (from `dvc repro`'s output as it runs) and each model and
   sampler's FID over its floor; a failing stage's error line instead where one fails.

--device cpu --tiny runs all of it at toy size in about a minute (rows that need CUDA say so), so that the
script keeps working between GPU runs.

    python -m benchmarks.gpu_check --out gpu-check             # one CUDA GPU, at most 540 s
    python -m benchmarks.gpu_check --device cpu --tiny --out /tmp/gpu-check
"""

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

NEEDS = ("torch", "yaml", "mlflow", "torch_fidelity", "dvc")
try:
    import torch
    import yaml
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.mnist_split import main as split_mnist
    from benchmarks.project import copy_project, merge
    from benchmarks.throughput import matmul_gflops, timed
    from ddpm import ClassifierFree, Diffusion, DiffusionConfig, TrainConfig, Trainer, UNet, UNetConfig, generate
    from ddpm.files import write_text
    from stages.pipeline.profiles import read_profiles
except ImportError as e:  # outside the project's venv: what is missing, not a traceback
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None] or [e.name]
    sys.exit(f"gpu_check: {sys.executable} cannot import {', '.join(missing)}; run it from the repository root "
             "in the project's venv (pip install -r requirements.txt)")

ROOT = Path(__file__).resolve().parents[1]
MNIST_T10K = (ROOT.parent / "shared/data/mnist-t10k", ROOT / "shared/data/mnist-t10k")
TRACKING_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DDPM_TRACKING", "DDPM_MODEL_NAME",
                      "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_ROOT")

# The `gpu` profile (profiles.yaml) on the MNIST split, which has 8,000 training images: 32 steps an epoch at
# batch 256. The base-128 UNet (25.8M parameters) costs 26.4 GFLOP per image per training step, 6.8 TFLOP per
# step: at a third of the H200's ~990 TFLOP/s in bf16 that is ~20 ms, and GroupNorm/SiLU (memory-bound) and
# kernel launches add about as much again: ~50 ms a step, ~2 s an epoch with its grid and checkpoint, so the
# profile's 20 epochs take about a minute per model. Sampling and evaluation run in batches of 1000.
def profile_params(name: str) -> dict:
    """Profile `name`'s values (profiles.yaml) as params.yaml sections, with `profile` naming it."""
    out = {"profile": name}
    for key, value in read_profiles(ROOT / "profiles.yaml")[name].items():
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


# --tiny: the same keys at toy size on a CPU (compare TINY in tests/helpers.py)
TINY_PARAMS = {
    "device": "cpu",
    "data": {"name": "mnist", "limit": 200, "test_limit": 100},
    "diffusion": {"timesteps": 100, "schedule": "cosine", "prediction": "v"},
    "model": {"base_channels": 8, "channel_mults": [1, 2, 2], "attention_resolutions": [7], "num_heads": 2},
    "classifier": {"epochs": 1, "batch_size": 50, "width": 8},
    "train": {"epochs": 1, "batch_size": 50, "warmup_steps": 2, "lr_schedule": "cosine", "min_snr_gamma": 5,
              "precision": "auto", "grid_size": 10, "grid_ddim_steps": 3},
    "train_uncond": {"steps": None}, "train_cond": {"steps": None},  # train.epochs, not the laptop profile's steps
    "sample": {"methods": ["ddim", "dpmsolver"], "num_samples": 20, "batch_size": 20, "ddpm_steps": [3],
               "ddim_steps": [3], "dpmsolver_steps": [3], "guidance": [1.0], "guidance_interval": None,
               "grid_size": 10, "spacing": "trailing", "clip_x0": True},
    "visualize": {"per_class": 1, "num_images": 1, "frames": 2, "steps": 3, "compare_steps": [3]},
}
# Per mode: matmul side and repeats, training batch (None: train.batch_size) and timed steps, sampled
# images, and seconds: a measurement's usual cost, a compiled one's, and what to keep for the pipeline.
SIZES = {
    "gpu": {"matmul_n": 8192, "matmul_reps": 20, "batch": None, "train_steps": 10, "images": 500,
            "estimate_s": 20, "compile_s": 120, "pipeline_s": 330},
    "tiny": {"matmul_n": 512, "matmul_reps": 3, "batch": 8, "train_steps": 2, "images": 4,
             "estimate_s": 1, "compile_s": 0, "pipeline_s": 0},
}
MARGIN_S = 5  # left for writing the report when the budget runs out
TRAIN_VARIANTS = {  # name: (precision, other TrainConfig fields)
    "fp32": ("fp32", {}), "tf32": ("tf32", {}), "bf16": ("bf16", {}), "fp16": ("fp16", {}),
    "auto, channels-last": ("auto", {"channels_last": True}), "auto, compiled": ("auto", {"compile": True}),
}


class OutOfTime(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise OutOfTime in this (main) thread once `seconds` have passed."""
    def stop(signum, frame):
        raise OutOfTime

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Report:
    """The results so far (sections of rows), rewritten to out/gpu_check.{json,md} after every row."""

    SECTIONS = {"matmul": "torch.mm, n x n", "train": "Training steps", "sample": "Sampling",
                "stages": "Pipeline: `dvc repro`, seconds per stage", "fid": "Pipeline: FID over the floor"}

    def __init__(self, out: Path, seconds: float, meta: dict):
        self.out, self.start, self.end = out, time.monotonic(), time.monotonic() + seconds
        self.data = {"meta": meta, "complete": False, **{name: [] for name in self.SECTIONS}}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.end - time.monotonic() - MARGIN_S

    def add(self, section: str, row: dict) -> None:
        self.data[section].append(row)
        self.write()

    def missing(self) -> bool:
        """Whether a measurement was cut or not run for lack of time."""
        return any(str(row.get("note")).startswith(("not run", "cut")) for name in self.SECTIONS
                   for row in self.data[name])

    def measure(self, section: str, row: dict, fn, estimate: float, reserve: float = 0.0) -> None:
        """Add `row` updated with fn()'s numbers, or with why there are none: fn ran out of the budget
        (less `reserve`, kept for later measurements), was not started for lack of it, or failed."""
        left = self.left() - reserve
        if left < estimate:
            return self.add(section, {**row, "note": f"not run: budget ({max(left, 0):.0f} s left)"})
        try:
            with time_limit(left):
                row = {**row, **fn()}
        except OutOfTime:
            row = {**row, "note": "cut: budget"}
        except Exception as e:  # noqa: BLE001 -- one failing measurement must not lose the others
            row = {**row, "note": f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.add(section, row)

    def write(self) -> None:
        meta = self.data["meta"]
        meta["elapsed_s"] = round(time.monotonic() - self.start, 1)
        lines = [f"# GPU check ({meta['mode']})", "", *(f"- {k}: {v}" for k, v in meta.items() if k != "params")]
        for name, title in self.SECTIONS.items():
            if self.data[name]:
                lines += ["", f"## {title}", "", *table(self.data[name])]
        lines += ["", "## params.yaml overrides", "", "```yaml", yaml.safe_dump(meta["params"], sort_keys=False), "```"]
        write_text(self.out / "gpu_check.json", json.dumps(self.data, indent=1) + "\n")
        write_text(self.out / "gpu_check.md", "\n".join(lines) + "\n")


def table(rows: list[dict]) -> list[str]:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v)
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows)]


def unet_config(params: dict, num_classes: int | None) -> UNetConfig:
    model = {k: tuple(v) if isinstance(v, list) else v for k, v in params["model"].items()}
    return UNetConfig(in_channels=1, image_size=28, num_classes=num_classes, **model)


def training_speed(device, unet: UNetConfig, diffusion: Diffusion, batch: int, steps: int, precision: str,
                   flops: float | None = None, **options) -> dict:
    """Images/s of Trainer.train_step at `batch`; with `flops` per step, the GFLOP/s that makes."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (batch, unet.in_channels, unet.image_size, unet.image_size), dtype=torch.uint8)
    config = TrainConfig(batch_size=batch, lr=1e-4, warmup_steps=1, precision=precision, **options)
    trainer = Trainer(UNet(unet).to(device), diffusion, images, None, config, device)
    idx = torch.arange(batch, device=device)
    first = timed(lambda: trainer.train_step(idx), device)  # with compiling and autotuning
    trainer.train_step(idx)
    step = timed(lambda: trainer.train_step(idx), device, steps)
    row = {"precision": trainer.precision, "images_per_s": batch / step, "step_ms": 1e3 * step, "first_step_s": first}
    return {**row, "gflops": flops / step / 1e9} if flops else row


def step_flops(unet: UNetConfig, diffusion: DiffusionConfig, batch: int) -> float:
    """Matmul and convolution FLOPs of one training step (forward and backward) at `batch`, counted on the
    meta device: no memory, no time, the same on every machine."""
    with torch.device("meta"):
        model = UNet(unet)
    x0 = torch.zeros(batch, unet.in_channels, unet.image_size, unet.image_size, device="meta")
    with FlopCounterMode(display=False) as counter:
        Diffusion.from_config(diffusion).to("meta").loss(model, x0).mean().backward()
    return float(counter.get_total_flops())


def sampling_speed(model, diffusion, n: int, method: str, steps: int, guided: bool, dtype=None) -> dict:
    """Images/s of `generate` for n images in one batch, class-conditional, guided at w = 1 or not."""
    labels = torch.arange(n) % model.config.num_classes
    options = {"seed": 0, "method": method, "labels": labels, "batch_size": n}
    net = ClassifierFree(model, 1.0) if guided else model
    device = diffusion.betas.device.type
    with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        generate(net, diffusion, n, (1, 28, 28), steps=2, **options)  # warm-up
        start = time.perf_counter()
        generate(net, diffusion, n, (1, 28, 28), steps=steps, **options)
    seconds = time.perf_counter() - start
    return {"images_per_s": n / seconds, "seconds": seconds}


def matmul_rows(r: Report, device: torch.device, s: dict) -> None:
    for precision in ("fp32", "tf32", "bf16", "fp16"):
        if precision == "tf32" and device.type != "cuda":
            r.add("matmul", {"precision": precision, "note": "cuda only"})
            continue
        r.measure("matmul", {"precision": precision}, lambda p=precision: {"tflops": matmul_gflops(
            device, p, s["matmul_n"], s["matmul_reps"]) / 1e3}, s["estimate_s"], s["pipeline_s"])


def train_rows(r: Report, device: torch.device, params: dict, s: dict, variants: list[str]) -> None:
    config = DiffusionConfig(**params["diffusion"])
    unet, batch = unet_config(params, None), s["batch"] or params["train"]["batch_size"]
    flops = step_flops(unet, config, batch)
    diffusion = Diffusion.from_config(config).to(device)
    with torch.device("meta"):
        size = sum(p.numel() for p in UNet(unet).parameters())
    r.data["meta"]["train_model"] = (f"UNet {size / 1e6:.1f}M params, 28x28x1, batch {batch}, "
                                     f"{flops / 1e12:.3g} TFLOP per step")
    rate = {row["precision"]: row.get("tflops") for row in r.data["matmul"]}
    for name in variants:
        precision, options = TRAIN_VARIANTS[name]
        if device.type != "cuda" and (precision == "tf32" or "channels_last" in options):
            r.add("train", {"variant": name, "note": "cuda only"})
        elif device.type != "cuda" and "compile" in options:
            r.add("train", {"variant": name, "note": "cuda only here: compiling takes minutes on a small CPU"})
        else:
            estimate = s["compile_s"] if "compile" in options else s["estimate_s"]
            r.measure("train", {"variant": name}, lambda p=precision, o=options: training_speed(
                device, unet, diffusion, batch, s["train_steps"], p, flops, **o), estimate, s["pipeline_s"])
            row = r.data["train"][-1]
            if row.get("gflops") and rate.get(row["precision"]):
                row["of_matmul_rate"] = f"{row['gflops'] / 1e3 / rate[row['precision']]:.0%}"
                r.write()


def sample_rows(r: Report, device: torch.device, params: dict, s: dict) -> None:
    diffusion = Diffusion.from_config(DiffusionConfig(**params["diffusion"])).to(device)
    torch.manual_seed(0)
    model = UNet(unet_config(params, 10)).to(device).eval()
    settings = [(m, k, g, None) for m in ("ddim", "dpmsolver") for k in (50, 20) for g in (False, True)]
    for method, steps, guided, dtype in [*settings, ("ddim", 50, False, torch.bfloat16)]:
        row = {"sampler": "DDIM" if method == "ddim" else "DPM-Solver++(2M)", "steps": steps,
               "guidance": "cfg (2 evals/step)" if guided else "none", "autocast": "bf16" if dtype else "fp32",
               "images": s["images"]}
        r.measure("sample", row, lambda m=method, k=steps, g=guided, d=dtype: sampling_speed(
            model, diffusion, s["images"], m, k, g, d), s["estimate_s"], s["pipeline_s"])


def make_repo(path: Path, params: dict, mnist: Path | None) -> None:
    """A copy of the project at `path` with `params`, and the MNIST test split as a data.root folder (else
    the offline glyphs dataset)."""
    if mnist:
        split_mnist([str(mnist), str(path.parent / "mnist-t10k-split")])
        params = merge(params, {"data": {"root": str(path.parent / "mnist-t10k-split")}})
    else:
        params = merge(params, {"data": {"name": "glyphs"}})
    copy_project(path, params, environment())


def environment() -> dict:
    """This interpreter's bin/ first on PATH, without the user's tracking targets, no progress bars."""
    env = {k: v for k, v in os.environ.items() if k not in TRACKING_VARIABLES}
    if torch.get_num_threads() == 1:  # --tiny
        env["OMP_NUM_THREADS"] = "1"
    return {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1", "DVC_NO_ANALYTICS": "1", "TQDM_DISABLE": "1"}


def repro(r: Report, repo: Path, log: Path) -> bool:
    """Run `dvc repro` in `repo`, adding a row per stage as the next one starts; stop it when the budget
    is up. A failing stage's row gets its last line of output. True if every stage ran."""
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=environment(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines = queue.Queue()

    def read():  # in a thread, so that the budget is checked while a stage is silent
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    stage, start, tail, cut = None, time.monotonic(), [], False
    with log.open("w") as f:
        while proc.poll() is None or not lines.empty():
            if r.left() <= 0 and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # the stages end their MLflow runs as FAILED
                cut = True
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            f.write(line)
            tail = [*tail[-40:], line.rstrip()]
            if match := re.match(r"Running stage '([^']+)'", line):
                if stage:
                    r.add("stages", {"stage": stage, "seconds": time.monotonic() - start, "note": None})
                stage, start = match.group(1), time.monotonic()
    proc.wait()
    if stage:
        note = "cut: budget" if cut else None if proc.returncode == 0 else error_line(tail)
        r.add("stages", {"stage": stage, "seconds": time.monotonic() - start, "note": note})
    elif proc.returncode:  # stopped before its first stage: by the budget, or DVC itself failed
        r.add("stages", {"stage": "(dvc)", "note": "cut: budget" if cut else error_line(tail)})
    return proc.returncode == 0


def error_line(tail: list[str]) -> str:
    """The failing stage's own last line (its one-line error, or a traceback's last line), else DVC's."""
    failed = next((i for i, line in enumerate(tail) if line.startswith("ERROR: failed to reproduce")), None)
    before = [line for line in tail[:failed] if line.strip() and not line.startswith(("ERROR", "WARNING"))]
    return (before[-1] if failed and before else next((x for x in reversed(tail) if x.strip()), "failed"))[:300]


def pipeline(r: Report, params: dict, mnist: Path | None) -> bool:
    """`dvc repro` of a copy of the project with `params`: stage rows, FID rows; True if it all ran."""
    if importlib.util.find_spec("dvc") is None:
        r.add("stages", {"stage": "(all)", "note": f"not run: {sys.executable} cannot import dvc"})
        return False
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    try:
        make_repo(work / "repo", params, mnist)
        start = time.monotonic()
        ok = repro(r, work / "repo", r.out / "pipeline.log")
        r.add("stages", {"stage": "total", "seconds": time.monotonic() - start, "note": None if ok else "incomplete"})
        if (work / "repo/metrics/eval.json").is_file():  # also when only the last stage (visualize) was cut
            fid_rows(r, work / "repo/metrics")
        return ok
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fid_rows(r: Report, metrics: Path) -> None:
    results = json.loads((metrics / "eval.json").read_text())
    floor = results["floor"]["classifier"]["fid"]
    for variant in ("uncond", "cond"):
        train = json.loads((metrics / f"train_{variant}.json").read_text())
        for tag, scores in results.get(variant, {}).items():
            r.data["fid"].append({"model": variant, "sampler": tag, "fid": scores["fid"], "floor": floor,
                                  "fid_over_floor": scores["fid"] / floor, "train_steps": train["steps"],
                                  "train_images_per_s": train["images_per_second"]})
    r.write()


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_check.md, gpu_check.json, pipeline.log")
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop before this many seconds have passed")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes, to check the script on a CPU in about a minute")
    ap.add_argument("--mnist", type=Path, help="folder with MNIST's t10k files (default: shared/data/mnist-t10k "
                    "beside or inside the repository; without one, the glyphs dataset)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU here; for the toy run on a CPU: --device cpu --tiny")
    mode = "tiny" if args.tiny else "gpu"
    if args.tiny:  # toy numbers mean nothing, and on a small shared CPU one thread runs them fastest
        torch.set_num_threads(1)
    params = TINY_PARAMS if args.tiny else merge(profile_params("gpu"), {
        "data": {"name": "mnist"}, "sample": {"batch_size": 1000}, "evaluate": {"batch_size": 1000}})
    mnist = args.mnist or next((p for p in MNIST_T10K if (p / "t10k-images-idx3-ubyte.gz").is_file()), None)
    meta = {"mode": mode, "date": datetime.datetime.now().isoformat(timespec="seconds"), "budget_s": args.budget_s,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_model()})",
            "torch": torch.__version__, "cuda": torch.version.cuda, "cpu": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "data": f"MNIST t10k split from {mnist}" if mnist else "glyphs (no MNIST t10k files found)",
            "params": params}
    r = Report(args.out, args.budget_s, meta)
    r.write()
    matmul_rows(r, device, SIZES[mode])
    train_rows(r, device, params, SIZES[mode], [v for v in TRAIN_VARIANTS if v != "auto, compiled"])
    sample_rows(r, device, params, SIZES[mode])
    train_rows(r, device, params, SIZES[mode], ["auto, compiled"])  # last: it may take minutes
    ok = False
    if r.left() > 0:
        ok = pipeline(r, params, mnist)
    else:
        r.add("stages", {"stage": "(all)", "note": "not run: budget"})
    r.data["complete"] = ok and not r.missing()
    r.write()
    print((args.out / "gpu_check.md").read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
