"""Fine-tuning entry points: init_from, trainable parameter groups, a replay share, shards."""

from __future__ import annotations

import math
from itertools import chain

import pytest
import torch
from helpers import Crash

from vaekit.cli.main import main
from vaekit.data import BatchLoader, ImageSplit
from vaekit.data.replay import ReplayLoader
from vaekit.data.shards import load_shards, load_split, next_shard_path, read_shard, write_shard
from vaekit.errors import CheckpointError, ConfigError, DataError, RegistryLookupError
from vaekit.models import MODEL_REGISTRY, build_model, load_model
from vaekit.models.aae import AAEConfig
from vaekit.models.base import model_config_from_dict, read_model_doc
from vaekit.models.cvae import CVAEConfig
from vaekit.models.pixel_vae import PixelVAEConfig
from vaekit.models.tcvae import TCVAEConfig
from vaekit.models.vae import VAEConfig
from vaekit.models.vqvae import VQVAEConfig
from vaekit.training import DataConfig, RunConfig, TrainConfig, Trainer, read_metrics
from vaekit.training.monitors import MonitorConfig
from vaekit.training.run import prepare

pytestmark = pytest.mark.usefixtures("one_thread")

_VQ = {"hidden_channels": 16, "residual_channels": 8, "codebook_size": 16, "code_dim": 8, "prior_dim": 16,
       "prior_layers": 1, "prior_heads": 2}
FROZEN_CASES = {  # (model config, trainable groups): every family that declares groups
    "vae-decoder": (VAEConfig(latent_dim=4, hidden_sizes=(32,), likelihood="gaussian", learn_sigma=True), ["decoder"]),
    "vae-encoder": (VAEConfig(latent_dim=4, hidden_sizes=(32,)), ["encoder"]),
    "tcvae-decoder": (TCVAEConfig(latent_dim=4, hidden_sizes=(32,), dataset_size=1000), ["decoder"]),
    "cvae-decoder": (CVAEConfig(latent_dim=4, hidden_sizes=(32,), learned_prior=True), ["decoder"]),
    "pixel-vae-decoder": (PixelVAEConfig(latent_dim=4, conv_channels=(8,), encoder_hidden=(16,), decoder_hidden=(16,),
                                         ar_kernel=5, ar_channels=8, ar_hidden=(8,)), ["decoder"]),
    # the EMA codebook with a restart at every step: frozen, it must not move at all
    "vqvae-ema-decoder": (VQVAEConfig(**_VQ, dead_code_steps=1), ["decoder"]),
    "vqvae-loss-encoder": (VQVAEConfig(**_VQ, codebook_update="loss"), ["encoder"]),
}


def _state(model):
    return {n: t.detach().clone() for n, t in chain(model.named_parameters(), model.named_buffers())}


def test_every_parameter_of_a_family_with_groups_is_in_exactly_one_group():
    for family in MODEL_REGISTRY:
        model = build_model(model_config_from_dict({"family": family}))
        groups = model.parameter_groups()
        if not groups:
            assert family == "aae"  # its three-phase step trains each part with its own optimizer
            continue
        names = [n for names in groups.values() for n in names]
        assert len(names) == len(set(names)), family
        assert {n for n, _ in model.named_parameters()} <= set(names), family


