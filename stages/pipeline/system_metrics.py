"""MLflow's system metrics (CPU, memory, disk, network, GPU when present) on a stage's run, when MLflow's
MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING is on, every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (10)."""

from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING

from .store import tracking_uri


def start_monitor(run_id: str, resume: bool):
    """MLflow's system-metrics monitor, started on the run; None when the switch is off."""
    if not MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get():
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, resume_logging=resume, tracking_uri=tracking_uri())
    monitor.start()
    return monitor


def stop_monitor(monitor) -> None:
    """Stop the monitor and log what it sampled since its last point, so a short stage gets one too."""
    monitor.finish()
    if metrics := monitor.aggregate_metrics():
        monitor.publish_metrics(metrics)
        monitor.mlflow_logger.flush()
