"""Retraining pipelines end to end on real MNIST: validation, fine-tune, suite gate, registration, canary."""

import json

import pytest
import torch

from vaekit.data.shards import write_shard
from vaekit.deploy.pipelines import PipelineConfig, PipelineError, run_pipeline, validate_images
from vaekit.deploy.suite import SuitePolicy
from vaekit.models import load_model
from vaekit.registry import ModelRegistry
from vaekit.training.config import load_run_config
from vaekit.training.run import train

pytestmark = pytest.mark.usefixtures("one_thread")
SUITE = SuitePolicy(parts=("elbo", "recon"), examples=300, tolerance=0.05, new_tolerance=0.02)


@pytest.fixture
def production(tmp_path, mnist):
    cfg = load_run_config(None, ["name=prod", f"out_dir={tmp_path / 'runs'}", "data.train_subset=2000",
                                 "train.epochs=5", "model.hidden_sizes=[64]", "model.latent_dim=4",
                                 "train.progress=false", "train.tensorboard=off", "train.checkpoint_every=0"])
    train(cfg)
    reg = ModelRegistry(f"sqlite:///{tmp_path / 'reg' / 'registry.db'}", actor="ci@test")
    reg.register(cfg.run_dir, "digits", alias="production", reason="first",
                 profile_images=mnist.test.images[:300].float() / 255)
    return reg


def _captured(tmp_path, mnist):
    """600 recent test images, 30 all-black ones (the brief's corrupted JPEGs) and 20 exact repeats."""
    good = mnist.test.images[1000:1600]
    images = torch.cat([good, torch.zeros(30, 1, 28, 28, dtype=torch.uint8), good[:20]])
    labels = torch.cat([mnist.test.labels[1000:1600], torch.zeros(30, dtype=torch.long),
                        mnist.test.labels[1000:1020]])
    return write_shard(tmp_path / "captured" / "shard-000000.npz", images, labels)


def test_validation_quarantines_constant_images_duplicates_and_bad_labels(mnist):
    from vaekit.data.dataset import ImageSplit

    x = torch.cat([mnist.test.images[:50], torch.full((3, 1, 28, 28), 255, dtype=torch.uint8), mnist.test.images[:2]])
    y = torch.cat([mnist.test.labels[:50], torch.zeros(3, dtype=torch.long), torch.tensor([11, 12])])
    keep, report = validate_images(ImageSplit(x, y), num_classes=10)
    assert report["quarantined"] == {"low_variance": 3, "duplicate": 0, "label_range": 2}
    assert keep.tolist() == list(range(50)) and report["kept"] == 50 and 0 < report["class_balance"] <= 1
    keep, report = validate_images(ImageSplit(x, torch.zeros_like(y)))
    assert report["quarantined"]["duplicate"] == 2  # without a class count, the repeats are what is left


def test_incremental_pipeline_fine_tunes_the_decoder_passes_the_gate_and_starts_a_canary(production, tmp_path, mnist):
    reg = production
    cfg = PipelineConfig(kind="incremental", name="digits", data=str(_captured(tmp_path, mnist)),
                         out=str(tmp_path / "pipes"), registry=reg.uri, epochs=1, suite=SUITE)
    logs = []
    state = run_pipeline(cfg, reg, log=logs.append)
    report = state["steps"]["validate"]["report"]
    assert report["quarantined"]["low_variance"] == 30 and report["quarantined"]["duplicate"] == 20
    assert state["steps"]["gate"]["passed"] and state["steps"]["register"]["ref"] == "digits/2"
    new = reg.get("digits/2")
    assert new.parent == "digits/1" and new.tags["pipeline"] == "incremental" and new.profile_data
    assert reg.aliases("digits") == {"production": 1, "canary": 2}
    assert "benchmark suite" in reg.history("digits", "canary")[-1].reason
    prod, cand = reg.load("digits/1"), load_model(new.artifact_path)
    for (name, p), q in zip(prod.named_parameters(), cand.parameters(), strict=True):
        if name.startswith(("encoder.", "to_mean.", "to_logvar.")):
            assert torch.equal(p, q), name  # lr 1e-5, encoder frozen: bit-identical
    assert any(not torch.equal(p, q) for p, q in zip(prod.decoder.parameters(), cand.decoder.parameters(),
                                                    strict=True))
    # idempotent: the same command again repeats nothing and registers nothing
    logs.clear()
    again = run_pipeline(cfg, reg, log=logs.append)
    assert json.dumps(again["steps"], sort_keys=True, default=str) == json.dumps(state["steps"], sort_keys=True,
                                                                                 default=str)
    assert len(reg.versions("digits")) == 2 and len(logs) == 5 and all("done earlier" in line for line in logs)


def test_a_degraded_candidate_is_not_registered(production, tmp_path, mnist):
    reg = production
    cfg = PipelineConfig(kind="emergency", name="digits", data=str(_captured(tmp_path, mnist)),
                         out=str(tmp_path / "pipes"), registry=reg.uri, epochs=1, lr=0.01, suite=SUITE,
                         overrides=("model.beta=50",))  # deliberately degraded: the KL term swamps the fit
    with pytest.raises(PipelineError, match="failed the benchmark suite"):
        run_pipeline(cfg, reg, log=lambda *_: None)
    assert len(reg.versions("digits")) == 1 and "canary" not in reg.aliases("digits")
    assert (cfg.folder / "gate.json").is_file()


def test_a_capture_that_is_mostly_broken_is_refused(production, tmp_path, mnist):
    black = write_shard(tmp_path / "bad.npz", torch.zeros(300, 1, 28, 28, dtype=torch.uint8),
                        torch.zeros(300, dtype=torch.long))
    cfg = PipelineConfig(kind="full", name="digits", data=str(black), out=str(tmp_path / "pipes"),
                         registry=production.uri)
    with pytest.raises(PipelineError, match="0 of 300 images are usable"):
        run_pipeline(cfg, production, log=lambda *_: None)


def test_the_cli_runs_a_pipeline_and_a_refusal_exits_2(production, tmp_path, mnist, capsys):
    from vaekit.cli.main import main

    shard = _captured(tmp_path, mnist)
    base = ["retrain", "incremental", "--name", "digits", "--data", str(shard), "--registry", production.uri,
            "--out", str(tmp_path / "cli"), "--epochs", "1", "--tolerance", "0.05", "--examples", "300"]
    assert main(base) == 0 and "digits/2 registered from digits/1" in capsys.readouterr().out
    black = write_shard(tmp_path / "black.npz", torch.zeros(200, 1, 28, 28, dtype=torch.uint8))
    assert main(["retrain", "full", "--name", "digits", "--data", str(black), "--registry", production.uri,
                 "--out", str(tmp_path / "cli")]) == 2
    assert "data validation refused" in capsys.readouterr().err
