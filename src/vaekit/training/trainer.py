"""The training loop: lean per step, exact on resume, safe on crashes.

Per step: forward, one host sync for the loss terms (logging and the NaN guard),
backward, optimizer step. Everything random is either derived from
``(seed, epoch, batch)`` (data order, binarization) or carried in checkpoints (the
torch RNG streams, per rank), so an interrupted run resumed from its last
checkpoint finishes bit-identical on CPU to one that never stopped.
"""

from __future__ import annotations

import math
import os
import re
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from vaekit.atomic import storage_error
from vaekit.config import to_dict
from vaekit.data import LOADERS
from vaekit.data.dataset import BatchLoader, ImageDataset, ImageSplit, eval_loader, mix_seed
from vaekit.errors import CheckpointError, ConfigError, InputError, StorageError, TrainingDivergedError
from vaekit.evaluation.elbo import evaluate_elbo
from vaekit.models.base import BaseModel
from vaekit.training import distributed as D
from vaekit.training.callbacks import Callback
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
from vaekit.training.history import CheckpointHistory
from vaekit.training.metrics_log import MetricsLog
from vaekit.training.monitors import CollapseMonitor, KLController, MonitorConfig
from vaekit.training.run_folder import RunFolder, check_writable
from vaekit.training.schedules import KLConfig
from vaekit.training.selection import BestModelSelector, SelectConfig, check_selectable