@pytest.mark.parametrize("case", sorted(FROZEN_CASES))
def test_frozen_groups_stay_bitwise_unchanged_after_100_steps(case, mnist_small, tmp_path):
    cfg, trainable = FROZEN_CASES[case]
    torch.manual_seed(0)
    model = build_model(cfg)
    groups = model.parameter_groups()
    before = _state(model)
    tc = TrainConfig(epochs=1, max_steps=100, batch_size=20, lr=1e-3, trainable=tuple(trainable), checkpoint_every=0,
                     eval_every=0, progress=False, tensorboard="off", threads=1)
    res = Trainer(model, mnist_small, tc, run_dir=tmp_path / "run").fit()
    assert res.steps == 100
    after = _state(model)
    frozen = [n for g, names in groups.items() if g not in trainable for n in names]
    assert frozen, case
    for n in frozen:
        assert torch.equal(before[n], after[n].to(before[n].device)), f"{case}: frozen {n} changed"
    trained = [n for g in trainable for n in groups[g] if n in dict(model.named_parameters())]
    assert any(not torch.equal(before[n], after[n]) for n in trained), f"{case}: nothing trained"
    assert all(p.requires_grad for p in model.parameters()), "after the run the model is whole again"
    # the saved model holds the same frozen weights
    saved = load_model(res.model_dir).state_dict()
    assert all(torch.equal(before[n], saved[n]) for n in frozen if n in saved)


def test_the_frozen_parts_are_out_of_the_optimizer_and_the_codebook_moves_when_trained(mnist_small, tmp_path):
    torch.manual_seed(0)
    model = build_model(VQVAEConfig(**_VQ, dead_code_steps=1))
    codebook = model.quantizer.codebook.clone()
    tc = TrainConfig(epochs=1, max_steps=10, batch_size=20, trainable=("decoder", "codebook"), checkpoint_every=0,
                     eval_every=0, progress=False, tensorboard="off", threads=1)
    t = Trainer(model, mnist_small, tc, run_dir=tmp_path / "run")
    t.fit()
    assert not torch.equal(codebook, model.quantizer.codebook), "a trainable EMA codebook moves (the control)"
    optimized = {id(p) for opt in t.optimizers.values() for g in opt.param_groups for p in g["params"]}
    decoder = {id(p) for p in model.decoder.parameters()}
    assert optimized == decoder, "only the decoder's parameters are optimized (the EMA codebook has none)"


def test_trainable_names_are_checked_against_the_family(mnist_small, tmp_path):
    with pytest.raises(ConfigError, match=r"not parameter groups of 'vae'; its groups are \['decoder', 'encoder'\]"):
        Trainer(build_model(VAEConfig(latent_dim=2, hidden_sizes=(8,))), mnist_small,
                TrainConfig(trainable=("codebook",)), run_dir=tmp_path / "a")
    with pytest.raises(ConfigError, match="'aae' declares no parameter groups"):
        Trainer(build_model(AAEConfig(latent_dim=2, hidden_sizes=(8,), disc_hidden=(8,))), mnist_small,
                TrainConfig(trainable=("decoder",)), run_dir=tmp_path / "b")
    with pytest.raises(ConfigError, match="neither an existing run or model folder nor a registry reference"):
        Trainer(build_model(VAEConfig(latent_dim=2, hidden_sizes=(8,))), mnist_small,
                TrainConfig(init_from=str(tmp_path / "missing")), run_dir=tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "abc"), "refused before anything is written"


# -- replay ------------------------------------------------------------------------------------------
def _blank(n: int, value: int, label: int) -> ImageSplit:
    return ImageSplit(torch.full((n, 1, 28, 28), value, dtype=torch.uint8), torch.full((n,), label))


@pytest.mark.parametrize("share", [0.1, 0.3])
def test_replay_share_served_is_the_configured_one_within_binomial_error(share):
    replay = ImageSplit(torch.arange(200, dtype=torch.uint8)[:, None, None, None].expand(200, 1, 28, 28).clone() + 50,
                        torch.full((200,), 7))
    loader = ReplayLoader(BatchLoader(_blank(3000, 0, 0), 64, seed=1), replay, share, seed=5)
    served = replayed = 0
    drawn = torch.zeros(200)
    for epoch in range(4):
        for x, y in loader.epoch(epoch):
            is_replay = x.flatten(1).amax(1) > 0
            assert loader.last_replayed == int(is_replay.sum())
            assert (y[is_replay] == 7).all() and (y[~is_replay] == 0).all(), "labels travel with their images"
            drawn += torch.bincount((x[is_replay, 0, 0, 0] * 255).round().long() - 50, minlength=200)
            served += x.shape[0]
            replayed += int(is_replay.sum())
    sigma = math.sqrt(served * share * (1 - share))
    assert abs(replayed - served * share) < 4 * sigma, (replayed, served * share, sigma)
    # uniform over the replay split: a chi-square test of the counts (199 degrees of freedom)
    expected = replayed / 200
    chi2 = float(((drawn - expected) ** 2 / expected).sum())
    assert chi2 < 199 + 4 * math.sqrt(2 * 199), chi2


