"""Model families under one interface; ``MODEL_REGISTRY`` maps family names to classes."""

from vaekit.models.base import (
    MODEL_REGISTRY,
    BaseModel,
    ModelOutput,
    build_model,
    load_model,
    model_class,
    model_config_from_dict,
    register_model,
)
from vaekit.models.pixel_vae import PixelVAE, PixelVAEConfig
from vaekit.models.vae import VAE, VAEConfig, VAEOutput

__all__ = [
    "MODEL_REGISTRY", "VAE", "BaseModel", "ModelOutput", "PixelVAE", "PixelVAEConfig", "VAEConfig", "VAEOutput",
    "build_model", "load_model", "model_class", "model_config_from_dict", "register_model",
]
