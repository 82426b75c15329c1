"""report: the experiment table from MLflow — one row per pipeline run, params vs FID/IS.

usage: python -m stages.report [--csv FILE] [--all-params]
Reads the same store the stages log to (MLFLOW_TRACKING_URI, else mlflow.db at the repo root).
"""

import argparse
import os
import sys

import mlflow
import pandas as pd

from .pipeline.store import EXPERIMENT, tracking_uri

HEADLINE = ("fid", "is_mean", "kid_mean", "cond_accuracy", "classifier_test_accuracy")


def experiment_table(all_params: bool = False) -> pd.DataFrame:
    """Pipeline runs (newest first) with their params and headline metrics as columns."""
    mlflow.set_tracking_uri(tracking_uri())
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    runs = mlflow.search_runs(experiment_names=[name], filter_string="tags.role = 'pipeline'",
                              order_by=["attributes.start_time DESC"])
    if runs.empty:
        return runs
    runs = runs.set_index("tags.mlflow.runName").rename_axis("run")
    params = [c for c in runs.columns if c.startswith("params.")]
    if not all_params:  # only the params that differ between runs
        params = [c for c in params if runs[c].nunique(dropna=False) > 1]
    metrics = sorted(c for c in runs.columns if c.startswith("metrics.") and runs[c].notna().any()
                     and c.split(".")[-1] in HEADLINE)
    table = runs[params + metrics]
    return table.rename(columns=lambda c: c.split(".", 1)[1])


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", help="also write the table to this CSV file")
    ap.add_argument("--all-params", action="store_true", help="show every param, not only those that differ")
    a = ap.parse_args(argv)
    table = experiment_table(a.all_params)
    if table.empty:
        print(f"no pipeline runs in {tracking_uri()} yet; run `dvc repro` or `dvc exp run` first")
        return
    with pd.option_context("display.max_columns", None, "display.width", 200, "display.float_format", "{:.4g}".format):
        print(table.T.to_string())
    if a.csv:
        table.to_csv(a.csv)


if __name__ == "__main__":
    main(sys.argv[1:])