def test_replay_batches_are_a_function_of_seed_epoch_and_batch():
    replay = _blank(50, 255, 1)
    a = ReplayLoader(BatchLoader(_blank(640, 0, 0), 64, seed=1, binarize="dynamic"), replay, 0.5, seed=2)
    b = ReplayLoader(BatchLoader(_blank(640, 0, 0), 64, seed=1, binarize="dynamic"), replay, 0.5, seed=2)
    full = [x for x, _ in a.epoch(1)]
    resumed = [x for x, _ in b.epoch(1, start=6)]
    assert all(torch.equal(p, q) for p, q in zip(full[6:], resumed, strict=True))
    other = ReplayLoader(BatchLoader(_blank(640, 0, 0), 64, seed=1), replay, 0.5, seed=3)
    assert any(not torch.equal(p, q) for p, (q, _) in zip(full, other.epoch(1), strict=True))


# -- shards ------------------------------------------------------------------------------------------
def test_shards_round_trip_and_a_damaged_one_is_refused(mnist_small, tmp_path):
    folder = tmp_path / "captured"
    test = mnist_small.test
    for i in range(3):
        write_shard(next_shard_path(folder), test.images[i * 100: (i + 1) * 100], test.labels[i * 100: (i + 1) * 100])
    assert sorted(p.name for p in folder.iterdir()) == [f"shard-00000{i}.npz" for i in range(3)]
    split = load_shards(folder)
    assert torch.equal(split.images, test.images[:300]) and torch.equal(split.labels, test.labels[:300])
    assert torch.equal(load_split(str(folder)).images, split.images)
    unlabelled = read_shard(write_shard(tmp_path / "u.npz", test.images[:5, 0]))  # (N, H, W): one channel
    assert unlabelled.images.shape == (5, 1, 28, 28) and (unlabelled.labels == -1).all()
    blob = bytearray((folder / "shard-000001.npz").read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte inside the images array
    (folder / "shard-000001.npz").write_bytes(bytes(blob))
    with pytest.raises(DataError, match="shard-000001.npz"):
        load_shards(folder)
    write_shard(folder / "shard-000001.npz", torch.zeros(4, 1, 14, 14, dtype=torch.uint8))
    with pytest.raises(DataError, match="different shapes"):
        load_shards(folder)
    assert len(load_split("mnist:test")) == 10000
    with pytest.raises(ConfigError, match="neither a dataset"):
        load_split("no-such-thing")


# -- a fine-tune end to end ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source(mnist_small, tmp_path_factory):
    """A VAE trained 20 steps: the weights fine-tunes start from (its run folder)."""
    run = tmp_path_factory.mktemp("source") / "run"
    torch.manual_seed(0)
    tc = TrainConfig(epochs=1, max_steps=20, batch_size=64, checkpoint_every=0, eval_every=0, progress=False,
                     tensorboard="off", threads=1)
    Trainer(build_model(VAEConfig(latent_dim=8, hidden_sizes=(64,))), mnist_small, tc, run_dir=run).fit()
    return run


def _finetune_config(tmp_path, name, source, shards, **train):
    tc = dict(epochs=2, max_steps=40, batch_size=64, lr=1e-4, checkpoint_every=6, eval_batch_size=250, progress=False,
              tensorboard="off", threads=1, seed=3, init_from=str(source), trainable=("decoder",))
    tc.update(train)
    return RunConfig(name=name, out_dir=str(tmp_path), model=VAEConfig(latent_dim=8, hidden_sizes=(64,)),
                     data=DataConfig(binarize="dynamic", replay=str(shards), replay_share=0.25),
                     train=TrainConfig(**tc), monitor=MonitorConfig(samples=200))


def _shards(mnist, folder):
    for i in range(2):  # images the fine-tune's training split does not hold (mnist_small is the first 2000)
        write_shard(next_shard_path(folder), mnist.train.images[5000 + 150 * i: 5150 + 150 * i],
                    mnist.train.labels[5000 + 150 * i: 5150 + 150 * i])
    return folder


def test_a_finetune_crashed_midway_resumes_bit_exact(mnist, mnist_small, source, tmp_path):
    shards = _shards(mnist, tmp_path / "shards")
    ref = prepare(_finetune_config(tmp_path, "ref", source, shards), dataset=mnist_small)
    ref_res = ref.fit()
    with pytest.raises(KeyboardInterrupt):
        prepare(_finetune_config(tmp_path, "run", source, shards), dataset=mnist_small, callbacks=[Crash(22)]).fit()
    resumed = prepare(_finetune_config(tmp_path, "run", source, shards), dataset=mnist_small)
    res = resumed.fit()
    assert res.resumed_from and res.resumed_from.endswith("step-000000018.pt") and res.steps == ref_res.steps == 40
    for (k, a), (_, b) in zip(ref.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    ra = [{k: v for k, v in r.items() if k != "samples_per_s"} for r in read_metrics(tmp_path / "ref/metrics.jsonl",
                                                                                      "train")]
    rb = [{k: v for k, v in r.items() if k != "samples_per_s"} for r in read_metrics(tmp_path / "run/metrics.jsonl",
                                                                                      "train")]
    assert ra == rb
    # started from the source's weights, encoder untouched; a quarter of the examples were replay ones
    src = load_model(source / "model").state_dict()
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, src[k]) == k.startswith(("encoder.", "to_mean.", "to_logvar.")), k
    served, replayed = 40 * 64, sum(r["replayed"] for r in ra)
    assert abs(replayed - 0.25 * served) < 4 * math.sqrt(served * 0.25 * 0.75)
    events = [e for e in read_metrics(tmp_path / "run/metrics.jsonl", "event") if e["event"] == "init_from"]
    assert len(events) == 1 and events[0]["source"] == str(source / "model"), "init_from applies once, not on resume"
    # a resume that changes the frozen parts is refused
    with pytest.raises(CheckpointError, match="train.trainable"):
        prepare(_finetune_config(tmp_path, "run", source, shards, trainable=("encoder",), max_steps=50),
                dataset=mnist_small).fit()


def test_cli_finetune_at_lr_1e5_leaves_the_encoder_bit_identical(source, tmp_path, capsys):
    out = tmp_path / "runs"
    args = ["train", "--set", "model.latent_dim=8", "--set", "model.hidden_sizes=[64]", "--set", f"out_dir={out}",
            "--set", "name=ft", "--set", "data.train_subset=2000", "--set", "data.test_subset=500",
            "--set", "train.max_steps=30", "--set", "train.lr=1e-5", "--set", "train.threads=1",
            "--set", "train.progress=false", "--set", "train.tensorboard=off", "--set", "monitor.samples=200",
            "--init-from", str(source), "--trainable", "decoder"]  # = --set train.init_from=... train.trainable=[...]
    assert main(args + ["--dry-run"]) == 0
    assert not (out / "ft").exists()
    assert main(args) == 0
    assert "trainable:\n  - decoder" in capsys.readouterr().out  # the resolved config shows it
    src, tuned = load_model(source / "model").state_dict(), load_model(out / "ft" / "model").state_dict()
    encoder = [k for k in src if k.startswith(("encoder.", "to_mean.", "to_logvar."))]
    assert encoder and all(torch.equal(src[k], tuned[k]) for k in encoder)
    assert any(not torch.equal(src[k], tuned[k]) for k in src if k.startswith("decoder."))


def test_init_from_a_registry_reference_uses_the_version_the_alias_named(source, mnist_small, tmp_path, monkeypatch):
    from vaekit.registry import ModelRegistry

    monkeypatch.delenv("VAEKIT_REGISTRY", raising=False)
    uri = f"sqlite:///{tmp_path / 'reg' / 'registry.db'}"
    registry = ModelRegistry(uri)
    registry.register(source, "digits", alias="production", reason="the source run", profile=False)
    shards = _shards_from(mnist_small, tmp_path / "shards")
    config = _finetune_config(tmp_path, "ft", "digits@production", shards, registry=uri, max_steps=4)
    trainer = prepare(config, dataset=mnist_small)
    trainer.fit()
    event = next(e for e in read_metrics(tmp_path / "ft/metrics.jsonl", "event") if e["event"] == "init_from")
    assert event["source"].startswith("digits/1 (digits@production, ")
    registered = registry.load("digits@production").state_dict()
    assert all(torch.equal(registered[k], v) for k, v in trainer.model.state_dict().items()
               if k.startswith(("encoder.", "to_mean.", "to_logvar.")))
    with pytest.raises(RegistryLookupError):
        prepare(_finetune_config(tmp_path, "ft2", "digits@canary", shards, registry=uri), dataset=mnist_small).fit()


def _shards_from(data, folder):
    write_shard(next_shard_path(folder), data.test.images[:200], data.test.labels[:200])
    return folder


def test_data_train_data_trains_on_shards_and_keeps_the_dataset_test_split(mnist, mnist_small, source, tmp_path):
    shards = _shards(mnist, tmp_path / "captured")  # 300 images
    config = _finetune_config(tmp_path, "captured", source, "mnist:test", max_steps=None, epochs=1)
    config.data.train_data = str(shards)
    trainer = prepare(config, dataset=mnist_small)
    assert torch.equal(trainer.dataset.train.images, load_shards(shards).images)
    assert trainer.dataset.test is mnist_small.test
    res = trainer.fit()
    assert res.steps == 5  # ceil(300 / 64): an epoch is the shards
    assert ("train: " + str(shards)) in read_model_doc(res.model_dir)["metadata"]["dataset_provenance"]


@pytest.mark.slow
def test_a_finetune_killed_with_sigkill_resumes_bit_exact(mnist, source, tmp_path):
    """A real ``vaekit train`` process killed -9 once it has written a step checkpoint, resumed by the
    same command: the weights equal an uninterrupted run's, wherever the kill landed."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    shards = _shards(mnist, tmp_path / "shards")
    sets = ["model.latent_dim=8", "model.hidden_sizes=[64]", f"out_dir={tmp_path}", "data.train_subset=2000",
            "data.test_subset=500", "data.binarize=dynamic", f"data.replay={shards}", "data.replay_share=0.25",
            "train.max_steps=60", "train.checkpoint_every=5", "train.lr=1e-4", "train.threads=1",
            "train.progress=false", "train.tensorboard=off", "monitor.samples=200", f"train.init_from={source}",
            "train.trainable=[decoder]"]
    args = [a for s in sets for a in ("--set", s)]
    assert main(["train", *args, "--set", "name=ref"]) == 0
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vaekit.cli.main", "train", *args, "--set", "name=run"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = tmp_path / "run" / "checkpoints"
    deadline = time.monotonic() + 300
    while not any(p.name != "step-000000000.pt" for p in ckpts.glob("step-*.pt")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no step checkpoint in 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert main(["train", *args, "--set", "name=run"]) == 0
    events = [e["event"] for e in read_metrics(tmp_path / "run" / "metrics.jsonl", "event")]
    assert "resume" in events, events
    ref, run = load_model(tmp_path / "ref" / "model").state_dict(), load_model(tmp_path / "run" / "model").state_dict()
    assert all(torch.equal(ref[k], run[k]) for k in ref)
