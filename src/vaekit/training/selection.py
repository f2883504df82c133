"""Model selection on a validation split: keep the weights with the best validation figure.

Adversarial training does not settle: an AAE's aggregate posterior drifts towards the prior and
away from it again as the encoder and the discriminator chase each other, so where a run happens
to stop decides how good its model is. This callback measures a figure on held-out training
examples (``data.validation``, never trained on, never the test split) every ``every_steps``
steps, keeps a copy of the best weights, and puts them back at the end of training, before the
final test evaluation and before the model is saved. Metrics (``select.metric``):

* ``prior_mmd``: MMD^2 between the codes of the validation images (one draw z ~ q(z|x) each, the
  code itself for a deterministic encoder) and as many prior samples, with a sum of RBF kernels
  (:func:`vaekit.objectives.mmd.mmd_rbf`); lower is closer. Needs a model with ``encode`` and
  ``sample_prior`` (the AAE).
* ``val_loss``: the model's own loss averaged over the validation images (for a VAE, -ELBO
  under its beta); lower is better. Works for every family, but for the AAE the loss includes
  the generator's loss against the current discriminator, a moving target: use ``prior_mmd``.

Checks run after the user's callbacks of the same step (they see the weights that step ends
with) and under a forked RNG. Under DDP rank 0 scores and broadcasts the value, so every rank
keeps and restores the same weights. A non-finite score never counts as the best.

The best weights live in this callback's state, so they travel in every checkpoint and a resumed
run selects exactly as an uninterrupted one would. They double the size of a checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from vaekit.errors import ConfigError, check_choice, check_positive
from vaekit.evaluation.elbo import evaluate_elbo
from vaekit.objectives.mmd import mmd_rbf
from vaekit.training import distributed as D
from vaekit.training.callbacks import Callback

if TYPE_CHECKING:
    from vaekit.models.base import BaseModel
    from vaekit.training.trainer import Trainer

METRICS = ("none", "prior_mmd", "val_loss")


@dataclass
class SelectConfig:
    """Model selection (``select.*`` keys); needs ``data.validation`` > 0 when a metric is set."""

    metric: Literal["none", "prior_mmd", "val_loss"] = "none"  # what decides the best weights (none: the last)
    every_steps: int = 500  # steps between validation checks (0: at epoch ends only); also once at the end
    samples: int = 2000  # validation images used per check (at most data.validation)
    # prior_mmd kernel widths (code units); None: the median pairwise distance of prior samples
    # times (1/16, 1/8, 1/4, 1/2, 1), fixed at the start so every check uses the same kernel
    bandwidths: tuple[float, ...] | None = None
    seed: int = 0  # seed of the prior samples and code draws (each check uses the same ones)

    def __post_init__(self) -> None:
        check_choice("select.metric", self.metric, METRICS)
        check_positive("select.every_steps", self.every_steps, allow_zero=True, integer=True)
        check_positive("select.samples", self.samples, integer=True)
        if self.samples < 2:
            raise ConfigError(f"select.samples must be >= 2 (MMD needs two points a side), got {self.samples}")
        if self.bandwidths is not None:
            if len(self.bandwidths) == 0:
                raise ConfigError("select.bandwidths must hold at least one width, or be null for the default")
            for s in self.bandwidths:
                check_positive("select.bandwidths[i]", s)
        check_positive("select.seed", self.seed, allow_zero=True, integer=True)

    @property
    def enabled(self) -> bool:
        return self.metric != "none"


def _rank(value: float) -> float:
    """Sort key of a score: lower is better, and NaN or inf is worst."""
    return value if math.isfinite(value) else math.inf


def check_selectable(model: BaseModel, config: SelectConfig) -> None:
    """Raise :class:`ConfigError` when ``model`` cannot be scored by ``config.metric``."""
    if config.metric == "prior_mmd" and not model.has_prior_sampler:
        raise ConfigError(f"select.metric 'prior_mmd' needs a model with a prior to sample and an encoder "
                          f"(family 'aae'); {model.family!r} has none: use select.metric=val_loss")


class BestModelSelector(Callback):
    """Scores the model on validation data and keeps the best weights (see the module docstring).

    ``x``, ``y``: the validation images (N, C, H, W) and labels (N,), already on the model's device.
    Each check adds ``select_<metric>`` to that step's metrics record.
    """

    name = "select"

    def __init__(self, config: SelectConfig, x: torch.Tensor, y: torch.Tensor):
        if not config.enabled:
            raise ConfigError("BestModelSelector needs select.metric other than 'none'")
        self.config = config
        n = min(config.samples, x.shape[0])
        self.x, self.y = x[:n], y[:n]
        self.key = f"select_{config.metric}"
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.checked_at = -1
        self.history: list[tuple[int, float]] = []
        self._prior: torch.Tensor | None = None
        self._bandwidths: tuple[float, ...] | None = None

    # -- scoring -----------------------------------------------------------------------------------
    def _prior_and_kernel(self, model: Any) -> tuple[torch.Tensor, tuple[float, ...]]:
        if self._prior is None:
            g = torch.Generator().manual_seed(self.config.seed)
            self._prior = model.sample_prior(self.x.shape[0], g).detach().double().cpu()
            if self.config.bandwidths is not None:
                self._bandwidths = tuple(float(s) for s in self.config.bandwidths)
            else:
                d = torch.pdist(self._prior[:1000])
                med = float(d.median())
                if not med > 0:
                    raise ConfigError("select.metric 'prior_mmd': the prior samples coincide (median distance 0); "
                                      "set select.bandwidths")
                self._bandwidths = tuple(med * f for f in (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0))
        assert self._bandwidths is not None
        return self._prior, self._bandwidths

    @torch.no_grad()
    def score(self, model: Any) -> float:
        """The metric at the model's current weights (eval mode; the training RNG is left untouched)."""
        was = model.training
        model.eval()
        devices = [model.device] if model.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.config.seed)
                if self.config.metric == "prior_mmd":
                    prior, bws = self._prior_and_kernel(model)  # a custom sampler draws from the global stream,
                    torch.manual_seed(self.config.seed)  # so re-seed: the same code draws at every check
                    codes = torch.cat([model.encode(self.x[i: i + 1000]).rsample()
                                       for i in range(0, self.x.shape[0], 1000)])
                    value = mmd_rbf(codes.double().cpu(), prior, bws)
                else:
                    batches = ((self.x[i: i + 1000], self.y[i: i + 1000]) for i in range(0, self.x.shape[0], 1000))
                    value = float(evaluate_elbo(model, batches, seed=self.config.seed)["loss"])
        finally:
            model.train(was)
        return value

    def check(self, trainer: Trainer) -> float:
        """Score now (rank 0, broadcast to the others); keep the weights when they are the best so far."""
        step = trainer.state.step
        value = self.score(trainer.model) if trainer.dist.is_main else None
        value = float(D.broadcast_object(value, trainer.dist))
        self.checked_at = step
        self.history.append((step, value))
        if self.best_value is None or _rank(value) < _rank(self.best_value):
            self.best_value, self.best_step = value, step
            self.best_weights = {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
        return value

    # -- hooks -------------------------------------------------------------------------------------
    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        every = self.config.every_steps
        if every and trainer.state.step % every == 0:
            record[self.key] = self.check(trainer)
            record["select_best_step"] = self.best_step

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        if not self.config.every_steps and self.checked_at != trainer.state.step:
            value = self.check(trainer)
            trainer.log_record({"type": "select", "step": trainer.state.step, "epoch": epoch, self.key: value,
                                "select_best_step": self.best_step})

    def finish(self, trainer: Trainer) -> bool:
        """Score the final weights too, then load the best ones into the model.

        Returns True when that changed the model's weights."""
        if self.checked_at != trainer.state.step:
            self.check(trainer)
        assert self.best_weights is not None and self.best_value is not None
        current = trainer.model.state_dict()
        changed = any(not torch.equal(v.detach().cpu(), self.best_weights[k]) for k, v in current.items())
        if changed:
            trainer.model.load_state_dict(self.best_weights)
        trainer.log_record({"type": "event", "step": trainer.state.step, "event": "select",
                            "metric": self.config.metric, "best_step": self.best_step, "best_value": self.best_value,
                            "last_value": self.history[-1][1]})
        return changed

    @property
    def summary(self) -> dict[str, Any]:
        """What was selected: metric, best step and value, and every check (step, value)."""
        return {"metric": self.config.metric, "best_step": self.best_step, "best_value": self.best_value,
                "checks": [list(h) for h in self.history]}

    def state_dict(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "best_step": self.best_step, "best_weights": self.best_weights,
                "checked_at": self.checked_at, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_value, self.best_step = state.get("best_value"), state.get("best_step")
        self.best_weights = state.get("best_weights")
        self.checked_at = state.get("checked_at", -1)
        self.history = [(int(s), float(v)) for s, v in state.get("history", [])]
