"""vaekit: Variational Autoencoders from probabilistic foundations to production.

Quick start::

    from vaekit import VAE, VAEConfig, Trainer, TrainConfig, load_dataset
    data = load_dataset("mnist")
    model = VAE(VAEConfig(latent_dim=20))
    Trainer(model, data, TrainConfig(epochs=1), run_dir="runs/demo").fit()
"""

from vaekit.data import ImageDataset, load_dataset
from vaekit.errors import (
    CheckpointError,
    ChecksumError,
    ConfigError,
    DataError,
    InputError,
    ModelFormatError,
    TrainingDivergedError,
    VaekitError,
)
from vaekit.evaluation import evaluate_elbo
from vaekit.models import MODEL_REGISTRY, VAE, BaseModel, VAEConfig, build_model, load_model
from vaekit.training import (
    Callback,
    DataConfig,
    RunConfig,
    TrainConfig,
    Trainer,
    TrainResult,
    load_run_config,
    read_metrics,
    train,
)

__version__ = "0.1.0"

__all__ = [
    "MODEL_REGISTRY", "VAE", "BaseModel", "Callback", "CheckpointError", "ChecksumError", "ConfigError",
    "DataConfig", "DataError", "ImageDataset", "InputError", "ModelFormatError", "RunConfig", "TrainConfig",
    "TrainResult", "Trainer", "TrainingDivergedError", "VAEConfig", "VaekitError", "build_model",
    "evaluate_elbo", "load_dataset", "load_model", "load_run_config", "read_metrics", "train",
]
