"""Recipes trained to their published targets on real data (slow: run with `scripts/test.sh -m slow`)."""

from pathlib import Path

import pytest

from vaekit.training import load_run_config, train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.slow
def test_pytorch_example_recipe_reaches_106_nats(tmp_path, mnist):
    cfg = load_run_config(CONFIGS / "pytorch_example.yaml", [f"out_dir={tmp_path}", "train.progress=false"])
    result = train(cfg, dataset=mnist)
    # PyTorch examples' own script: 105.6 on this machine (BCE + KL per test image, 10 epochs)
    assert result.final_eval["neg_elbo"] <= 106.0, result.final_eval
