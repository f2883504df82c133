"""The training loop: lean per step, exact on resume, safe on crashes.

``Trainer.fit`` reads as four calls: prepare (run folder, data, optimizers, resumed state),
train an epoch (each step: forward, one host sync for the loss terms, backward, optimizer
step), end the epoch (evaluate, callbacks, checkpoint), finish (final evaluation, model). What
the run folder does (lock, crash leftovers, earlier runs set aside, config revisions, the
metrics log rewound on resume) is :class:`~vaekit.training.run_folder.RunFolder`'s; the
checkpoint index is :class:`~vaekit.training.history.CheckpointHistory`'s; everything else
(KL control, collapse monitors, model selection, progress bar, TensorBoard) is a callback,
which sees the loop only as a :class:`~vaekit.training.callbacks.TrainingLoop`.

Everything random is either derived from ``(seed, epoch, batch)`` (data order, binarization)
or carried in checkpoints (the torch RNG streams, per rank), so an interrupted run resumed from
its last checkpoint finishes bit-identical on CPU to one that never stopped.
"""

from __future__ import annotations

import math
import os
import re
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from vaekit.atomic import storage_error
from vaekit.config import to_dict
from vaekit.data import LOADERS
from vaekit.data.dataset import BatchLoader, ImageDataset, ImageSplit, eval_loader, mix_seed
from vaekit.data.replay import ReplayLoader
from vaekit.data.shards import load_split
from vaekit.errors import CheckpointError, ConfigError, InputError, StorageError, TrainingDivergedError
from vaekit.evaluation.elbo import evaluate_elbo
from vaekit.models.base import BaseModel
from vaekit.training import distributed as D
from vaekit.training.callbacks import Callback, TrainingLoop, TrainState
from vaekit.training.checkpoint import (
    checkpoint_name,
    find_resumable,
    list_checkpoints,
    load_checkpoint,
    newest_verified,
    read_header,
    save_checkpoint,
)
from vaekit.training.config import DataConfig, RunConfig, TrainConfig
from vaekit.training.finetune import (
    Frozen,
    check_init_from,
    check_trainable,
    drop_frozen,
    freeze,
    init_weights,
    load_init_state,
)
from vaekit.training.history import CheckpointHistory
from vaekit.training.metrics_log import MetricsLog
from vaekit.training.reporting import reporting_callbacks, tensorboard_writer_class
from vaekit.training.run_folder import RunFolder