@dataclass
class TrainState:
    """Where training stands: ``step`` optimizer steps done; the next batch is ``batch`` of ``epoch``."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


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
    stopped: str | None = None  # why training ended early (a collapse with monitor.on_collapse=stop)
    recoveries: int = 0  # collapse recoveries made
    alerts: list[dict[str, Any]] | None = None  # collapse alerts: cause, step, onset, action
    selected: dict[str, Any] | None = None  # model selection: metric, best step and value, every check


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
        callbacks: hooks called during training; their state is checkpointed.
        kl: KL schedule, free bits and floor (default: constant weight ``model.config.beta``).
        monitor: posterior-collapse monitors and the response to an alert.
        select: model selection on ``data_config.validation`` held-out training examples: the
            best weights by ``select.metric`` are the ones evaluated and saved at the end.
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
        kl: KLConfig | None = None,
        monitor: MonitorConfig | None = None,
        select: SelectConfig | None = None,
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
        self.run_dir = Path(run_dir)
        self.folder = RunFolder(self.run_dir)
        self.run_config = run_config
        self.user_callbacks = list(callbacks)
        self.callbacks = list(callbacks)
        self.kl_config = kl or (run_config.kl if run_config else KLConfig())
        self.monitor_config = monitor or (run_config.monitor if run_config else MonitorConfig())
        self.select_config = select or (run_config.select if run_config else SelectConfig())
        if self.select_config.enabled and not self.data_config.validation:
            raise ConfigError(f"select.metric={self.select_config.metric!r} scores on a validation split: "
                              f"set data.validation to the number of training examples to hold out (e.g. 5000)")
        if self.select_config.enabled:
            check_selectable(model, self.select_config)
        self.data_config.check_sizes(dataset)  # before anything is written
        self.selector: BestModelSelector | None = None
        self.kl_controller: KLController | None = None
        self.monitor: CollapseMonitor | None = None
        names = [c.name for c in self.callbacks]
        if len(set(names)) != len(names):
            raise InputError(f"callback names must be unique (they key checkpoint state), got {names}")
        self.state = TrainState()
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.dist = D.DistInfo()
        self.device = torch.device("cpu")
        self.last_checkpoint: Path | None = None
        self.log: MetricsLog | None = None
        self._tb: Any = None
        self._check_inputs = True  # validate the first batch's values; the loader guarantees the rest
        self.branch = 0  # collapse recoveries so far: records after a recovery carry it
        self._stop_reason: str | None = None
        self._recover: tuple[int, str, Any] | None = None
        self._last_eval: dict[str, Any] | None = None
        self._recent_kl: list[float] = []
        self.history: CheckpointHistory | None = None
        self._notes: list[dict[str, Any]] = []  # events found before the log opens (skipped checkpoints, ...)

    # -- set-up ----------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def _autocast(self):
        if self.config.precision == "bf16" and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def check(self, resume: bool = True) -> None:
        """Every check a real :meth:`fit` makes before it writes, without writing anything (``--dry-run``):
        the device, TensorBoard, the run folder (writable, not locked by another process, a resumed
        run's model config and data split)."""
        pick_device(self.config.device)
        if self.config.tensorboard == "on":
            try:
                import torch.utils.tensorboard  # noqa: F401
            except ImportError:
                raise ConfigError("train.tensorboard is 'on' but tensorboard is not installed "
                                  "(pip install 'vaekit[tensorboard]')") from None
        check_writable(self.run_dir)
        if resume and not self._sets_aside(resume):
            if self.run_config is not None:
                self.folder.check_compatible(self.run_config.to_dict())
            find_resumable(self.checkpoint_dir)  # CheckpointError when checkpoints exist but none is readable

    def _sets_aside(self, resume: bool) -> bool:
        """Does this start move an earlier run into previous/? (a fresh start, or nothing to resume from)"""
        return not resume or (not list_checkpoints(self.checkpoint_dir) and self.folder.has_results())

    def _prepare_folder(self, resume: bool) -> None:
        """Rank 0, lock held: remove crash leftovers, set an earlier run aside when starting afresh,
        refuse a resume that changes the model or the data split."""
        self._notes = []
        removed = self.folder.clean_temporaries()
        if removed:
            self._notes.append({"event": "cleaned", "removed": [str(p.relative_to(self.run_dir)) for p in removed]})
        if self._sets_aside(resume) and (aside := self.folder.set_aside()) is not None:
            why = "starting afresh" if not resume else "nothing to resume from (no checkpoint)"
            warnings.warn(f"{why}: the earlier run in {self.run_dir} (checkpoints, metrics log, model) "
                          f"was moved to {aside}", stacklevel=4)
            self._notes.append({"event": "set_aside", "to": str(aside)})
        if resume and self.run_config is not None:
            self.folder.check_compatible(self.run_config.to_dict())

    def _open_tensorboard(self) -> None:
        if self.config.tensorboard == "off":
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if self.config.tensorboard == "on":
                raise ConfigError("train.tensorboard is 'on' but tensorboard is not installed "
                                  "(pip install 'vaekit[tensorboard]')") from None
            return
        self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

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
        latest = self.monitor.latest if self.monitor else None
        out["au"] = latest["au"] if latest else None
        out["mi"] = latest["mi"] if latest else None
        out["latent_step"] = latest["step"] if latest else None
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

    # -- the loop --------------------------------------------------------------------------------
    def fit(self, resume: bool = True) -> TrainResult:
        """Train until ``epochs`` (or ``max_steps``) are done; resume from the run's newest checkpoint."""
        t_start = time.perf_counter()
        cfg = self.config
        self.device = pick_device(cfg.device)
        self.dist = D.init_distributed(self.device.type == "cuda")
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        ok = False
        try:
            if self.dist.is_main:
                self.folder.lock.acquire()  # one writer per run folder, held until the run ends
            result = self._fit(resume, t_start)
            ok = True
            return result
        finally:
            try:
                if self.log:
                    self.log.close(quiet=not ok)
                if self._tb is not None:
                    self._tb.close()
            finally:
                self.folder.lock.release()
                D.shutdown(self.dist)

    def _fit(self, resume: bool, t_start: float) -> TrainResult:
        cfg, dc, info = self.config, self.data_config, self.dist
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if info.is_main:
            self._prepare_folder(resume)
        D.barrier(info)
        model = self.model.to(self.device).train()
        train_split, validation = dc.train_splits(self.dataset.train)
        loader = BatchLoader(train_split, cfg.batch_size, shuffle=True, binarize=dc.binarize,
                             seed=mix_seed(cfg.seed, dc.binarize_seed), drop_last=cfg.drop_last,
                             rank=info.rank, world_size=info.world_size, device=self.device)
        test = eval_loader(self.dataset.test.subset(dc.test_subset), cfg.eval_batch_size, dc.binarize,
                           dc.binarize_seed, self.device) if info.is_main else None
        net: torch.nn.Module = model
        if info.enabled:
            net = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizers = model.configure_optimizers(cfg)
        model.on_train_data(len(train_split))
        steps_per_epoch = len(loader)
        total = cfg.epochs * steps_per_epoch
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        self._setup_dynamics(model, total, steps_per_epoch, validation)
        torch.manual_seed(mix_seed(cfg.seed, info.rank, 0xA0))
        if info.is_main:
            self.history = CheckpointHistory(self.checkpoint_dir, cfg.keep_history)
            if self.history.problem is not None:
                warnings.warn(f"{self.checkpoint_dir / 'index.json'} {self.history.problem}: rebuilt from "
                              f"{len(self.history.entries)} checkpoint file(s)", stacklevel=3)
                self._notes.append({"event": "index_rebuilt", "problem": self.history.problem})
        resumed = self._resume() if resume else None
        if info.is_main:
            if self.run_config is not None:
                revision = self.folder.record_config(self.run_config.to_dict(), self.state.step)
                if revision is not None:
                    self._notes.append({"event": "config_revision", "revision": revision["revision"],
                                        "changed": revision["changed"]})
            self.log = MetricsLog(self.run_dir / "metrics.jsonl")
            assert self.history is not None
            if resumed:
                st, branch = self.state, self.branch
                self.log.truncate(lambda r: r.get("branch", 0) < branch or (
                    r.get("step", 0) <= st.step if r.get("type") != "eval" else r.get("epoch", 0) < st.epoch))
                self.history.drop_after(st.step)
            else:
                self.log.truncate(lambda r: False)  # an earlier run's log was set aside; a torn start's is void
                self.history.drop_after(-1)
            self._open_tensorboard()
            for note in self._notes:  # what was found on the way in, then the start itself
                self.log.write({"type": "event", "step": self.state.step, **note})
            self.log.write({"type": "event", "step": self.state.step, "event": "resume" if resumed else "start",
                            "checkpoint": resumed, "world_size": info.world_size, "device": str(self.device)})
        for cb in self.callbacks:
            cb.on_fit_start(self)
        if not resumed:
            self.save_checkpoint("initial")  # the state before any step: always a place to recover to

        final_eval: dict[str, Any] | None = None
        evaluated_at = -1  # step of the last evaluation (the same on every rank; only rank 0 holds results)
        show = cfg.progress and info.is_main
        names = list(self._term_names(model, loader))
        last_time = time.perf_counter()

        while self.state.step < total:
            epoch = self.state.epoch
            bar = _progress(show, steps_per_epoch, self.state.batch, f"epoch {epoch + 1}/{cfg.epochs}")
            for x, y in loader.epoch(epoch, start=self.state.batch):
                values = self._step(net, x, y, names)
                self.state.step += 1
                self.state.batch += 1
                now = time.perf_counter()
                record = {"type": "train", "step": self.state.step, "epoch": epoch, **values,
                          "lr": self.lr,
                          "samples_per_s": cfg.batch_size / max(now - last_time, 1e-9)}
                last_time = now
                if self.branch:
                    record["branch"] = self.branch
                for cb in self.callbacks:
                    cb.on_step_end(self, record)
                self._recent_kl = (self._recent_kl + [values["kl"]])[-50:] if "kl" in values else []
                if info.is_main:
                    self.log.write(record)  # type: ignore[union-attr]
                    if self._tb is not None:
                        for k, v in record.items():
                            if k not in ("type", "step", "epoch") and isinstance(v, int | float):
                                self._tb.add_scalar(f"train/{k}", v, self.state.step)
                    if bar is not None:
                        bar.update(1)
                        if self.state.step % 20 == 0:
                            bar.set_postfix({k: f"{values[k]:.2f}" for k in names[:4]}, refresh=False)
                if self._recover is not None:
                    break
                if cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if self.state.step >= total or self._stop_reason:
                    break
            if bar is not None:
                bar.close()
            if self._recover is not None:
                self._recover_now()
                continue
            if self.state.batch >= steps_per_epoch:  # the epoch is complete
                if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or self.state.step >= total):
                    final_eval = self.evaluate(test, epoch)
                    evaluated_at = self.state.step
                for cb in self.callbacks:
                    cb.on_epoch_end(self, epoch)
                self.state.epoch += 1
                self.state.batch = 0
                self.save_checkpoint("epoch")
                if self._recover is not None:  # an epoch-end check asked for it
                    self._recover_now()
                    continue
            elif (self.state.step >= total or self._stop_reason) and (
                    not cfg.checkpoint_every or self.state.step % cfg.checkpoint_every):
                self.save_checkpoint()
            if self._stop_reason:
                break

        if self.selector is not None and self.selector.finish(self):
            evaluated_at = -1  # the best weights came before the last step: evaluate those
        if evaluated_at != self.state.step and cfg.eval_every:
            final_eval = self.evaluate(test, self.state.epoch)
        model_dir = self._save_model(final_eval) if info.is_main else None
        D.barrier(info)
        for cb in self.callbacks:
            cb.on_fit_end(self)
        return TrainResult(self.run_dir, model_dir, self.state.step, self.state.epoch, final_eval,
                           time.perf_counter() - t_start, resumed, self._stop_reason,
                           self.monitor.recoveries if self.monitor else 0,
                           list(self.monitor.alerts) if self.monitor else [],
                           self.selector.summary if self.selector else None)

    def _term_names(self, model: BaseModel, loader: BatchLoader) -> list[str]:
        """Names of the logged loss terms, from a forward pass on two examples (RNG untouched)."""
        x, y = next(loader.epoch(0))
        devices = [self.device] if self.device.type == "cuda" else []
        kwargs = {"y": y[:2]} if model.uses_labels else {}
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            was = model.training
            model.eval()  # eval mode: no running statistics (EMA codebooks, batch norm) are updated
            out = model(x[:2], **kwargs)
            model.train(was)
        return list(out.terms())

    @property
    def lr(self) -> float:
        """Learning rate of the first optimizer's first parameter group."""
        return next(iter(self.optimizers.values())).param_groups[0]["lr"]

    def forward_kwargs(self, y: torch.Tensor) -> dict[str, Any]:
        """Keyword arguments of this step's forward call."""
        kwargs: dict[str, Any] = {"check": self._check_inputs}
        if self.model.uses_labels:
            kwargs["y"] = y
        for cb in self.callbacks:
            kwargs.update(cb.forward_kwargs(self))
        return kwargs

    def _step(self, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]) -> dict[str, float]:
        kwargs = self.forward_kwargs(y)
        self._check_inputs = False
        if self.model.custom_train_step:
            with self._autocast():
                out = self.model.train_step(net, x, y, self.optimizers, kwargs)
            values = self._gather_terms(out, names)
            if not _finite(values):
                self._diverged(values)
            return values
        with self._autocast():
            out = net(x, **kwargs)
        values = self._gather_terms(out, names)
        if not _finite(values):
            self._diverged(values)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        for opt in self.optimizers.values():
            opt.step()
        return values

    def _gather_terms(self, out: Any, names: list[str]) -> dict[str, Any]:
        """Loss terms as floats (plus the KL per dimension when monitored), averaged over ranks: one host sync."""
        terms = out.terms()
        parts = [torch.stack([terms[k].detach().float() for k in names])]
        per_dim = getattr(out, "kl_per_dim", None) if self.monitor_config.log_kl_per_dim else None
        if per_dim is not None:
            parts.append(per_dim.detach().float().reshape(-1))
        packed = D.all_reduce_mean(torch.cat(parts), self.dist).tolist()
        values: dict[str, Any] = dict(zip(names, packed[: len(names)], strict=True))
        if per_dim is not None:
            values["kl_per_dim"] = packed[len(names):]
        return values

    # -- training dynamics: KL control and collapse monitors ------------------------------------------
    def _setup_dynamics(self, model: BaseModel, total: int, steps_per_epoch: int,
                        validation: ImageSplit | None) -> None:
        """Create the KL controller, the collapse monitor and the model selector (internal callbacks,
        checkpointed); the selector scores on ``validation``."""
        internal: list[Callback] = []
        if model.supports_kl_control:
            beta = float(getattr(model.config, "beta", 1.0))
            self.kl_controller = KLController(self.kl_config, beta, total, steps_per_epoch)
            internal.append(self.kl_controller)
        elif not self.kl_config.is_default:
            raise ConfigError(f"model family {model.family!r} has no Gaussian KL term: kl.* settings do not apply")
        mc = self.monitor_config
        if mc.enabled and model.supports_kl_control:
            dc = self.data_config
            held = self.dataset.test.subset(min(mc.samples, len(self.dataset.test)))
            seed = mix_seed(dc.binarize_seed, 0x4D)
            x, y = next(eval_loader(held, len(held), dc.binarize, seed, self.device).epoch(0))
            self.monitor = CollapseMonitor(mc, x, y, seed=self.config.seed)
            internal.append(self.monitor)
        elif mc.enabled and mc.on_collapse != "warn":
            raise ConfigError(f"monitor.on_collapse={mc.on_collapse!r} needs a model with a Gaussian posterior; "
                              f"{model.family!r} has none (set monitor.enabled=false)")
        last: list[Callback] = []
        if self.select_config.enabled:
            assert validation is not None  # __init__ checked data.validation
            n = min(self.select_config.samples, len(validation))  # a prefix of the held-out draw: uniform too
            seed = mix_seed(self.data_config.binarize_seed, 0x5E)
            x, y = next(eval_loader(validation.subset(n), n, self.data_config.binarize, seed, self.device).epoch(0))
            self.selector = BestModelSelector(self.select_config, x, y)
            last.append(self.selector)  # after the user's callbacks: it scores the weights a step ends with
        self.callbacks = internal + self.user_callbacks + last

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

    def request_recover(self, before_step: int, reason: str, remedy: Any) -> None:
        """After the current step, reload the newest checkpoint older than ``before_step`` and call ``remedy(self)``."""
        self._recover = (before_step, reason, remedy)

    def _recover_now(self) -> None:
        assert self._recover is not None
        before_step, reason, remedy = self._recover
        self._recover = None
        # every rank reads the same files, so all make the same choice
        candidates = [(s, p) for s, p in list_checkpoints(self.checkpoint_dir) if s < before_step]
        if not candidates:
            self.request_stop(f"cannot recover: no checkpoint before step {before_step}; {reason}")
            return
        for _, path in reversed(candidates):
            try:
                payload = load_checkpoint(path)
                break
            except CheckpointError as exc:  # every rank skips the same files
                if self.dist.is_main:
                    warnings.warn(f"recovery: skipping checkpoint {path.name}: {exc}", stacklevel=2)
                self.log_record({"type": "event", "event": "skipped_checkpoint", "step": self.state.step,
                                 "file": path.name, "reason": str(exc)})
        else:
            self.request_stop(f"cannot recover: no readable checkpoint before step {before_step}; {reason}")
            return
        self._restore(payload, path, recovering=True)
        abandoned = self.state.step
        self.branch += 1
        change = remedy(self)
        self._recent_kl = []
        if self.dist.is_main and self.history is not None:
            for entry in self.history.drop_after(abandoned):  # checkpoints of the collapsed branch
                (self.checkpoint_dir / entry["file"]).unlink(missing_ok=True)
            for s, p in list_checkpoints(self.checkpoint_dir):
                if s > abandoned:
                    p.unlink(missing_ok=True)
            self.history.sync()
        self.log_record({"type": "event", "event": "recover", "step": self.state.step, "from_checkpoint": str(path),
                         "reason": reason, "change": change})
        self.last_checkpoint = path
        D.barrier(self.dist)

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
            for cb in self.callbacks:
                cb.on_eval_end(self, record)
            self._last_eval = record
            assert self.log is not None
            self.log.write(record)
            self.log.flush()
            if self._tb is not None:
                for k, v in record.items():
                    if k not in ("type", "step", "epoch") and isinstance(v, int | float):
                        self._tb.add_scalar(f"test/{k}", v, self.state.step)
        D.barrier(self.dist)
        return result

    def _save_model(self, final_eval: dict[str, Any] | None) -> Path:
        meta = {"data": to_dict(self.data_config), "train": to_dict(self.config), "steps": self.state.step,
                "dataset_provenance": self.dataset.provenance}
        metrics: dict[str, Any] | None = {"test": final_eval, "step": self.state.step} if final_eval else None
        if self.selector is not None:
            meta["selected"] = {k: v for k, v in self.selector.summary.items() if k != "checks"}
            metrics = {**(metrics or {}), "selected": meta["selected"]}
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


def _progress(show: bool, total: int, initial: int, desc: str):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, mininterval=0.5, leave=False, dynamic_ncols=True)
