"""The run folder under real faults: a second process, kill -9, crash leftovers, a read-only or full disk.

The tmpfs tests mount a real, tiny file system (root only; they skip elsewhere).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from vaekit.cli.main import main
from vaekit.data import ImageDataset
from vaekit.errors import CheckpointError, RunLockedError, StorageError
from vaekit.models import VAE, VAEConfig
from vaekit.training import Callback, DataConfig, TrainConfig, Trainer, list_checkpoints, read_metrics
from vaekit.training.checkpoint import load_checkpoint
from vaekit.training.config import load_run_config
from vaekit.training.run import train
from vaekit.training.run_folder import HOLDER, REVISIONS

pytestmark = pytest.mark.usefixtures("one_thread")
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def tiny(mnist):
    return ImageDataset("mnist", mnist.train.subset(512), mnist.test.subset(100), mnist.classes, mnist.provenance)


def _cfg(**kw):
    base = dict(epochs=2, batch_size=64, checkpoint_every=2, progress=False, tensorboard="off", seed=3,
                eval_batch_size=100, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _trainer(data, run_dir, callbacks=(), **kw):
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=8, hidden_sizes=(64,)))
    return Trainer(model, data, _cfg(**kw), data_config=DataConfig(binarize="dynamic"), run_dir=run_dir,
                   callbacks=callbacks)


# a second process that trains the same run as _trainer(tiny, RUN) and then, still holding the lock,
# sleeps at step 3 ("hold") or rewrites step 4's checkpoint in a loop ("rewrite")
HOLDER_SCRIPT = textwrap.dedent("""
    import pathlib, sys, time
    import torch
    from vaekit.data import ImageDataset, load_dataset
    from vaekit.models import VAE, VAEConfig
    from vaekit.training import Callback, DataConfig, TrainConfig, Trainer

    class Hold(Callback):
        name = "hold"
        def on_step_end(self, trainer, record):
            if record["step"] == 3:
                pathlib.Path(sys.argv[2]).write_text("holding")
                time.sleep(600)

    class Rewriter(Trainer):  # once step 4's checkpoint is written, writes it again and again
        def save_checkpoint(self, kind="step"):
            path = super().save_checkpoint(kind)
            if self.state.step == 4:
                pathlib.Path(sys.argv[2]).write_text("rewriting")
                while True:
                    super().save_checkpoint(kind)
            return path

    torch.set_num_threads(1)
    m = load_dataset("mnist")
    data = ImageDataset("mnist", m.train.subset(512), m.test.subset(100), m.classes, m.provenance)
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=8, hidden_sizes=(64,)))
    cfg = TrainConfig(epochs=2, batch_size=64, checkpoint_every=2, progress=False, tensorboard="off", seed=3,
                      eval_batch_size=100, threads=1)
    if sys.argv[3] == "hold":
        Trainer(model, data, cfg, data_config=DataConfig(binarize="dynamic"), run_dir=sys.argv[1],
                callbacks=[Hold()]).fit()
    else:
        Rewriter(model, data, cfg, data_config=DataConfig(binarize="dynamic"), run_dir=sys.argv[1]).fit()
