"""One GPU's numbers for this project, measured unattended within --budget-s seconds.

Writes --out/gpu_check.md and gpu_check.json, rewritten after every measurement so that a run cut short
keeps what it measured, and stops itself before the budget is up:

1. the GPU's torch.mm rate in fp32, tf32, bf16 and fp16;
2. training images/s and achieved GFLOP/s (FLOPs counted by torch.utils.flop_counter) of the UNet of
   the gpu profile in each precision, compiled, and in channels-last memory format;
3. sampling images/s with DDIM and DPM-Solver++(2M) at 50 and 20 steps (--tiny: 10 and 5), unguided and with
   classifier-free guidance (two network evaluations per step), in fp32, and guided DDIM-50 at each other
   sampling precision (tf32, bf16, fp16: sample.precision, the network under autocast); the cifar10 profile's
   35.7M-parameter UNet at 32x32x3: training images/s (and the hours its 800,000 steps take) and DDIM-100
   sampling (and the minutes 50,000 images take);
4. the pipeline end to end: `dvc repro` of a copy of the project with the gpu profile on the MNIST test split
   (benchmarks.mnist_split), each stage's seconds (from `dvc repro`'s output as it runs) and each model and
   sampler's FID over its floor; a failing stage's error line instead where one fails.

--device cpu --tiny runs all of it at toy size (the gpu profile at the tests' size, benchmarks.project.TINY)
in a few minutes (rows that need CUDA say so), so that the script keeps working between GPU runs. The
measurements are in gpu_measure.py, the pipeline run in gpu_pipeline.py, the report in gpu_report.py.

    python -m benchmarks.gpu_check --out gpu-check             # one CUDA GPU, at most 540 s
    python -m benchmarks.gpu_check --device cpu --tiny --out /tmp/gpu-check
"""

import argparse
import contextlib
import datetime
import importlib.util
import math
import sys
from pathlib import Path

NEEDS = ("torch", "yaml", "mlflow", "torch_fidelity", "dvc")
try:
    import torch

    from benchmarks.gpu_measure import SIZES, TRAIN_VARIANTS, cifar10_rows, matmul_rows, sample_rows, train_rows
    from benchmarks.gpu_pipeline import pipeline
    from benchmarks.gpu_report import MARGIN_S, Report
    from benchmarks.project import TINY, merge
    from stages.pipeline.keys import set_key
    from stages.pipeline.profiles import read_profiles
except ImportError as e:  # outside the project's venv: what is missing, not a traceback
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None] or [e.name]
    sys.exit(f"gpu_check: {sys.executable} cannot import {', '.join(missing)}; run it from the repository root "
             "in the project's venv (pip install -r requirements.txt)")

ROOT = Path(__file__).resolve().parents[1]
MNIST_T10K = (ROOT.parent / "shared/data/mnist-t10k", ROOT / "shared/data/mnist-t10k")
MNIST_FILE = "t10k-images-idx3-ubyte.gz"


def profile_params(name: str) -> dict:
    """Profile `name`'s values (profiles.yaml) as params.yaml sections, with `profile` naming it."""
    out = {"profile": name}
    for key, value in read_profiles(ROOT / "profiles.yaml")[name].items():
        set_key(out, key, value)
    return out


# The `gpu` profile (profiles.yaml) on the MNIST split, which has 8,000 training images: 32 steps an epoch at
# batch 256. The base-128 UNet (25.8M parameters) costs 26.4 GFLOP per image per training step, 6.8 TFLOP per
# step: at a third of the H200's ~990 TFLOP/s in bf16 that is ~20 ms, and GroupNorm/SiLU (memory-bound) and
# kernel launches add about as much again: ~50 ms a step, ~2 s an epoch with its grid and checkpoint, so the
# profile's 20 epochs take about a minute per model. Sampling and evaluation run in batches of 1000.
def run_params(tiny: bool) -> dict:
    """The params.yaml overrides of the pipeline run: the gpu profile (its standard protocol at N = 1000) on
    MNIST, in batches of 1000; --tiny, the same at the tests' toy size."""
    params = merge(profile_params("gpu"), {"data": {"name": "mnist"}, "sample": {"batch_size": 1000,
                                           "num_samples": 1000}, "evaluate": {"batch_size": 1000}})
    return merge(params, TINY) if tiny else params


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage text
        sys.exit(f"gpu_check: {message} (see --help)")


def budget(text: str) -> float:
    """An argparse type: seconds, a finite number above what writing the report keeps (MARGIN_S)."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(seconds) and seconds > MARGIN_S):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above {MARGIN_S}, got {text}")
    return seconds


def device(text: str) -> torch.device:
    """An argparse type: a torch device (cuda, cuda:N, cpu)."""
    try:
        return torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cuda, cuda:N or cpu, got {text!r}") from None


def mnist_folder(text: str) -> Path:
    """An argparse type: a folder holding MNIST's t10k files."""
    if not (Path(text) / MNIST_FILE).is_file():
        raise argparse.ArgumentTypeError(f"{text} has no {MNIST_FILE}")
    return Path(text)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = Parser(prog="gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_check.md, gpu_check.json, pipeline.log")
    ap.add_argument("--budget-s", type=budget, default=540.0, help="stop before this many seconds have passed")
    ap.add_argument("--device", type=device, default="cuda", help="cuda, cuda:N, or cpu (with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes, to check the script on a CPU in a few minutes")
    ap.add_argument("--mnist", type=mnist_folder, help="folder with MNIST's t10k files (default: "
                    "shared/data/mnist-t10k beside or inside the repository; without one, the glyphs dataset)")
    args = ap.parse_args(argv)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU here; for the toy run on a CPU: --device cpu --tiny")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    device, mode = args.device, "tiny" if args.tiny else "gpu"
    if args.tiny:  # toy numbers mean nothing, and on a small shared CPU one thread runs them fastest
        torch.set_num_threads(1)
    params = run_params(args.tiny)
    mnist = args.mnist or next((p for p in MNIST_T10K if (p / MNIST_FILE).is_file()), None)
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
    cifar10_rows(r, device, profile_params("cifar10"), SIZES[mode], args.tiny)
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
