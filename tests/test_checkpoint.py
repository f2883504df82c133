"""Checkpoints under real damage: flipped bytes, truncations, a damaged index."""

from __future__ import annotations

import json

import pytest
import torch

from vaekit.cli.main import main
from vaekit.data import ImageDataset
from vaekit.errors import CheckpointError, TrainingDivergedError
from vaekit.models import VAE, VAEConfig
from vaekit.training import Callback, DataConfig, TrainConfig, Trainer, list_checkpoints, read_metrics
from vaekit.training.checkpoint import load_checkpoint, read_header

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(mnist):
    return ImageDataset("mnist", mnist.train.subset(512), mnist.test.subset(100), mnist.classes, mnist.provenance)


def _trainer(data, run_dir, callbacks=(), **kw):
    base = dict(epochs=2, batch_size=64, checkpoint_every=5, progress=False, tensorboard="off", seed=3,
                eval_batch_size=100, keep_checkpoints=5)
    base.update(kw)
    torch.manual_seed(0)
    return Trainer(VAE(VAEConfig(latent_dim=8, hidden_sizes=(64,))), data, TrainConfig(**base),
                   data_config=DataConfig(binarize="dynamic"), run_dir=run_dir, callbacks=callbacks)


def _flip(path, where: float = 0.6) -> None:
    """Flip one bit of the file at a fraction ``where`` of its length (inside the weights)."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_caught_skipped_and_said(tiny, tmp_path):
    run = tmp_path / "r"
    _trainer(tiny, run, max_steps=10).fit()
    newest = run / "checkpoints" / "step-000000010.pt"
    _flip(newest)
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match=r"skipping checkpoint step-000000010.pt: .*corrupt: the SHA-256"):
        res = _trainer(tiny, run, max_steps=12).fit()
    assert res.resumed_from.endswith("step-000000008.pt")  # the epoch-end checkpoint before it
    skipped = [r for r in read_metrics(run / "metrics.jsonl", "event") if r["event"] == "skipped_checkpoint"]
    assert [r["file"] for r in skipped] == ["step-000000010.pt"]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl", "train")] == list(range(1, 13))


def test_a_truncated_checkpoint_says_so(tiny, tmp_path):
    run = tmp_path / "r"
    _trainer(tiny, run, max_steps=5).fit()
    path = run / "checkpoints" / "step-000000005.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or damaged: its payload has"):
        read_header(path)


def test_when_no_checkpoint_is_readable_resume_stops_and_lists_each(tiny, tmp_path):
    run = tmp_path / "r"
    _trainer(tiny, run, max_steps=10).fit()
    files = [p for _, p in list_checkpoints(run / "checkpoints")]
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [0, 5, 8, 10]
    _flip(files[0])
    _flip(files[1], 0.1)
    files[2].write_bytes(files[2].read_bytes()[:3000])
    files[3].write_bytes(b"")
    log_before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(CheckpointError) as exc:
        _trainer(tiny, run, max_steps=10).fit()
    msg = str(exc.value)
    assert "none can be read" in msg
    for p, why in zip(files, ("SHA-256", "SHA-256", "truncated", "truncated"), strict=True):
        assert f"{p.name}: " in msg and why in msg.split(p.name + ": ")[1].split("\n")[0], msg
    assert (run / "metrics.jsonl").read_bytes() == log_before, "no step is logged again from step 0"
    with pytest.raises(CheckpointError, match="none can be read"):  # a dry run makes the same check
        _trainer(tiny, run, max_steps=10).check()
    assert [p.name for _, p in list_checkpoints(run / "checkpoints")] == [p.name for p in files]


def test_divergence_never_names_a_damaged_checkpoint(tiny, tmp_path):
    class RotThenPoison(Callback):
        """After step 7 the step-5 file is damaged on disk and the weights go NaN."""

        name = "rot"

        def on_step_end(self, trainer, record):
            if record["step"] == 7:
                _flip(trainer.checkpoint_dir / "step-000000005.pt")
                with torch.no_grad():
                    trainer.model.to_mean.weight.fill_(float("nan"))

    with pytest.raises(TrainingDivergedError) as exc:
        _trainer(tiny, tmp_path / "r", [RotThenPoison()], max_steps=10).fit()
    assert exc.value.step == 8
    assert exc.value.last_checkpoint.endswith("step-000000000.pt"), exc.value.last_checkpoint
    assert "step-000000005" not in str(exc.value)


def test_checkpoints_verb_rebuilds_a_damaged_index(tiny, tmp_path, capsys):
    run = tmp_path / "r"
    _trainer(tiny, run, max_steps=16).fit()  # 8 steps per epoch: checkpoints 0, 5, 8 (epoch), 10, 15, 16
    index = run / "checkpoints" / "index.json"
    good = json.loads(index.read_text())["checkpoints"]
    index.write_text('{"checkpoints": [{"step": 0, "ki')  # torn by hand
    assert main(["checkpoints", str(run)]) == 0
    out = capsys.readouterr().out
    assert "rebuilt from 6 checkpoint file(s)" in out and "saved to" in out
    for e in good:
        assert e["file"] in out
    rebuilt = json.loads(index.read_text())["checkpoints"]
    assert [(e["step"], e["kind"], e["epoch"]) for e in rebuilt] == [(e["step"], e["kind"], e["epoch"]) for e in good]
    by_step = {e["step"]: e for e in good}
    assert rebuilt[2]["test_kl"] == by_step[8]["test_kl"] is not None, "test figures come back from the log"

    index.write_text('{"checkpoints": []}')  # valid JSON that lists nothing: rebuilt too, never an empty table
    assert main(["checkpoints", str(run)]) == 0
    assert "lists no checkpoints" in capsys.readouterr().out

    index.write_text("not json")
    for _, p in list_checkpoints(run / "checkpoints"):
        _flip(p)
    assert main(["checkpoints", str(run)]) == 2
    err = capsys.readouterr().err
    assert "cannot be rebuilt" in err and "step-000000016.pt: " in err and "SHA-256" in err
