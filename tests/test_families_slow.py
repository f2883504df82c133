"""Real-data checks of the family acceptance targets, on small budgets (slow: `pytest -m slow`).

The full-size figures come from `python bench/families.py` (README, Results).
"""

import pytest
import torch
from helpers import configured_trainer

from vaekit.data import ImageDataset
from vaekit.data.dataset import eval_loader
from vaekit.models import VAEConfig, VQVAEConfig, build_model
from vaekit.objectives.iwae import iwae_bound, log_importance_weights
from vaekit.training import DataConfig, TrainConfig
from vaekit.training.monitors import MonitorConfig

pytestmark = pytest.mark.slow
TC = dict(batch_size=128, threads=1, progress=False, tensorboard="off", checkpoint_every=0, eval_every=0)


def _fit(cfg, data, tmp_path, name, steps, binarize="none", seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg)
    configured_trainer(model, data, TrainConfig(epochs=100, max_steps=steps, seed=seed, **TC),
                       data_config=DataConfig(dataset="mnist", binarize=binarize), run_dir=tmp_path / name,
                       monitor=MonitorConfig(enabled=False)).fit()
    return model.eval()


def test_vq_dead_code_restart_keeps_90_percent_of_512_codes_in_use(tmp_path, mnist):
    data = ImageDataset("mnist", mnist.train.subset(20000), mnist.test.subset(2000), mnist.classes)
    usage = {}
    for restart in (True, False):
        model = _fit(VQVAEConfig(restart_dead_codes=restart), data, tmp_path, f"vq{restart}", steps=500)
        usage[restart] = model.code_statistics(eval_loader(data.test, 500, "none", 0, "cpu").epoch(0))["code_usage"]
    assert usage[True] >= 0.9 and usage[False] < 0.5, usage


def test_iwae_k5_beats_the_vae_nll_with_the_same_network_and_steps(tmp_path, mnist):
    data = ImageDataset("mnist", mnist.train, mnist.test.subset(500), mnist.classes)
    x, _ = next(eval_loader(data.test, 500, "dynamic", 0, "cpu").epoch(0))
    nll = {}
    for name, obj in (("vae", "elbo"), ("iwae", "iwae")):
        model = _fit(VAEConfig(hidden_sizes=(400,), latent_dim=20, objective=obj, iwae_k=5), data, tmp_path, name,
                     steps=2000, binarize="dynamic")
        with torch.no_grad():
            torch.manual_seed(0)
            nll[name] = -torch.cat([iwae_bound(log_importance_weights(model, x[i : i + 50], 500))
                                    for i in range(0, 500, 50)])
    diff = nll["iwae"] - nll["vae"]  # paired over the same test images
    assert diff.mean() + 3 * diff.std() / diff.numel() ** 0.5 < 0, (nll["vae"].mean(), nll["iwae"].mean())
