"""The pipeline's figures (matplotlib) of its result records: FID against steps, the guidance trade-off and
the loss curve; the caller decides where to save them.

matplotlib's object API (no pyplot, no backend state), imported only where a figure is drawn: it adds
about a second to the start of every command that imports it. Sampler settings are read from each record
with `SamplerSetting.from_dict`, and named by its labels."""

import csv
import io
from dataclasses import replace

from ddpm import SamplerSetting


def fid_vs_steps(rows: list[dict], floor: float | None = None):
    """FID against sampling steps, one line per (variant, method, eta, cfg, autoguidance, interval); DDPM as a dashed
    reference and the real-data `floor` (real train images scored like samples) as a dotted one.

    rows: dicts with variant, fid and a SamplerSetting's fields (method, steps, eta, cfg, autoguidance;
    spacing optional): cfg is the classifier-free guidance weight (None for an unconditional model),
    autoguidance the autoguidance weight (0: none)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    series = {}
    for r in rows:
        s = SamplerSetting.from_dict(r)
        key = (r["variant"], s.method, s.eta, -1.0 if s.cfg is None else s.cfg, s.autoguidance, s.interval or (),
               -1.0 if s.sigma_rel is None else s.sigma_rel)
        series.setdefault(key, []).append((s, r["fid"]))
    for i, ((variant, method, *_), points) in enumerate(sorted(series.items())):
        color = f"C{i % 10}"
        if method == "ddpm":
            ax.axhline(points[0][1], ls="--", color=color, label=f"{variant} {points[0][0].label}")
        else:
            steps, fids = zip(*sorted((s.steps, fid) for s, fid in points))
            ax.plot(steps, fids, "o-", color=color, label=f"{variant} {points[0][0].curve_label}")
    if floor is not None:
        ax.axhline(floor, ls=":", color="gray", label="floor: real data")
    ax.set(xscale="log", xlabel="sampling steps (model calls)", ylabel="FID (classifier features)",
           title="FID vs sampling steps")
    steps = sorted({r["steps"] for r in rows if r["method"] != "ddpm"})
    ax.set_xticks(steps, [str(s) for s in steps], minor=False)
    ax.minorticks_off()
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def loss_curve(steps: list[int], losses: list[float], window: int = 50):
    """Training loss per step (faint) and its moving average over `window` steps."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(steps, losses, color="C0", alpha=0.3, lw=0.8, label="loss")
    if len(losses) >= window:
        avg = [sum(losses[i - window:i]) / window for i in range(window, len(losses) + 1)]
        ax.plot(steps[window - 1:], avg, color="C0", label=f"moving average ({window})")
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="Training loss")
    ax.legend()
    fig.tight_layout()
    return fig


CFG_PANELS = (("fid", "FID (lower is better)"), ("is_mean", "IS (higher is better)"),
              ("cond_accuracy", "conditional accuracy"))


def cfg_tradeoff(rows: list[dict], floor: dict | None = None):
    """The classifier-free guidance trade-off: FID, IS and conditional accuracy against w, one line per
    sampler; the real-data `floor` (same keys) as a dotted line in each panel.

    rows: dicts with fid, is_mean, cond_accuracy and a SamplerSetting's fields (method, steps, eta, cfg;
    spacing and autoguidance optional), cfg being the classifier-free guidance weight w."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.8))
    axes = fig.subplots(1, len(CFG_PANELS))
    series = {}
    for r in rows:
        series.setdefault(cfg_series(r), []).append((r["cfg"], r))
    for i, (label, points) in enumerate(sorted(series.items())):
        points = sorted(points, key=lambda p: p[0])
        for ax, (key, _) in zip(axes, CFG_PANELS):
            ax.plot([w for w, _ in points], [r[key] for _, r in points], "o-", color=f"C{i % 10}", label=label)
    for ax, (key, name) in zip(axes, CFG_PANELS):
        if floor is not None and key in floor:
            ax.axhline(floor[key], ls=":", color="gray", label="real data")
        ax.set(xlabel="guidance weight w", ylabel=name)
    axes[0].legend(fontsize=7)
    fig.suptitle("Classifier-free guidance: quality vs w (conditional model)")
    fig.tight_layout()
    return fig


def steps_series(row: dict) -> str:
    """The curve over sampling steps that a record belongs to: its variant and its setting without the step
    count ("cond DDIM η=0, w=0.5"), as the `series` column that dvc.yaml's plots draw one line per."""
    return f"{row['variant']} {SamplerSetting.from_dict(row).curve_label}"


def cfg_series(row: dict) -> str:
    """The curve over the guidance weight w that a record belongs to: its sampler setting without w ("DDIM-10 η=0")."""
    return replace(SamplerSetting.from_dict(row), cfg=None).label


def ema_series(row: dict) -> str:
    """The curve over the post-hoc EMA length that a record belongs to: its variant and its setting without
    sigma_rel ("uncond DPM-Solver++(2M)-20, autoguidance w=1")."""
    return f"{row['variant']} {replace(SamplerSetting.from_dict(row), sigma_rel=None).label}"


def csv_text(rows: list[dict], columns: tuple[str, ...]) -> str:
    """The `columns` of each record as CSV text with a header line (floats to 6 significant digits; None and
    a missing key as an empty cell; a list as its values joined by spaces; a cell with a comma quoted)."""
    cell = lambda v: (f"{v:.6g}" if isinstance(v, float) else "" if v is None
                      else " ".join(map(cell, v)) if isinstance(v, (list, tuple)) else str(v))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([cell(r.get(c)) for c in columns] for r in rows)
    return out.getvalue()
