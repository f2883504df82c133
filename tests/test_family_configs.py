"""The family recipes under configs/ parse into valid run configs, and the CLI selects families."""

from pathlib import Path

import pytest

from vaekit.data import LOADERS
from vaekit.errors import ConfigError
from vaekit.models import AAEConfig, CVAEConfig, TCVAEConfig, VAEConfig, VQVAEConfig
from vaekit.training import load_run_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = {"vqvae_mnist.yaml": VQVAEConfig, "iwae_mnist.yaml": VAEConfig, "cvae_mnist.yaml": CVAEConfig,
           "aae_mixture_mnist.yaml": AAEConfig, "tcvae_dsprites.yaml": TCVAEConfig}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_parses(name):
    data = CONFIGS / name
    if "dsprites" in name and "dsprites" not in LOADERS:
        pytest.skip("the dsprites dataset is not in this tree yet")
    cfg = load_run_config(data)
    assert type(cfg.model) is RECIPES[name]


@pytest.mark.parametrize("family, cls", [("tcvae", TCVAEConfig), ("cvae", CVAEConfig), ("vqvae", VQVAEConfig),
                                         ("aae", AAEConfig)])
def test_model_override_selects_the_family_and_its_keys(family, cls):
    cfg = load_run_config(None, [f"model={family}"])
    assert type(cfg.model) is cls
    with pytest.raises(ConfigError, match="valid keys"):
        load_run_config(None, [f"model={family}", "model.no_such_key=1"])


def test_family_keys_are_typed():
    assert load_run_config(None, ["model=vqvae", "model.codebook_size=64"]).model.codebook_size == 64
    assert load_run_config(None, ["model=vae", "model.objective=iwae", "model.iwae_k=10"]).model.iwae_k == 10
    with pytest.raises(ConfigError, match="estimator"):
        load_run_config(None, ["model=tcvae", "model.estimator=exact"])
