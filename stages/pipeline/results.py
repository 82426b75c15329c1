"""What the evaluate stage makes of its scores: the headline that DVC and the MLflow parent run show, the
tags that name each sample set, and the details, table, plots and figures written beside them."""

from ddpm.samplers import METHODS

from .io import save_figure, write_json, write_text
from .plots import cfg_series, cfg_tradeoff, csv_text, ema_series, fid_vs_steps, steps_series

SETTING = ("variant", "tag", "method", "steps", "eta", "spacing", "cfg", "autoguidance", "interval", "sigma_rel",
           "sample_precision")
SCORES = ("fid", "fid_over_floor", "is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall", "f_score",
          "cond_accuracy")


def _text(value) -> str:
    return ",".join(f"{v:g}" for v in value) if isinstance(value, (list, tuple)) else str(value)


def sampler_tags(protocol: dict) -> dict:
    """protocol.<key> for each setting and sampler.<variant>.<tag> = "method=ddim steps=10 ... interval=0.28,5.42"
    for each sample set (the fields it sets: an unconditional set has no cfg, one guided at every step no interval)."""
    out = {f"protocol.{k}": ",".join(v) if isinstance(v, list) else v for k, v in protocol.items() if k != "samplers"}
    for variant, sets in protocol["samplers"].items():
        out |= {f"sampler.{variant}.{tag}": " ".join(f"{k}={_text(v)}" for k, v in s.items() if v is not None)
                for tag, s in sets.items()}
    return out


def headline(rows: list[dict], floors: dict, protocol: dict) -> dict:
    """The numbers to compare at a glance, under the protocol's key (fast-1k, standard-50k: numbers of two
    protocols never share a name). Per model: the setting with the lowest FID (its tag, FID, FID/floor, IS and,
    for the conditional model, conditional accuracy), each sampler's lowest FID and, with Inception-v3, the
    setting with the lowest Inception FID (its tag, FID, IS); the floor's FIDs; and "inception": "available",
    "off" or "unavailable (why)"."""
    out = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        best = min(mine, key=lambda r: r["fid"])
        out[variant] = {"best": best["tag"]} | {k: round6(best[k]) for k in ("fid", "fid_over_floor", "is_mean",
                                                                              "cond_accuracy") if k in best}
        for method in METHODS:
            fids = [r["fid"] for r in mine if r["method"] == method]
            if fids:
                out[variant][method] = {"fid": round6(min(fids))}
        if "inception.fid" in best:
            top = min(mine, key=lambda r: r["inception.fid"])
            out[variant]["inception"] = {"best": top["tag"], "fid": round6(top["inception.fid"]),
                                         "is_mean": round6(top["inception.is_mean"])}
    floor = {"fid": round6(floors["classifier"]["fid"])} | (
        {"inception": {"fid": round6(floors["inception"]["fid"])}} if "inception" in floors else {})
    return {protocol["key"]: out | {"floor": floor, "inception": protocol["inception"]}}


def round6(x: float) -> float:
    return float(f"{x:.6g}")


def write_results(paths: dict, results: dict, rows: list[dict]) -> None:
    """Every output of evaluate, each to paths[name]: metrics (the headline), details, table, plot, figure,
    cfg_plot, cfg_figure and ema_plot (FID over the post-hoc EMA length: the sets of a sigma_rel, only
    the header when there are none)."""
    floor = results["floor"]["classifier"]
    write_json(paths["metrics"], headline(rows, results["floor"], results["protocol"]))
    write_json(paths["details"], results)
    others = sorted({k for r in rows for k in r if "." in k})  # the other extractors' numbers
    write_text(paths["table"], csv_text(rows, (*SETTING, *SCORES, *others)))
    curves = sorted(({"series": steps_series(r)} | r for r in rows), key=lambda r: (r["series"], r["steps"]))
    write_text(paths["plot"], csv_text(curves, ("series", "variant", "method", "steps", "eta", "cfg", "autoguidance",
                                              "fid", "fid_over_floor")))
    save_figure(fid_vs_steps(rows, floor=floor["fid"]), paths["figure"])
    cond = sorted(({"series": cfg_series(r)} | r for r in rows if r["variant"] == "cond"),
                  key=lambda r: (r["series"], r["cfg"]))
    write_text(paths["cfg_plot"], csv_text(cond, ("series", "method", "steps", "eta", "cfg", "fid", "is_mean",
                                                "cond_accuracy")))
    save_figure(cfg_tradeoff(cond, floor), paths["cfg_figure"])
    ema = sorted(({"series": ema_series(r)} | r for r in rows if r.get("sigma_rel") is not None),
                 key=lambda r: (r["series"], r["sigma_rel"]))
    write_text(paths["ema_plot"], csv_text(ema, ("series", "variant", "method", "steps", "sigma_rel", "fid",
                                                 "fid_over_floor", "recall")))
