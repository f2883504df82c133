"""KL-weight schedules, stepped once per optimizer step.

Each schedule is a pure function of the step (and the run length), so resuming needs only
the step counter and the restart offset (kept in checkpoints by the KL controller).

* constant: w(t) = beta.
* linear warm-up: w(t) = beta * min(1, t / N).
* cyclical (Fu et al. 2019, "Cyclical Annealing Schedule"): T steps split into M cycles of
  length T / M; within a cycle, position tau in [0, 1); while tau < R the weight rises from
  0 to beta with the chosen shape (linear, sigmoid 1 / (1 + exp(-(12 x - 6))), cosine
  0.5 - 0.5 cos(pi x), x = tau / R), then stays at beta.
* capacity (Burgess et al. 2018, "Understanding disentangling in beta-VAE"): the KL term is
  gamma * |KL - C(t)| with C(t) = C_max * min(1, t / N).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from vaekit.errors import ConfigError, check_choice, check_positive

SCHEDULES = ("constant", "linear", "cyclical", "capacity")
SHAPES = ("linear", "sigmoid", "cosine")


@dataclass
class KLConfig:
    """How the KL term is weighted and floored during training (``kl.*`` keys)."""

    schedule: Literal["constant", "linear", "cyclical", "capacity"] = "constant"  # see module docstring
    warmup_steps: int = 0  # linear: steps from 0 to beta (or give warmup_epochs)
    warmup_epochs: float | None = None  # linear: the same in epochs (overrides warmup_steps)
    cycles: int = 4  # cyclical: number of cycles M over the run
    cycle_ratio: float = 0.5  # cyclical: fraction R of each cycle spent rising
    cycle_shape: Literal["linear", "sigmoid", "cosine"] = "linear"  # cyclical: shape of the rise
    capacity_max: float = 25.0  # capacity: C_max, nats
    capacity_steps: int = 10000  # capacity: steps for C to reach C_max
    capacity_gamma: float = 1000.0  # capacity: gamma
    free_bits: float = 0.0  # lambda, nats per latent dimension: sum_j max(lambda, E_batch KL_j); 0 = off
    kl_floor: float = 0.0  # total-KL target: max(KL, target) nats; 0 = off

    def __post_init__(self) -> None:
        check_choice("kl.schedule", self.schedule, SCHEDULES)
        check_positive("kl.warmup_steps", self.warmup_steps, allow_zero=True, integer=True)
        if self.warmup_epochs is not None:
            check_positive("kl.warmup_epochs", self.warmup_epochs)
        if self.schedule == "linear" and self.warmup_steps == 0 and self.warmup_epochs is None:
            raise ConfigError("kl.schedule 'linear' needs kl.warmup_steps > 0 or kl.warmup_epochs")
        check_positive("kl.cycles", self.cycles, integer=True)
        if not 0 < self.cycle_ratio <= 1:
            raise ConfigError(f"kl.cycle_ratio must be in (0, 1], got {self.cycle_ratio!r}")
        check_choice("kl.cycle_shape", self.cycle_shape, SHAPES)
        check_positive("kl.capacity_max", self.capacity_max, allow_zero=True)
        check_positive("kl.capacity_steps", self.capacity_steps, integer=True)
        check_positive("kl.capacity_gamma", self.capacity_gamma)
        check_positive("kl.free_bits", self.free_bits, allow_zero=True)
        check_positive("kl.kl_floor", self.kl_floor, allow_zero=True)

    @property
    def is_default(self) -> bool:
        return self == KLConfig()


def linear_warmup(step: int, beta: float, warmup: int) -> float:
    return beta * min(1.0, step / warmup) if warmup > 0 else beta


def _rise(x: float, shape: str) -> float:
    if shape == "linear":
        return x
    if shape == "sigmoid":
        return 1.0 / (1.0 + math.exp(-(12.0 * x - 6.0)))
    return 0.5 - 0.5 * math.cos(math.pi * x)


def cyclical(step: int, beta: float, total_steps: int, cycles: int, ratio: float, shape: str) -> float:
    """Fu et al. 2019: the weight at ``step`` of a run of ``total_steps`` steps."""
    period = total_steps / cycles
    tau = (step % period) / period if period > 0 else 1.0
    return beta * _rise(tau / ratio, shape) if tau < ratio else beta


def capacity(step: int, c_max: float, steps: int) -> float:
    """Burgess et al. 2018: C(t) = C_max * min(1, t / steps)."""
    return c_max * min(1.0, step / steps)


class KLSchedule:
    """The schedule of a run: ``weight(step)`` and ``capacity(step)``.

    ``offset`` restarts the schedule (step ``offset`` acts as step 0), used when a
    collapse remedy restarts annealing.
    """

    def __init__(self, config: KLConfig, beta: float, total_steps: int, steps_per_epoch: int, offset: int = 0):
        self.config, self.beta, self.total_steps, self.offset = config, beta, max(total_steps, 1), offset
        self.warmup = config.warmup_steps
        if config.warmup_epochs is not None:
            self.warmup = max(1, round(config.warmup_epochs * steps_per_epoch))

    def weight(self, step: int) -> float:
        c, t = self.config, max(step - self.offset, 0)
        if c.schedule == "linear":
            return linear_warmup(t, self.beta, self.warmup)
        if c.schedule == "cyclical":
            return cyclical(t, self.beta, self.total_steps - self.offset, c.cycles, c.cycle_ratio, c.cycle_shape)
        return self.beta

    def capacity(self, step: int) -> float | None:
        c = self.config
        if c.schedule != "capacity":
            return None
        return capacity(max(step - self.offset, 0), c.capacity_max, c.capacity_steps)
