"""Posterior-collapse detection during training, and what to do about it.

Two signals (He et al. 2019; Burda et al. 2015):

* the KL alert: the batch KL (true KL, nats per example) stays below ``kl_threshold`` for
  ``patience`` consecutive steps; it fires on exactly the ``patience``-th low step;
* latent checks on held-out data every ``every_steps`` steps and at each epoch end: active
  units (unit u active when Cov_x(E_q[z_u]) > ``au_threshold``) and the mutual information
  I(x; z) under the aggregate posterior; an alert when AU < ``min_active_units`` or
  MI < ``min_mi``.

Responses (``on_collapse``): ``warn`` (log and continue), ``stop`` (end training, keeping the
model), or ``recover``: reload the newest checkpoint from before the onset and continue with
a stated change (``recover_action``: free bits on at ``recover_free_bits`` nats per dimension,
or the KL schedule restarted as a linear warm-up). Every alert and action is written to the
metrics log with its reason.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from vaekit.errors import ConfigError, check_choice, check_positive
from vaekit.evaluation.latent import active_units, mutual_information, unit_activity
from vaekit.objectives.kl_control import KLControl
from vaekit.training.callbacks import Callback, HeldOut
from vaekit.training.schedules import KLConfig, KLSchedule

if TYPE_CHECKING:
    from vaekit.training.callbacks import TrainingLoop


@dataclass
class MonitorConfig:
    """Collapse monitors and responses (``monitor.*`` keys)."""

    enabled: bool = True  # run the monitors (needs a model with a Gaussian posterior)
    kl_threshold: float = 0.01  # KL alert: total KL below this (nats) counts as a low step
    patience: int = 100  # KL alert: consecutive low steps before it fires
    every_steps: int = 0  # AU/MI check every N steps (0: at epoch ends only)
    samples: int = 1000  # held-out test examples used for AU and MI
    au_threshold: float = 0.01  # a unit is active when Cov_x(E_q[z_u]) exceeds this
    min_active_units: int = 1  # latent alert when fewer units are active
    min_mi: float = 0.01  # latent alert when I(x; z) is below this (nats)
    on_collapse: Literal["warn", "stop", "recover"] = "warn"  # response to an alert
    recover_action: Literal["free_bits", "restart_schedule"] = "free_bits"  # the change made on recover
    recover_free_bits: float = 0.5  # free bits (nats per dim) switched on by recover_action=free_bits
    recover_warmup_steps: int = 2000  # warm-up length when recover_action=restart_schedule
    max_recoveries: int = 2  # after this many recoveries a further alert stops training
    log_kl_per_dim: bool = True  # add the batch KL of each latent dimension to every step record

    def __post_init__(self) -> None:
        check_positive("monitor.kl_threshold", self.kl_threshold, allow_zero=True)
        check_positive("monitor.patience", self.patience, integer=True)
        check_positive("monitor.every_steps", self.every_steps, allow_zero=True, integer=True)
        check_positive("monitor.samples", self.samples, integer=True)
        if self.samples < 2:
            raise ConfigError(f"monitor.samples must be >= 2, got {self.samples}")
        check_positive("monitor.au_threshold", self.au_threshold, allow_zero=True)
        check_positive("monitor.min_active_units", self.min_active_units, allow_zero=True, integer=True)
        check_positive("monitor.min_mi", self.min_mi, allow_zero=True)
        check_choice("monitor.on_collapse", self.on_collapse, ("warn", "stop", "recover"))
        check_choice("monitor.recover_action", self.recover_action, ("free_bits", "restart_schedule"))
        check_positive("monitor.recover_free_bits", self.recover_free_bits)
        check_positive("monitor.recover_warmup_steps", self.recover_warmup_steps, integer=True)
        check_positive("monitor.max_recoveries", self.max_recoveries, allow_zero=True, integer=True)


class KLController(Callback):
    """Builds each step's :class:`KLControl` from the schedule, free bits and floor.

    Its state (schedule restarts and remedies switched on by the collapse monitor) is
    checkpointed, so a resumed run continues with the same loss.
    """

    name = "kl"

    def __init__(self, config: KLConfig, beta: float, total_steps: int = 0, steps_per_epoch: int = 0):
        self.config, self.beta = config, beta
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.offset = 0
        self.free_bits = config.free_bits
        self._last: tuple[int, KLControl] | None = None  # (step, the control its forward pass used)
        self.schedule_config = config
        self._schedule = KLSchedule(config, beta, total_steps, steps_per_epoch) if total_steps else None

    def setup(self, loop: TrainingLoop) -> None:
        """The schedule spans the run's steps: known once the loop has its data."""
        self.total_steps, self.steps_per_epoch = loop.total_steps, loop.steps_per_epoch
        self._rebuild()

    def control(self, step: int) -> KLControl:
        """The KL part of the loss for optimizer step ``step`` (0-based: the step being taken)."""
        assert self._schedule is not None, "KLController.setup(loop) builds the schedule"
        cap = self._schedule.capacity(step)
        return KLControl(weight=self._schedule.weight(step), free_bits=self.free_bits,
                         kl_floor=self.config.kl_floor, capacity=cap, gamma=self.config.capacity_gamma)

    def forward_kwargs(self, loop: TrainingLoop) -> dict[str, Any]:
        self._last = (loop.state.step, self.control(loop.state.step))
        return {"kl_control": self._last[1]}

    def on_step_end(self, loop: TrainingLoop, record: dict[str, Any]) -> None:
        step = record["step"] - 1  # the step just taken: its control was built for the forward pass
        c = self._last[1] if self._last is not None and self._last[0] == step else self.control(step)
        record["kl_weight"] = c.weight
        if c.capacity is not None:
            record["kl_capacity"] = c.capacity
        if c.free_bits:
            record["free_bits"] = c.free_bits

    # -- remedies --------------------------------------------------------------------------------
    def enable_free_bits(self, nats_per_dim: float) -> str:
        self.free_bits = max(self.free_bits, nats_per_dim)
        return f"free bits on at {self.free_bits} nats per latent dimension"

    def restart_schedule(self, step: int, warmup_steps: int) -> str:
        self.schedule_config = KLConfig(schedule="linear", warmup_steps=warmup_steps, free_bits=self.free_bits,
                                        kl_floor=self.config.kl_floor)
        self.offset = step
        self._rebuild()
        return f"KL schedule restarted at step {step} as a linear warm-up over {warmup_steps} steps"

    def _rebuild(self) -> None:
        self._schedule = KLSchedule(self.schedule_config, self.beta, self.total_steps, self.steps_per_epoch,
                                    offset=self.offset)

    def state_dict(self) -> dict[str, Any]:
        restarted = self.schedule_config is not self.config
        return {"offset": self.offset, "free_bits": self.free_bits,
                "restart_warmup": self.schedule_config.warmup_steps if restarted else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.offset, self.free_bits = state["offset"], state["free_bits"]
        if state.get("restart_warmup") is not None:
            self.schedule_config = KLConfig(schedule="linear", warmup_steps=state["restart_warmup"],
                                            free_bits=self.free_bits, kl_floor=self.config.kl_floor)
        else:
            self.schedule_config = self.config
        self._rebuild()


class KLAlert:
    """Counts consecutive low-KL steps; ``update`` returns True on exactly the ``patience``-th."""

    def __init__(self, threshold: float, patience: int):
        self.threshold, self.patience, self.streak = threshold, patience, 0

    def update(self, kl: float) -> bool:
        self.streak = self.streak + 1 if kl < self.threshold else 0
        return self.streak == self.patience


@torch.no_grad()
def latent_stats(loop: TrainingLoop, x: torch.Tensor, y: torch.Tensor, au_threshold: float,
                 seed: int) -> dict[str, Any]:
    """AU, per-unit activity and MI of the model's posterior on held-out ``x`` (eval mode)."""
    model = loop.model
    was = model.training
    model.eval()
    means, logvars = [], []
    for i in range(0, x.shape[0], 500):
        xb, yb = x[i : i + 500], y[i : i + 500]
        q = model.encode(xb, yb)
        means.append(q.mean.float())
        logvars.append(q.logvar.float())
    model.train(was)
    mean, logvar = torch.cat(means).cpu(), torch.cat(logvars).cpu()
    g = torch.Generator().manual_seed(seed)
    return {"au": active_units(mean, au_threshold), "mi": mutual_information(mean, logvar, generator=g),
            "activity": unit_activity(mean).tolist()}


class CollapseMonitor(Callback):
    """Watches KL, AU and MI; on an alert warns, stops, or recovers (see module docstring)."""

    name = "collapse"

    def __init__(self, config: MonitorConfig, heldout_x: torch.Tensor | HeldOut, heldout_y: torch.Tensor | None = None,
                 seed: int = 0, kl_controller: KLController | None = None):
        """``heldout_x``, ``heldout_y``: held-out images (N, C, H, W) and labels (N,) on the model's
        device, or a :class:`HeldOut` made into them at set-up; ``kl_controller``: the one the
        ``recover`` remedies change (None: a recovery only reloads)."""
        self.config, self.seed, self.kl_controller = config, seed, kl_controller
        self.heldout = heldout_x if isinstance(heldout_x, HeldOut) else None
        self.x, self.y = (None, None) if self.heldout else (heldout_x, heldout_y)
        self.alert = KLAlert(config.kl_threshold, config.patience)
        self.recoveries = 0
        self.alerts: list[dict[str, Any]] = []
        self.last_healthy_step = 0
        self.latest: dict[str, Any] | None = None

    def setup(self, loop: TrainingLoop) -> None:
        if self.heldout is not None:
            self.x, self.y = self.heldout.tensors(loop.device)

    def extra_terms(self, out: Any) -> dict[str, torch.Tensor]:
        per_dim = getattr(out, "kl_per_dim", None) if self.config.log_kl_per_dim else None
        return {"kl_per_dim": per_dim} if per_dim is not None else {}

    def checkpoint_fields(self) -> dict[str, Any]:
        latest = self.latest
        return {"au": latest["au"] if latest else None, "mi": latest["mi"] if latest else None,
                "latent_step": latest["step"] if latest else None}

    def summary(self) -> dict[str, Any]:
        """Collapse alerts (cause, step, onset, action) and the recoveries made."""
        return {"recoveries": self.recoveries, "alerts": list(self.alerts)}

    # -- checks ----------------------------------------------------------------------------------
    def on_step_end(self, loop: TrainingLoop, record: dict[str, Any]) -> None:
        step = record["step"]
        if self.alert.update(record["kl"]):
            onset = step - self.config.patience + 1
            self._fire(loop, "kl", onset, f"KL < {self.config.kl_threshold} nats for {self.config.patience} "
                       f"consecutive steps ({onset}..{step})")
        every = self.config.every_steps
        if every and step % every == 0:
            self.check_latents(loop)

    def on_epoch_end(self, loop: TrainingLoop, epoch: int) -> None:
        self.check_latents(loop)

    def check_latents(self, loop: TrainingLoop) -> dict[str, Any]:
        """Compute AU and MI on the held-out set, log them, and alert when below thresholds."""
        step = loop.state.step
        if self.latest is not None and self.latest["step"] == step:
            return self.latest
        t0 = time.perf_counter()
        stats = latent_stats(loop, self.x, self.y, self.config.au_threshold, self.seed + step)
        seconds = time.perf_counter() - t0
        self.latest = {"step": step, "au": stats["au"], "mi": stats["mi"]}
        loop.log_record({"type": "monitor", "step": step, "epoch": loop.state.epoch, "au": stats["au"],
                            "mi": stats["mi"], "unit_activity": stats["activity"], "seconds": seconds})
        low_au = stats["au"] < self.config.min_active_units
        low_mi = stats["mi"] < self.config.min_mi
        if low_au or low_mi:
            why = []
            if low_au:
                why.append(f"active units {stats['au']} < {self.config.min_active_units}")
            if low_mi:
                why.append(f"MI {stats['mi']:.4f} < {self.config.min_mi} nats")
            self._fire(loop, "latent", self.last_healthy_step + 1, "; ".join(why) + " on held-out data")
        else:
            self.last_healthy_step = step
        return self.latest

    # -- responses -------------------------------------------------------------------------------
    def _fire(self, loop: TrainingLoop, cause: str, onset: int, reason: str) -> None:
        action = self.config.on_collapse
        if action == "recover" and self.recoveries >= self.config.max_recoveries:
            action = "stop"
            reason += f"; {self.recoveries} recoveries already made (monitor.max_recoveries)"
        event = {"type": "event", "event": "collapse", "cause": cause, "step": loop.state.step,
                 "onset": onset, "reason": reason, "action": action}
        self.alerts.append({k: event[k] for k in ("cause", "step", "onset", "action")})
        loop.log_record(event)
        if action == "warn":
            warnings.warn(f"posterior collapse suspected at step {loop.state.step}: {reason}", stacklevel=2)
        elif action == "stop":
            loop.request_stop(f"posterior collapse at step {loop.state.step}: {reason}")
        else:
            loop.request_recover(before_step=onset, reason=reason, remedy=self._remedy)

    def _remedy(self, loop: TrainingLoop) -> str:
        """Applied after the reload: the stated change, counted."""
        self.recoveries += 1
        self.alert.streak = 0
        self.latest = None
        ctl = self.kl_controller
        if ctl is None:
            return "no KL controller: reloaded only"
        if self.config.recover_action == "free_bits":
            return ctl.enable_free_bits(self.config.recover_free_bits)
        return ctl.restart_schedule(loop.state.step, self.config.recover_warmup_steps)

    # -- state -----------------------------------------------------------------------------------
    keep_state_on_recover = True  # the alert log and recovery count survive the reload they cause

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self.alert.streak, "recoveries": self.recoveries, "alerts": self.alerts,
                "last_healthy_step": self.last_healthy_step, "latest": self.latest}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alert.streak, self.recoveries = state["streak"], state["recoveries"]
        self.alerts, self.last_healthy_step = list(state["alerts"]), state["last_healthy_step"]
        self.latest = state.get("latest")
