"""Model families under one interface; ``MODEL_REGISTRY`` maps family names to classes."""

from vaekit.models.aae import AAE, AAEConfig, AAEOutput
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
from vaekit.models.cvae import CVAE, CVAEConfig
from vaekit.models.pixel_vae import PixelVAE, PixelVAEConfig
from vaekit.models.tcvae import TCVAE, TCVAEConfig, TCVAEOutput
from vaekit.models.vae import VAE, VAEConfig, VAEOutput
from vaekit.models.vqvae import VQVAE, VQVAEConfig, VQVAEOutput

__all__ = [
    "AAE", "CVAE", "MODEL_REGISTRY", "PixelVAE", "TCVAE", "VAE", "VQVAE", "AAEConfig", "AAEOutput", "BaseModel",
    "CVAEConfig", "ModelOutput", "PixelVAEConfig", "TCVAEConfig", "TCVAEOutput", "VAEConfig", "VAEOutput",
    "VQVAEConfig", "VQVAEOutput",
    "build_model", "load_model", "model_class", "model_config_from_dict", "register_model",
]
