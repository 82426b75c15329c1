"""stages.pipeline.plots on hand-made records: one curve per sampler setting, named by its label."""

from stages.pipeline.plots import cfg_tradeoff, fid_vs_steps


def legend(ax) -> list[str]:
    return ax.get_legend_handles_labels()[1]


def test_fid_vs_steps_draws_a_curve_per_setting_without_reading_the_variant():
    rows = [{"variant": "uncond", "method": "ddpm", "steps": 1000, "eta": 1.0, "cfg": None, "autoguidance": 0.0,
             "fid": 5.0}]
    for steps, fid in ((10, 9.0), (20, 7.0)):
        rows += [{"variant": "uncond", "method": "ddim", "steps": steps, "eta": 0.0, "cfg": None, "autoguidance": w,
                  "fid": fid + w} for w in (0.0, 1.0)]
        rows += [{"variant": "cond", "method": "dpmsolver", "steps": steps, "eta": 0.0, "cfg": w, "autoguidance": 0.0,
                  "fid": fid - w} for w in (0.0, 2.0)]
        rows.append({"variant": "cond", "method": "dpmsolver", "steps": steps, "eta": 0.0, "cfg": 2.0,
                     "autoguidance": 0.0, "interval": [0.28, 5.42], "fid": fid - 3})  # as index.json stores it
    ax = fid_vs_steps(rows, floor=1.0).axes[0]
    assert legend(ax) == ["cond DPM-Solver++(2M), w=0", "cond DPM-Solver++(2M), w=2",
                          "cond DPM-Solver++(2M), w=2, σ∈(0.28, 5.42]", "uncond DDIM η=0",
                          "uncond DDIM η=0, autoguidance w=1", "uncond DDPM-1000", "floor: real data"]
    curves = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}
    assert curves["uncond DDIM η=0, autoguidance w=1"] == ([10, 20], [10.0, 8.0])
    assert curves["cond DPM-Solver++(2M), w=2"] == ([10, 20], [7.0, 5.0])
    assert curves["cond DPM-Solver++(2M), w=2, σ∈(0.28, 5.42]"] == ([10, 20], [6.0, 4.0])


def test_cfg_tradeoff_plots_each_sampler_against_w():
    rows = [{"method": "ddim", "steps": 10, "eta": 0.0, "cfg": w, "fid": 10 - w, "is_mean": 2 + w,
             "cond_accuracy": 0.5 + w / 10} for w in (2.0, 0.0, 1.0)]
    rows.append({"method": "dpmsolver", "steps": 20, "eta": 0.0, "cfg": 1.0, "fid": 4.0, "is_mean": 3.0,
                 "cond_accuracy": 0.9})
    fig = cfg_tradeoff(rows, floor={"fid": 1.0, "is_mean": 5.0, "cond_accuracy": 0.99})
    assert legend(fig.axes[0]) == ["DDIM-10 η=0", "DPM-Solver++(2M)-20", "real data"]
    ddim = fig.axes[0].lines[0]
    assert list(ddim.get_xdata()) == [0.0, 1.0, 2.0] and list(ddim.get_ydata()) == [10.0, 9.0, 8.0]
    assert list(fig.axes[2].lines[0].get_ydata()) == [0.5, 0.6, 0.7]
