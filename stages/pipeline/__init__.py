"""What the stage scripts share and the benchmarks and the CLI reuse: params.yaml as validated
dataclasses (`params`), MLflow tracking (`tracking`), atomic outputs and the prepared data (`io`),
and how a stage runs (`run`). The diffusion code itself is the `ddpm` library."""
