"""Training: configs, the loop, checkpoints, distributed helpers."""

from vaekit.training.callbacks import Callback
from vaekit.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from vaekit.training.config import DataConfig, RunConfig, TrainConfig, load_run_config, run_config_from_dict
from vaekit.training.metrics_log import MetricsLog, read_metrics
from vaekit.training.run import train
from vaekit.training.trainer import Trainer, TrainResult, TrainState

__all__ = [
    "Callback", "DataConfig", "MetricsLog", "RunConfig", "TrainConfig", "TrainResult", "TrainState", "Trainer",
    "latest_checkpoint", "list_checkpoints", "load_checkpoint", "load_run_config", "read_metrics",
    "run_config_from_dict", "train",
]
