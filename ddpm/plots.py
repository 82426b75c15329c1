"""Figures (matplotlib) built from plain records; the caller decides where to save them."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def fid_vs_steps(rows: list[dict]):
    """FID against DDIM steps, one line per (variant, eta, guidance); DDPM as a dashed reference.

    rows: dicts with variant, method, steps, eta, guidance, fid."""
    fig, ax = plt.subplots(figsize=(6, 4))
    series = {}
    for r in rows:
        series.setdefault((r["variant"], r["method"], r["eta"], r["guidance"]), []).append((r["steps"], r["fid"]))
    for i, ((variant, method, eta, w), points) in enumerate(sorted(series.items())):
        label = f"{variant} {method}" + (f" η={eta:g}" if method == "ddim" else "") + (f" w={w:g}" if w else "")
        color = f"C{i % 10}"
        if method == "ddpm":
            ax.axhline(points[0][1], ls="--", color=color, label=f"{label} ({points[0][0]} steps)")
        else:
            steps, fids = zip(*sorted(points))
            ax.plot(steps, fids, "o-", color=color, label=label)
    ax.set(xscale="log", xlabel="DDIM steps", ylabel="FID (classifier features)", title="FID vs sampling steps")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