__all__ = ["TrainResult", "TrainState", "Trainer", "pick_device"]


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns."""

    run_dir: Path
    model_dir: Path | None
    steps: int
    epochs_completed: int
    final_eval: dict[str, Any] | None
    wall_time_s: float
    resumed_from: str | None
    stopped: str | None = None  # why training ended early (a callback asked to stop)
    # each callback's summary() by its name, e.g. "collapse": alerts and recoveries, "select": the selection
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class _Run:
    """What one call of :meth:`Trainer.fit` works with."""

    loader: BatchLoader | ReplayLoader
    test: BatchLoader | None
    net: torch.nn.Module  # the model, or its DDP wrapper
    names: list[str] = field(default_factory=list)  # the logged loss terms
    resumed: str | None = None  # the checkpoint resumed from
    final_eval: dict[str, Any] | None = None
    evaluated_at: int = -1  # step of the last evaluation (the same on every rank; only rank 0 holds results)
    last_time: float = 0.0
    init: tuple[dict[str, Any], str, str] | None = None  # train.init_from's (state, family, source) on a fresh start


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but CUDA is not available; use 'cpu' or 'auto'")
    return torch.device(name)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


class Trainer:
    """Trains a model on an :class:`ImageDataset`.

    Args:
        model: any registered model family (``forward(x)`` returns an output with ``loss``).
        dataset: train and test splits.
        config: optimization, logging and checkpoint settings.
        data_config: binarization and subsets (defaults: grey levels, full splits).
        run_dir: where checkpoints, ``metrics.jsonl`` and the final model go.
        run_config: the whole resolved config, saved in the run folder for reproducibility.
        callbacks: hooks called during training, in this order; their state is checkpointed.
            A configured run's KL control, collapse monitors and model selection come from
            :func:`vaekit.training.standard.standard_callbacks`; the progress bar and TensorBoard
            are added from ``config``.
        replay: a split mixed into every batch at ``data_config.replay_share`` (default: the
            split ``data_config.replay`` names, see :mod:`vaekit.data.replay`).

    Fine-tuning (``config.init_from``, ``config.trainable``): see :mod:`vaekit.training.finetune`.
    """

    def __init__(
        self,
        model: BaseModel,
        dataset: ImageDataset,
        config: TrainConfig | None = None,
        *,
        data_config: DataConfig | None = None,
        run_dir: str | Path = "runs/vae",
        run_config: RunConfig | None = None,
        callbacks: Sequence[Callback] = (),
        replay: ImageSplit | None = None,
    ):
        if not isinstance(model, BaseModel):
            raise InputError(f"model must be a vaekit model (BaseModel), got {type(model).__name__}")
        if not isinstance(dataset, ImageDataset):
            raise InputError(f"dataset must be an ImageDataset, got {type(dataset).__name__}")
        if tuple(dataset.image_shape) != model.input_shape:
            raise InputError(f"dataset images have shape {dataset.image_shape}, the model expects {model.input_shape}")
        self.model, self.dataset = model, dataset
        self.config = config or TrainConfig()
        if data_config is None:
            data_config = DataConfig(dataset=dataset.name) if dataset.name in LOADERS else DataConfig()
        self.data_config = data_config
        self.data_config.check_sizes(dataset)  # before anything is written
        check_trainable(model, self.config.trainable)
        check_init_from(self.config.init_from)
        self.replay = self._replay_split(replay)
        self.run_dir = Path(run_dir)
        self.folder = RunFolder(self.run_dir)
        self.run_config = run_config
        self.callbacks = list(callbacks)
        names = [c.name for c in self.callbacks]
        if len(set(names)) != len(names):
            raise InputError(f"callback names must be unique (they key checkpoint state), got {names}")
        self.reporters: list[Callback] = []  # progress bar, TensorBoard: made in fit (rank 0 only)
        self.state = TrainState()
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.dist = D.DistInfo()
        self.device = torch.device("cpu")
        self.total_steps = self.steps_per_epoch = 0
        self.last_checkpoint: Path | None = None
        self.log: MetricsLog | None = None
        self.history: CheckpointHistory | None = None
        self.branch = 0  # collapse recoveries so far: records after a recovery carry it
        self._check_inputs = True  # validate the first batch's values; the loader guarantees the rest
        self._stop_reason: str | None = None
        self._recover: tuple[int, str, Callable[[TrainingLoop], str]] | None = None
        self._last_eval: dict[str, Any] | None = None
        self._recent_kl: deque[float] = deque(maxlen=50)  # the train KL stored with a checkpoint
        self._notes: list[dict[str, Any]] = []  # events found before the log opens (skipped checkpoints, ...)
        self._frozen: Frozen | None = None  # train.trainable's frozen parts, released when the run ends

    def _replay_split(self, replay: ImageSplit | None) -> ImageSplit | None:
        dc = self.data_config
        if replay is None and dc.replay is not None:
            replay = load_split(dc.replay, data_dir=dc.data_dir, sources=dc.sources)
        if replay is None:
            return None
        if not 0 < dc.replay_share < 1:
            raise ConfigError(f"a replay split needs data.replay_share in (0, 1), got {dc.replay_share!r}")
        if tuple(replay.images.shape[1:]) != self.model.input_shape:
            raise InputError(f"replay images (data.replay={dc.replay!r}) have shape {tuple(replay.images.shape[1:])}, "
                             f"the model expects {self.model.input_shape}")
        return replay

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def hooks(self) -> list[Callback]:
        """Every callback the loop calls: the given ones, then the reporters."""
        return self.callbacks + self.reporters

    @property
    def stop_requested(self) -> str | None:
        """Why training was asked to stop (None: it was not)."""
        return self._stop_reason

    @property
    def lr(self) -> float:
        """Learning rate of the first optimizer's first parameter group."""
        return next(iter(self.optimizers.values())).param_groups[0]["lr"]

    def _config_dict(self) -> dict[str, Any] | None:
        return self.run_config.to_dict() if self.run_config is not None else None

    def _autocast(self):
        if self.config.precision == "bf16" and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def check(self, resume: bool = True) -> None:
        """Every check a real :meth:`fit` makes before it writes, without writing anything (``--dry-run``):
        the device, TensorBoard, the run folder (writable, not locked by another process, a resumed
        run's model config and data split), and a fresh fine-tune's starting weights."""
        pick_device(self.config.device)
        tensorboard_writer_class(self.config.tensorboard)
        self.folder.check(resume, self._config_dict())
        if (init := self._init_state(resume)) is not None:
            init_weights(self.model, *init)  # train.init_from's weights exist and fit the model

    # -- the loop --------------------------------------------------------------------------------
    def fit(self, resume: bool = True) -> TrainResult:
        """Train until ``epochs`` (or ``max_steps``) are done; resume from the run's newest checkpoint."""
        t_start = time.perf_counter()
        ok = False
        try:
            self._start_processes()
            run = self._prepare(resume)
            while self.state.step < self.total_steps and not self._stop_reason:
                self._train_epoch(run)
            result = self._finish(run, t_start)
            ok = True
            return result
        finally:
            self._close(ok)

    def _start_processes(self) -> None:
        """Device, process group, reporters; the run folder's lock (rank 0, held until the run ends)."""
        self.device = pick_device(self.config.device)
        self.dist = D.init_distributed(self.device.type == "cuda")
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.reporters = reporting_callbacks(self.config, self.run_dir, self.dist.is_main)
        if self.dist.is_main:
            self.folder.lock.acquire()

    def _close(self, ok: bool) -> None:
        try:
            if self.log:
                self.log.close(quiet=not ok)
            for cb in self.hooks:
                cb.close()
            if self._frozen is not None:
                self._frozen.release()
        finally:
            self.folder.lock.release()
            D.shutdown(self.dist)

    def _prepare(self, resume: bool) -> _Run:
        """Run folder, data, optimizers, callbacks, resumed state and the log: everything before step one."""
        cfg, info = self.config, self.dist
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        init = self._init_state(resume)  # before prepare: a fresh start may set its source aside
        self._notes = self.folder.prepare(resume, self._config_dict()) if info.is_main else []
        D.barrier(info)
        run = self._build()
        run.init = init
        for cb in self.hooks:
            cb.setup(self)
        torch.manual_seed(mix_seed(cfg.seed, info.rank, 0xA0))
        if info.is_main:
            self.history, notes = self.folder.open_history(cfg.keep_history)
            self._notes += notes
        run.resumed = self._resume() if resume else None
        if not run.resumed and run.init is not None:
            init_weights(self.model, *run.init)
            self._notes.append({"event": "init_from", "source": run.init[2], "trainable": self.config.trainable})
        if info.is_main:
            self._open_log(run.resumed)
        for cb in self.hooks:
            cb.on_fit_start(self)
        if not run.resumed:
            self.save_checkpoint("initial")  # the state before any step: always a place to recover to
        run.names = self._term_names(run.loader)
        run.last_time = time.perf_counter()
        return run

    def _build(self) -> _Run:
        """The model on its device, the loaders, the optimizers and the step budget."""
        cfg, dc, info = self.config, self.data_config, self.dist
        model = self.model.to(self.device).train()
        if cfg.trainable is not None:  # before DDP and the optimizers see the parameters
            self._frozen = freeze(model, cfg.trainable)
        train_split, _ = dc.train_splits(self.dataset.train)
        loader: BatchLoader | ReplayLoader
        loader = BatchLoader(train_split, cfg.batch_size, shuffle=True, binarize=dc.binarize,
                             seed=mix_seed(cfg.seed, dc.binarize_seed), drop_last=cfg.drop_last,
                             rank=info.rank, world_size=info.world_size, device=self.device)
        test = eval_loader(self.dataset.test.subset(dc.test_subset), cfg.eval_batch_size, dc.binarize,
                           dc.binarize_seed, self.device) if info.is_main else None
        net: torch.nn.Module = model
        if info.enabled:
            net = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizers = model.configure_optimizers(cfg)
        if cfg.trainable is not None:
            drop_frozen(self.optimizers)
        if self.replay is not None:
            loader = ReplayLoader(loader, self.replay, dc.replay_share, seed=mix_seed(cfg.seed, dc.binarize_seed, 0x8E))
        model.on_train_data(len(train_split))
        self.steps_per_epoch = len(loader)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        return _Run(loader, test, net)

    def _init_state(self, resume: bool) -> tuple[dict[str, Any], str, str] | None:
        """``train.init_from``'s weights when this start will not resume from a checkpoint."""
        if not self.config.init_from or (resume and list_checkpoints(self.checkpoint_dir)):
            return None
        return load_init_state(self.config.init_from, self.config.registry)

    def _open_log(self, resumed: str | None) -> None:
        """Rank 0: record the config, rewind the log and the index to where the run continues, log the start."""
        assert self.history is not None
        st = self.state
        if self.run_config is not None:
            revision = self.folder.record_config(self.run_config.to_dict(), st.step)
            if revision is not None:
                self._notes.append({"event": "config_revision", "revision": revision["revision"],
                                    "changed": revision["changed"]})
        self.log = self.folder.open_log(st.step, st.epoch, self.branch, resumed is not None)
        self.history.drop_after(st.step if resumed else -1)
        for note in self._notes:  # what was found on the way in, then the start itself
            self.log.write({"type": "event", "step": st.step, **note})
        self.log.write({"type": "event", "step": st.step, "event": "resume" if resumed else "start",
                        "checkpoint": resumed, "world_size": self.dist.world_size, "device": str(self.device)})

    def _train_epoch(self, run: _Run) -> None:
        """The rest of the current epoch: steps until its end, the budget, a stop or a recovery."""
        every = self.config.checkpoint_every
        for cb in self.hooks:
            cb.on_epoch_start(self, self.state.epoch)
        for x, y in run.loader.epoch(self.state.epoch, start=self.state.batch):
            self._after_step(self._step(run, x, y))
            if self._recover is not None:
                break
            if every and self.state.step % every == 0:
                self.save_checkpoint()
            if self.state.step >= self.total_steps or self._stop_reason:
                break
        if self._recover is not None:
            self._recover_now()
        elif self.state.batch >= self.steps_per_epoch:
            self._end_epoch(run)
        elif not every or self.state.step % every:  # stopped mid-epoch: keep where it stopped
            self.save_checkpoint()

    def _step(self, run: _Run, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """One optimizer step on the batch (x, y); returns its metrics record."""
        kwargs = self.forward_kwargs(y)
        self._check_inputs = False
        custom = self.model.custom_train_step
        with self._autocast():
            out = self.model.train_step(run.net, x, y, self.optimizers, kwargs) if custom else run.net(x, **kwargs)
        values = self._gather_terms(out, run.names)
        if not _finite(values):
            self._diverged(values)
        if not custom:
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
            out.loss.backward()
            if self.config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            for opt in self.optimizers.values():
                opt.step()
        self.state.step += 1
        self.state.batch += 1
        now = time.perf_counter()
        record = {"type": "train", "step": self.state.step, "epoch": self.state.epoch, **values, "lr": self.lr,
                  "samples_per_s": self.config.batch_size / max(now - run.last_time, 1e-9)}
        run.last_time = now
        if isinstance(run.loader, ReplayLoader):
            record["replayed"] = run.loader.last_replayed  # this rank's examples from the replay split
        if self.branch:
            record["branch"] = self.branch
        return record

    def _after_step(self, record: dict[str, Any]) -> None:
        for cb in self.hooks:
            cb.on_step_end(self, record)
        if "kl" in record:
            self._recent_kl.append(record["kl"])
        else:
            self._recent_kl.clear()
        if self.dist.is_main:
            self.log.write(record)  # type: ignore[union-attr]

    def _end_epoch(self, run: _Run) -> None:
        """Evaluate (every ``eval_every`` epochs and at the last), call the callbacks, checkpoint."""
        epoch, every = self.state.epoch, self.config.eval_every
        if every and ((epoch + 1) % every == 0 or self.state.step >= self.total_steps):
            run.final_eval = self.evaluate(run.test, epoch)
            run.evaluated_at = self.state.step
        for cb in self.hooks:
            cb.on_epoch_end(self, epoch)
        self.state.epoch += 1
        self.state.batch = 0
        self.save_checkpoint("epoch")
        if self._recover is not None:  # an epoch-end check asked for it
            self._recover_now()

    def _finish(self, run: _Run, t_start: float) -> TrainResult:
        """The callbacks' last word (e.g. the selected weights), the final evaluation, the model."""
        if any([cb.finish(self) for cb in self.hooks]):  # a list: every callback finishes
            run.evaluated_at = -1  # the weights changed: evaluate the ones saved
        if run.evaluated_at != self.state.step and self.config.eval_every:
            run.final_eval = self.evaluate(run.test, self.state.epoch)
        model_dir = self._save_model(run.final_eval) if self.dist.is_main else None
        D.barrier(self.dist)
        for cb in self.hooks:
            cb.on_fit_end(self)
        summaries = {cb.name: s for cb in self.hooks if (s := cb.summary()) is not None}
        return TrainResult(self.run_dir, model_dir, self.state.step, self.state.epoch, run.final_eval,
                           time.perf_counter() - t_start, run.resumed, self._stop_reason, summaries)

    def _term_names(self, loader: BatchLoader) -> list[str]:
        """Names of the logged loss terms, from a forward pass on two examples (RNG untouched)."""
        model = self.model
        x, y = next(loader.epoch(0))
        devices = [self.device] if self.device.type == "cuda" else []
        kwargs = {"y": y[:2]} if model.uses_labels else {}
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            was = model.training
            model.eval()  # eval mode: no running statistics (EMA codebooks, batch norm) are updated
            out = model(x[:2], **kwargs)
            model.train(was)
        return list(out.terms())

    def forward_kwargs(self, y: torch.Tensor) -> dict[str, Any]:
        """Keyword arguments of this step's forward call."""
        kwargs: dict[str, Any] = {"check": self._check_inputs}
        if self.model.uses_labels:
            kwargs["y"] = y
        for cb in self.callbacks:
            kwargs.update(cb.forward_kwargs(self))
        return kwargs

    def _gather_terms(self, out: Any, names: list[str]) -> dict[str, Any]:
        """Loss terms as floats (plus the callbacks' extra terms as lists), averaged over ranks: one host sync."""
        terms = out.terms()
        extra = [(k, t.detach().float().reshape(-1)) for cb in self.callbacks for k, t in cb.extra_terms(out).items()]
        parts = [torch.stack([terms[k].detach().float() for k in names]), *(t for _, t in extra)]
        packed = D.all_reduce_mean(torch.cat(parts), self.dist).tolist()
        values: dict[str, Any] = dict(zip(names, packed[: len(names)], strict=True))
        i = len(names)
        for k, t in extra:
            values[k], i = packed[i: i + t.numel()], i + t.numel()
        return values

    # -- what callbacks may ask for --------------------------------------------------------------
    def log_record(self, record: dict[str, Any]) -> None:
        """Write a record to the metrics log (rank 0; others ignore it)."""
        if self.dist.is_main and self.log is not None:
            if self.branch and "branch" not in record:
                record = {**record, "branch": self.branch}
            self.log.write(record)

    def request_stop(self, reason: str) -> None:
        """End training after the current step (the model is still saved)."""
        self._stop_reason = reason
        self.log_record({"type": "event", "event": "stop", "step": self.state.step, "reason": reason})

    def request_recover(self, before_step: int, reason: str, remedy: Callable[[TrainingLoop], str]) -> None:
        """After the current step, reload the newest checkpoint older than ``before_step`` and call ``remedy(self)``."""
        self._recover = (before_step, reason, remedy)

    def _recover_now(self) -> None:
        assert self._recover is not None
        before_step, reason, remedy = self._recover
        self._recover = None
        found = self._checkpoint_before(before_step)
        if found is None:
            self.request_stop(f"cannot recover: no readable checkpoint before step {before_step}; {reason}")
            return
        payload, path = found
        self._restore(payload, path, recovering=True)
        abandoned = self.state.step
        self.branch += 1
        change = remedy(self)
        self._recent_kl.clear()
        if self.dist.is_main and self.history is not None:
            self.history.abandon_after(abandoned)  # the checkpoints of the collapsed branch
        self.log_record({"type": "event", "event": "recover", "step": self.state.step, "from_checkpoint": str(path),
                         "reason": reason, "change": change})
        self.last_checkpoint = path
        D.barrier(self.dist)

    def _checkpoint_before(self, step: int) -> tuple[dict[str, Any], Path] | None:
        """The newest readable checkpoint older than ``step`` (every rank reads the same files, so
        all make the same choice)."""
        for _, path in reversed([(s, p) for s, p in list_checkpoints(self.checkpoint_dir) if s < step]):
            try:
                return load_checkpoint(path), path
            except CheckpointError as exc:  # every rank skips the same files
                if self.dist.is_main:
                    warnings.warn(f"recovery: skipping checkpoint {path.name}: {exc}", stacklevel=3)
                self.log_record({"type": "event", "event": "skipped_checkpoint", "step": self.state.step,
                                 "file": path.name, "reason": str(exc)})
        return None

    # -- checkpoints -----------------------------------------------------------------------------
    def _checkpoint_payload(self) -> dict[str, Any]:
        rngs = D.gather_objects(_rng_state(self.device), self.dist)
        return {
            "step": self.state.step, "epoch": self.state.epoch, "batch": self.state.batch,
            "world_size": self.dist.world_size,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizers": {k: opt.state_dict() for k, opt in self.optimizers.items()},
            "rng": rngs,
            "callbacks": {c.name: c.state_dict() for c in self.callbacks},
            "branch": self.branch,
            "config": self.run_config.to_dict() if self.run_config else {"train": to_dict(self.config)},
        }

    def save_checkpoint(self, kind: str = "step") -> Path | None:
        """Write a checkpoint of the current state and index it (rank 0 writes; every rank must call).

        ``kind`` is ``initial``, ``step``, ``epoch`` or ``final``; epoch checkpoints form the
        run's history (see :mod:`vaekit.training.history`).
        """
        payload = self._checkpoint_payload()
        if self.dist.is_main and self.history is not None:
            step = self.state.step
            self.history.record({"step": step, "epoch": self.state.epoch, "kind": kind, "file": checkpoint_name(step),
                                 "branch": self.branch, **self._health(step)})
            try:
                self.last_checkpoint = save_checkpoint(self.checkpoint_dir, step, payload,
                                                       self.config.keep_checkpoints, self.history.protected_steps())
            except StorageError as exc:
                good = newest_verified(self.checkpoint_dir)
                raise StorageError(f"{exc}; training stopped at step {step}; newest complete checkpoint: "
                                   f"{good if good else 'none'}", exc.errno, exc.filename) from exc
            self.history.sync()
            if self.log:
                self.log.flush()
        return self.last_checkpoint

    def _health(self, step: int) -> dict[str, Any]:
        """Figures stored with a checkpoint in the index: what is known at ``step``."""
        out: dict[str, Any] = {"train_kl": sum(self._recent_kl) / len(self._recent_kl) if self._recent_kl else None}
        ev = self._last_eval
        fresh = ev is not None and ev.get("step") == step
        for k in ("loss", "recon", "kl", "neg_elbo"):
            out[f"test_{k}"] = ev.get(k) if fresh else None
        for cb in self.callbacks:
            out.update(cb.checkpoint_fields())
        return out

    def _resume(self) -> str | None:
        found, skipped = find_resumable(self.checkpoint_dir)  # CheckpointError when none is readable
        for path, why in skipped:
            if self.dist.is_main:
                warnings.warn(f"skipping checkpoint {path.name}: {why}", stacklevel=4)
                self._notes.append({"event": "skipped_checkpoint", "file": path.name, "reason": why})
        if found is None:
            return None
        payload, path = found
        self._restore(payload, path)
        self.branch = payload.get("branch", 0)
        self.last_checkpoint = path
        return str(path)

    def _restore(self, payload: dict[str, Any], path: Path, *, recovering: bool = False) -> None:
        """Load model, optimizers, step counters, this rank's RNG streams and callback state from a
        checkpoint payload. A collapse recovery (``recovering``) leaves the callbacks that set
        ``keep_state_on_recover`` as they are."""
        try:
            self.model.load_state_dict(payload["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"{path} does not match this model: {exc}") from exc
        saved = payload["optimizers"]
        if set(saved) != set(self.optimizers):
            raise CheckpointError(f"{path} holds optimizers {sorted(saved)}, this model uses {sorted(self.optimizers)}")
        for k, opt in self.optimizers.items():
            opt.load_state_dict(saved[k])
        self.state = TrainState(payload["step"], payload["epoch"], payload["batch"])
        rngs = payload["rng"]
        if payload.get("world_size") == self.dist.world_size and len(rngs) == self.dist.world_size:
            _set_rng_state(rngs[self.dist.rank], self.device)
        else:
            warnings.warn(f"{path} was written by {payload.get('world_size')} process(es), this run has "
                          f"{self.dist.world_size}: resuming with fresh noise streams (not bit-exact)", stacklevel=3)
            torch.manual_seed(mix_seed(self.config.seed, self.dist.rank, self.state.step))
        for cb in self.callbacks:
            if cb.name in payload.get("callbacks", {}) and not (recovering and cb.keep_state_on_recover):
                cb.load_state_dict(payload["callbacks"][cb.name])

    def _good_checkpoint(self) -> str | None:
        """The newest checkpoint of this run whose checksum verifies (never a damaged one)."""
        if self.last_checkpoint is not None:
            try:
                read_header(self.last_checkpoint)
                return str(self.last_checkpoint)
            except CheckpointError:
                pass
        good = newest_verified(self.checkpoint_dir, at_most=self.state.step)
        return str(good) if good else None

    def _diverged(self, values: dict[str, float]) -> None:
        step = self.state.step + 1
        good = self._good_checkpoint()
        if self.log:
            scalars = {k: v for k, v in values.items() if not isinstance(v, list)}
            self.log.write({"type": "event", "step": step, "event": "diverged", **scalars, "checkpoint": good})
            self.log.flush()
        scalars = {k: v for k, v in values.items() if not isinstance(v, list)}
        raise TrainingDivergedError(step, scalars, good)

    # -- evaluation and the saved model ----------------------------------------------------------
    def evaluate(self, test: BatchLoader | None, epoch: int) -> dict[str, Any] | None:
        """Test-split ELBO breakdown (rank 0), logged as an ``eval`` record."""
        result = None
        if self.dist.is_main and test is not None:
            dtype = torch.bfloat16 if self.config.precision == "bf16" and self.device.type == "cuda" else None
            seed = mix_seed(self.config.seed, 0xE5)
            result = evaluate_elbo(self.model, test.epoch(0), seed=seed, autocast_dtype=dtype)
            record = {"type": "eval", "step": self.state.step, "epoch": epoch,
                      **({"branch": self.branch} if self.branch else {}),
                      **{k: v for k, v in result.items() if k != "kl_per_dim"}, "kl_per_dim": result.get("kl_per_dim")}
            for cb in self.hooks:
                cb.on_eval_end(self, record)
            self._last_eval = record
            assert self.log is not None
            self.log.write(record)
            self.log.flush()
        D.barrier(self.dist)
        return result

    def _save_model(self, final_eval: dict[str, Any] | None) -> Path:
        meta = {"data": to_dict(self.data_config), "train": to_dict(self.config), "steps": self.state.step,
                "dataset_provenance": self.dataset.provenance}
        metrics: dict[str, Any] | None = {"test": final_eval, "step": self.state.step} if final_eval else None
        for cb in self.callbacks:
            if extra := cb.model_metadata():
                meta.update(extra)
                metrics = {**(metrics or {}), **extra}
        path = self.run_dir / "model"
        try:
            return self.model.save(path, metadata=meta, metrics=metrics)
        except Exception as exc:  # safetensors reports an OS failure as its own error, "... (os error 28)"
            found = re.search(r"os error (\d+)", str(exc))
            if not isinstance(exc, StorageError) and found is None:
                raise
            if not isinstance(exc, StorageError):
                code = int(found.group(1))
                exc = storage_error(OSError(code, os.strerror(code)), path, "write the model")
            raise StorageError(f"{exc}; the trained weights are in checkpoint {self._good_checkpoint()}: the same "
                               f"command resumes from it and saves the model", exc.errno, exc.filename) from exc


def _finite(values: dict[str, Any]) -> bool:
    return all(math.isfinite(v) for v in values.values() if not isinstance(v, list))
