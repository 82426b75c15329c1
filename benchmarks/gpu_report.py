"""The GPU check's report: sections of rows, each measurement run within what is left of a budget of
seconds, rewritten to out/gpu_check.{json,md} after every row so that a run cut short keeps what it measured."""

import contextlib
import json
import signal
import time
from pathlib import Path

import torch
import yaml

from ddpm.files import write_text

MARGIN_S = 5  # left for writing the report when the budget runs out


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
                "cifar10": "The cifar10 profile (32x32x3)",
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
