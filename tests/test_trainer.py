import json

import pytest
import torch
from helpers import Crash

from vaekit.errors import CheckpointError, TrainingDivergedError
from vaekit.models import VAE, VAEConfig
from vaekit.training import Callback, DataConfig, TrainConfig, Trainer, list_checkpoints, read_metrics


class Counter(Callback):
    """A stateful callback: its state must survive resume."""

    name = "counter"

    def __init__(self):
        self.steps = 0

    def on_step_end(self, trainer, record):
        self.steps += 1
        record["counter"] = self.steps

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def _cfg(**kw):
    base = dict(epochs=2, batch_size=64, checkpoint_every=7, progress=False, tensorboard="off", seed=3,
                eval_batch_size=500)
    base.update(kw)
    return TrainConfig(**base)


def _model():
    torch.manual_seed(0)
    return VAE(VAEConfig(latent_dim=8, hidden_sizes=(64,)))


def _trainer(data, run_dir, callbacks=(), **kw):
    return Trainer(_model(), data, _cfg(**kw), data_config=DataConfig(binarize="dynamic"), run_dir=run_dir,
                   callbacks=callbacks)


def test_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(mnist_small, tmp_path):
    ref = _trainer(mnist_small, tmp_path / "ref", [Counter()])
    ref_result = ref.fit()
    steps = ref_result.steps
    assert steps == 2 * 32

    counter = Counter()
    crashing = _trainer(mnist_small, tmp_path / "run", [Crash(45), counter])  # mid-epoch 2, last checkpoint at 42
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    assert [s for s, _ in list_checkpoints(tmp_path / "run" / "checkpoints")][-1] == 42

    counter2 = Counter()
    resumed = _trainer(mnist_small, tmp_path / "run", [counter2])
    result = resumed.fit()
    assert result.resumed_from and result.resumed_from.endswith("step-000000042.pt")
    for (k, a), (_, b) in zip(ref.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{k} differs after resume"
    assert counter2.steps == steps, "callback state must resume"
    assert result.final_eval == ref_result.final_eval

    # the metrics log holds each step once, with the same values as the uninterrupted run
    a = [r for r in read_metrics(tmp_path / "ref" / "metrics.jsonl", "train")]
    b = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl", "train")]
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl", "eval")) == 2


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(mnist_small, tmp_path):
    class Poison(Callback):
        name = "poison"

        def on_step_end(self, trainer, record):
            if record["step"] == 10:  # corrupt the weights: the next forward gives NaN
                with torch.no_grad():
                    trainer.model.to_mean.weight.fill_(float("nan"))

    t = _trainer(mnist_small, tmp_path / "nan", [Poison()])
    with pytest.raises(TrainingDivergedError) as exc:
        t.fit()
    err = exc.value
    assert err.step == 11 and "step 11" in str(err)
    assert err.last_checkpoint and err.last_checkpoint.endswith("step-000000007.pt")
    ckpts = [s for s, _ in list_checkpoints(tmp_path / "nan" / "checkpoints")]
    assert ckpts == [0, 7], "no checkpoint is written from a diverged state (0 is the initial one)"
    events = read_metrics(tmp_path / "nan" / "metrics.jsonl", "event")
    assert events[-1]["event"] == "diverged" and events[-1]["step"] == 11
    assert not (tmp_path / "nan" / "model").exists()


def test_checkpoints_are_pruned_and_max_steps_stops_early(mnist_small, tmp_path):
    t = _trainer(mnist_small, tmp_path / "r", keep_checkpoints=2, max_steps=20, epochs=5)
    res = t.fit()
    assert res.steps == 20
    assert [s for s, _ in list_checkpoints(tmp_path / "r" / "checkpoints")] == [0, 14, 20]  # 0: initial, kept
    assert (tmp_path / "r" / "model" / "model.safetensors").is_file()
    metrics = json.loads((tmp_path / "r" / "model" / "metrics.json").read_text())
    assert metrics["test"]["n"] == 500
    # a second fit with a larger budget continues from step 20
    t2 = _trainer(mnist_small, tmp_path / "r", keep_checkpoints=2, max_steps=30, epochs=5)
    assert t2.fit().resumed_from.endswith("step-000000020.pt")
    assert t2.state.step == 30


def test_corrupt_newest_checkpoint_falls_back_to_previous(mnist_small, tmp_path):
    t = _trainer(mnist_small, tmp_path / "r", max_steps=14, epochs=1)
    t.fit()
    newest = tmp_path / "r" / "checkpoints" / "step-000000014.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    t2 = _trainer(mnist_small, tmp_path / "r", max_steps=14, epochs=1)
    assert t2.fit().resumed_from.endswith("step-000000007.pt")


def test_resume_refuses_a_different_model(mnist_small, tmp_path):
    from vaekit.training.config import load_run_config
    from vaekit.training.run import train

    cfg = load_run_config(None, [f"out_dir={tmp_path}", "name=x", "train.max_steps=3", "train.progress=false",
                                 "model.hidden_sizes=[16]", "train.tensorboard=off"])
    train(cfg, dataset=mnist_small)
    other = load_run_config(None, [f"out_dir={tmp_path}", "name=x", "train.max_steps=3", "train.progress=false",
                                   "model.hidden_sizes=[32]", "train.tensorboard=off"])
    with pytest.raises(CheckpointError, match="different model"):
        train(other, dataset=mnist_small)


def test_step_records_hold_loss_terms_and_throughput(mnist_small, tmp_path):
    _trainer(mnist_small, tmp_path / "r", max_steps=5, epochs=1).fit()
    rec = read_metrics(tmp_path / "r" / "metrics.jsonl", "train")[-1]
    for key in ("loss", "recon", "kl", "lr", "samples_per_s", "step", "epoch"):
        assert key in rec
    assert rec["loss"] == pytest.approx(rec["recon"] + rec["kl"], rel=1e-5)


def test_starting_afresh_keeps_the_earlier_run_in_previous(mnist_small, tmp_path):
    """--no-resume over an older, longer run: the older run's checkpoints, log and model move to
    previous/1 (never deleted), and a later resume continues the new run, not the old."""
    _trainer(mnist_small, tmp_path, max_steps=20).fit()
    old_log = (tmp_path / "metrics.jsonl").read_bytes()
    old_weights = (tmp_path / "model" / "model.safetensors").read_bytes()
    with pytest.warns(UserWarning, match="previous/1"):
        fresh = _trainer(mnist_small, tmp_path, max_steps=10).fit(resume=False)
    assert fresh.steps == 10
    steps = [s for s, _ in list_checkpoints(tmp_path / "checkpoints")]
    assert max(steps) == 10, steps
    prev = tmp_path / "previous" / "1"
    assert 20 in [s for s, _ in list_checkpoints(prev / "checkpoints")]
    assert (prev / "metrics.jsonl").read_bytes() == old_log
    assert (prev / "model" / "model.safetensors").read_bytes() == old_weights
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl", "train")] == list(range(1, 11))
    again = _trainer(mnist_small, tmp_path, max_steps=12).fit()
    assert again.resumed_from.endswith("step-000000010.pt") and again.steps == 12
    with pytest.warns(UserWarning, match="previous/2"):  # a second fresh start: previous/1 stays as it was
        _trainer(mnist_small, tmp_path, max_steps=5).fit(resume=False)
    assert (prev / "metrics.jsonl").read_bytes() == old_log
    assert 12 in [s for s, _ in list_checkpoints(tmp_path / "previous" / "2" / "checkpoints")]


def test_nothing_to_resume_from_keeps_the_earlier_results_aside(mnist_small, tmp_path):
    """Checkpoints gone but a log and a model left: a new start must not append to the old log."""
    import shutil

    _trainer(mnist_small, tmp_path, max_steps=10).fit()
    shutil.rmtree(tmp_path / "checkpoints")
    with pytest.warns(UserWarning, match="nothing to resume from.*previous/1"):
        res = _trainer(mnist_small, tmp_path, max_steps=5).fit()
    assert res.resumed_from is None and res.steps == 5
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl", "train")] == [1, 2, 3, 4, 5]
    assert len(read_metrics(tmp_path / "previous" / "1" / "metrics.jsonl", "train")) == 10
    assert (tmp_path / "previous" / "1" / "model" / "model.safetensors").is_file()