""")


def _start_holder(tmp_path: Path, run_dir: Path, mode: str = "hold") -> subprocess.Popen:
    script, ready = tmp_path / "holder.py", tmp_path / "ready"
    script.write_text(HOLDER_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir), str(ready), mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not ready.exists():
        if proc.poll() is not None:
            pytest.fail(f"the holder process ended early: {proc.stdout.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the holder process did not get ready in 180 s")
        time.sleep(0.1)
    return proc


def test_second_writer_fails_at_once_and_a_killed_holder_is_taken_over(tiny, tmp_path, capsys):
    """Two real processes on one run folder; then kill -9 of the holder and a bit-exact resume."""
    ref = _trainer(tiny, tmp_path / "ref")
    ref.fit()
    run_dir = tmp_path / "run"
    proc = _start_holder(tmp_path, run_dir)
    try:
        before = {p.name: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
        t0 = time.monotonic()
        with pytest.raises(RunLockedError) as exc:
            _trainer(tiny, run_dir).fit()
        assert time.monotonic() - t0 < 5, "a second writer must fail at once, not wait"
        msg = str(exc.value)
        assert f"pid {proc.pid}" in msg and socket.gethostname() in msg, msg
        assert exc.value.holder["pid"] == proc.pid
        after = {p.name: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
        assert after == before, "the refused process wrote nothing into the folder"
        # the CLI says it in one line and exits 2
        sets = [f"out_dir={tmp_path}", "name=run", "train.progress=false", "train.tensorboard=off"]
        assert main(["train"] + [a for s in sets for a in ("--set", s)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"pid {proc.pid}" in err and "being trained by another process" in err
    finally:
        proc.send_signal(signal.SIGKILL)  # a real kill -9: no clean-up runs in the holder
        proc.wait(timeout=30)
    assert json.loads((run_dir / HOLDER).read_text())["pid"] == proc.pid, "a killed holder leaves its lock.json"

    with pytest.warns(UserWarning, match=rf"stale lock of pid {proc.pid}.*no longer running"):
        resumed = _trainer(tiny, run_dir)
        result = resumed.fit()
    assert result.resumed_from.endswith("step-000000002.pt")
    assert not (run_dir / HOLDER).exists(), "lock.json is removed when the run ends"
    for (k, a), (_, b) in zip(ref.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{k} differs after a kill -9 and resume"
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl", "train")]
    assert steps == list(range(1, result.steps + 1))


def test_kill_9_during_a_checkpoint_write_resumes_bit_exact_and_cleans_up(tiny, tmp_path):
    ref = _trainer(tiny, tmp_path / "ref")
    ref.fit()
    run_dir = tmp_path / "run"
    proc = _start_holder(tmp_path, run_dir, "rewrite")
    ckpt = run_dir / "checkpoints"
    try:
        deadline = time.monotonic() + 30
        while not any(p.name.startswith(".step-000000004.pt.") for p in ckpt.iterdir()):
            assert time.monotonic() < deadline, "no checkpoint write seen in 30 s"
        proc.send_signal(signal.SIGKILL)  # while the temp file of a write is there
    finally:
        proc.kill()
        proc.wait(timeout=30)
    left = [p.name for p in ckpt.iterdir() if p.name.endswith(".tmp")]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        resumed = _trainer(tiny, run_dir)
        result = resumed.fit()
    if left:  # the kill landed inside the write (nearly always: the write takes milliseconds)
        assert any("temporary file(s) left by an interrupted run" in str(w.message) for w in seen)
    assert not [p for p in ckpt.iterdir() if p.name.endswith(".tmp")]
    assert result.resumed_from.endswith("step-000000004.pt")
    for (k, a), (_, b) in zip(ref.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{k} differs after a kill -9 during a checkpoint write"
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl", "train")] == list(range(1, result.steps + 1))


def test_crash_leftovers_are_removed_at_the_next_start(tiny, tmp_path):
    run_dir = tmp_path / "r"
    _trainer(tiny, run_dir, max_steps=4).fit()
    # what a process killed mid-write leaves: the atomic writers' temporaries, named as they name them
    ckpt = run_dir / "checkpoints"
    (ckpt / ".step-000000006.pt.k2j4h5.tmp").write_bytes((ckpt / "step-000000004.pt").read_bytes()[:5000])
    (ckpt / ".index.json.a1b2c3.tmp").write_text('{"checkp')
    (run_dir / ".metrics.jsonl.x9y8z7.tmp").write_text('{"type": "train"')
    (run_dir / ".model.q1w2e3").mkdir()
    (run_dir / ".model.q1w2e3" / "model.safetensors").write_bytes(b"\0" * 100)
    (run_dir / ".model.old").mkdir()
    with pytest.warns(UserWarning, match="removed 5 temporary file"):
        _trainer(tiny, run_dir, max_steps=6).fit()
    left = sorted(p.name for d in (run_dir, ckpt) for p in d.iterdir() if p.name.startswith("."))
    assert left == [".lock"], left
    events = [r for r in read_metrics(run_dir / "metrics.jsonl", "event") if r["event"] == "cleaned"]
    assert len(events) == 1 and len(events[0]["removed"]) == 5


def _run_cfg(tmp_path, *extra):
    return load_run_config(None, [f"out_dir={tmp_path}", "name=rev", "train.progress=false",
                                  "train.tensorboard=off", "model.hidden_sizes=[32]", "model.latent_dim=4",
                                  "train.checkpoint_every=5", "train.threads=1", *extra])


def test_a_changed_setting_on_resume_is_a_new_config_revision(tiny, tmp_path):
    train(_run_cfg(tmp_path, "train.max_steps=10", "train.batch_size=64"), dataset=tiny)
    run_dir = tmp_path / "rev"
    first = json.loads((run_dir / "config.json").read_text())
    train(_run_cfg(tmp_path, "train.max_steps=20", "train.batch_size=32", "data.binarize=dynamic"), dataset=tiny)
    revs = json.loads((run_dir / REVISIONS).read_text())["revisions"]
    assert [r["revision"] for r in revs] == [1, 2]
    assert revs[0]["config"] == first and revs[0]["from_step"] == 0, "how the first part trained is kept"
    assert revs[1]["from_step"] == 10
    assert revs[1]["changed"] == {"train.batch_size": [64, 32], "data.binarize": ["none", "dynamic"],
                                  "train.max_steps": [10, 20]}
    assert json.loads((run_dir / "config.json").read_text())["train"]["batch_size"] == 32
    events = [r for r in read_metrics(run_dir / "metrics.jsonl", "event") if r["event"] == "config_revision"]
    assert events and events[0]["revision"] == 2
    # the same settings again: no new revision
    train(_run_cfg(tmp_path, "train.max_steps=20", "train.batch_size=32", "data.binarize=dynamic"), dataset=tiny)
    assert len(json.loads((run_dir / REVISIONS).read_text())["revisions"]) == 2
    # a change that is not allowed is refused, and nothing is recorded
    with pytest.raises(CheckpointError, match="different split"):
        train(_run_cfg(tmp_path, "train.max_steps=25", "train.batch_size=32", "data.binarize=dynamic",
                       "data.train_subset=256"), dataset=tiny)
    assert len(json.loads((run_dir / REVISIONS).read_text())["revisions"]) == 2


@contextmanager
def _tmpfs(path: Path, size: str, readonly: bool = False):
    """A real tmpfs of ``size`` mounted at ``path`` (skips where it cannot be mounted: not root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def unwritable(tmp_path):
    """A folder this process cannot write into: a read-only tmpfs as root, a 0o555 folder otherwise."""
    if os.geteuid() == 0:
        with _tmpfs(tmp_path / "ro", "1m", readonly=True) as p:
            yield p
    else:
        p = tmp_path / "ro"
        p.mkdir()
        p.chmod(0o555)
        yield p
        p.chmod(0o755)


def test_unwritable_out_dir_is_one_line_naming_the_path(unwritable, capsys, mnist):
    sets = [f"out_dir={unwritable}/runs", "name=x", "train.max_steps=2", "train.progress=false",
            "train.tensorboard=off", "data.train_subset=256", "data.test_subset=64"]
    argv = ["train"] + [a for s in sets for a in ("--set", s)]
    for extra in (["--dry-run"], []):  # the dry run makes the same check
        assert main(argv + extra) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"{unwritable}/runs" in err, err
        assert "read-only file system" in err or "permission denied" in err, err
    assert not (unwritable / "runs").exists()


class FillDisk(Callback):
    """Fills the file system of the run folder (a real file, written until the OS says ENOSPC)."""

    name = "fill"

    def __init__(self, at_step: int, filler: Path):
        self.at_step, self.filler = at_step, filler

    def on_step_end(self, trainer, record):
        if record["step"] == self.at_step:
            with open(self.filler, "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * (1 << 16))
                        f.flush()
                except OSError:
                    pass


def test_full_disk_during_a_checkpoint_says_no_space_left_first(tiny, tmp_path):
    with _tmpfs(tmp_path / "fs", "8m") as fs:
        run_dir = fs / "run"
        t = _trainer(tiny, run_dir, [FillDisk(3, fs / "filler")], checkpoint_every=5)
        with pytest.raises(StorageError) as exc:
            t.fit()
        msg = str(exc.value)
        assert msg.startswith("no space left on device: cannot write checkpoint"), msg
        assert "step-000000005.pt" in msg and "newest complete checkpoint: " in msg and "step-000000000.pt" in msg
        assert "\n" not in msg
        ckpt = run_dir / "checkpoints"
        assert [s for s, _ in list_checkpoints(ckpt)] == [0]
        assert not [p for p in ckpt.iterdir() if p.name.endswith(".tmp")], "no half-written temp file left"
        load_checkpoint(ckpt / "step-000000000.pt")  # the earlier checkpoint is intact
        (fs / "filler").unlink()
        again = _trainer(tiny, run_dir, checkpoint_every=5).fit()
        assert again.resumed_from.endswith("step-000000000.pt") and again.steps == 16


def test_unwritable_output_path_is_refused_before_any_work(unwritable, tmp_path, capsys):
    for verb in ("sample", "reconstruct"):
        assert main([verb, str(tmp_path / "no-model"), "-o", str(unwritable / "out" / "g.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and str(unwritable / "out" / "g.png") in err, err
        assert "read-only file system" in err or "permission denied" in err, err


class FillAtEnd(FillDisk):
    """Fills the disk at the final evaluation (step 12, after the last checkpoint, before the model save)."""

    def on_step_end(self, trainer, record):
        pass

    def on_eval_end(self, trainer, record):
        if record["step"] == 12:
            super().on_step_end(trainer, {"step": self.at_step})


def test_full_disk_during_the_model_save_says_no_space_left_first(tiny, tmp_path):
    with _tmpfs(tmp_path / "fs", "8m") as fs:
        run_dir = fs / "run"
        with pytest.raises(StorageError) as exc:
            _trainer(tiny, run_dir, [FillAtEnd(0, fs / "filler")], checkpoint_every=0, max_steps=12).fit()
        msg = str(exc.value)
        assert msg.startswith(f"no space left on device: cannot write {run_dir / 'model'}"), msg
        assert "the trained weights are in checkpoint" in msg and "step-000000012.pt" in msg and "\n" not in msg
        assert not (run_dir / "model").exists() and not list(run_dir.glob(".model.*"))
        (fs / "filler").unlink()
        again = _trainer(tiny, run_dir, checkpoint_every=0, max_steps=12).fit()
        assert again.resumed_from.endswith("step-000000012.pt") and (run_dir / "model" / "model.safetensors").is_file()
