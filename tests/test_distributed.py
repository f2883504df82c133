"""Data-parallel training under torchrun: 2 CPU processes (gloo) on a small real-MNIST subset."""

import json
import os
import subprocess
import sys

from vaekit.training import read_metrics

COMMON = [
    "data.train_subset=2048", "data.test_subset=1000", "train.epochs=2", "train.batch_size=64",
    "train.checkpoint_every=10", "train.progress=false", "train.tensorboard=off", "train.threads=1",
    "model.hidden_sizes=[128]", "model.latent_dim=8", "train.seed=11",
]
# Same data order, same global batch, same init; only the per-rank noise streams differ
# (and float summation order), so losses agree up to Monte Carlo noise of the 1-sample ELBO.
TOLERANCE = 0.02  # relative difference of the final test -ELBO


def _run(args, nproc=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [a for kv in args for a in ("--set", kv)]
    cmd = [sys.executable, "-m", "vaekit.cli.main", "train", *args]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "vaekit.cli.main", "train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _final(run_dir):
    return json.loads((run_dir / "model" / "metrics.json").read_text())["test"]


def test_two_process_ddp_matches_single_process_and_resumes(tmp_path):
    _run([*COMMON, f"out_dir={tmp_path}", "name=single"])
    # DDP run stopped after 40 of 64 steps, then resumed to the end (as after a crash)
    _run([*COMMON, f"out_dir={tmp_path}", "name=ddp", "train.max_steps=40"], nproc=2)
    proc = _run([*COMMON, f"out_dir={tmp_path}", "name=ddp"], nproc=2)
    assert "resumed from" in proc.stdout

    single, ddp = _final(tmp_path / "single"), _final(tmp_path / "ddp")
    rel = abs(ddp["neg_elbo"] - single["neg_elbo"]) / single["neg_elbo"]
    assert rel < TOLERANCE, (single["neg_elbo"], ddp["neg_elbo"])

    train = read_metrics(tmp_path / "ddp" / "metrics.jsonl", "train")
    assert [r["step"] for r in train] == list(range(1, 65)), "rank 0 alone logs, each step once"
    events = read_metrics(tmp_path / "ddp" / "metrics.jsonl", "event")
    assert events[0]["world_size"] == 2 and events[-1]["event"] == "resume"
    first_single = read_metrics(tmp_path / "single" / "metrics.jsonl", "train")[0]["loss"]
    assert abs(train[0]["loss"] - first_single) / first_single < 0.01, "step-1 loss is the global-batch mean"


def test_model_selection_under_ddp_agrees_across_ranks(tmp_path):
    """Rank 0 scores and broadcasts: every rank restores the same weights, and the run ends (a
    disagreement would leave the ranks waiting at different barriers)."""
    proc = _run([*COMMON, f"out_dir={tmp_path}", "name=sel", "data.validation=500", "select.metric=val_loss",
                 "select.every_steps=10", "select.samples=500"], nproc=2)
    assert "selected: the weights of step" in proc.stdout
    meta = json.loads((tmp_path / "sel" / "model" / "config.json").read_text())["metadata"]["selected"]
    steps = [r["step"] for r in read_metrics(tmp_path / "sel" / "metrics.jsonl", "train") if "select_val_loss" in r]
    assert steps == [10, 20, 30, 40, 50] and meta["metric"] == "val_loss"  # 1,548 examples: 2 x 25 steps
    assert meta["best_step"] in steps
