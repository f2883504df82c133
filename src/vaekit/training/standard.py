"""The callbacks a configured run trains with, built outside the trainer.

``standard_callbacks`` turns the ``kl``, ``monitor`` and ``select`` sections of a run config
into callbacks, in the order the loop must call them: the KL controller (it sets the step's
loss), the collapse monitor, the caller's own callbacks, then the model selector (it scores the
weights a step ends with, after everything else has run). :func:`vaekit.training.run.train` and
the CLI use it; a :class:`~vaekit.training.trainer.Trainer` built by hand gets only what it is
given.
"""

from __future__ import annotations

from collections.abc import Sequence

from vaekit.data.dataset import ImageDataset, mix_seed
from vaekit.errors import ConfigError
from vaekit.models.base import BaseModel
from vaekit.training.callbacks import Callback, HeldOut
from vaekit.training.config import DataConfig, RunConfig
from vaekit.training.monitors import CollapseMonitor, KLController, MonitorConfig
from vaekit.training.schedules import KLConfig
from vaekit.training.selection import BestModelSelector, SelectConfig, check_selectable


def standard_callbacks(
    model: BaseModel,
    dataset: ImageDataset,
    config: RunConfig | None = None,
    *,
    data: DataConfig | None = None,
    kl: KLConfig | None = None,
    monitor: MonitorConfig | None = None,
    select: SelectConfig | None = None,
    seed: int | None = None,
    extra: Sequence[Callback] = (),
) -> list[Callback]:
    """KL control, collapse monitors and model selection for ``model`` on ``dataset``.

    Each section comes from the keyword when given, else from ``config``, else its default;
    ``seed`` defaults to ``train.seed``. ``extra`` (the caller's callbacks) go between the
    monitors and the selector. ConfigError when a setting does not apply to the model (kl.* on a
    family without a Gaussian KL term, a collapse response without a Gaussian posterior) or
    selection has no validation split.
    """
    data = data or (config.data if config else DataConfig())  # binarization and validation split
    kl = kl or (config.kl if config else KLConfig())
    monitor = monitor or (config.monitor if config else MonitorConfig())
    select = select or (config.select if config else SelectConfig())
    seed = seed if seed is not None else (config.train.seed if config else 0)
    first: list[Callback] = []
    controller = None
    if model.supports_kl_control:
        controller = KLController(kl, float(getattr(model.config, "beta", 1.0)))
        first.append(controller)
    elif not kl.is_default:
        raise ConfigError(f"model family {model.family!r} has no Gaussian KL term: kl.* settings do not apply")
    if monitor.enabled and model.supports_kl_control:
        held = HeldOut(dataset.test, data.binarize, mix_seed(data.binarize_seed, 0x4D), monitor.samples)
        first.append(CollapseMonitor(monitor, held, seed=seed, kl_controller=controller))
    elif monitor.enabled and monitor.on_collapse != "warn":
        raise ConfigError(f"monitor.on_collapse={monitor.on_collapse!r} needs a model with a Gaussian posterior; "
                          f"{model.family!r} has none (set monitor.enabled=false)")
    last: list[Callback] = []
    if select.enabled:
        if not data.validation:
            raise ConfigError(f"select.metric={select.metric!r} scores on a validation split: "
                              f"set data.validation to the number of training examples to hold out (e.g. 5000)")
        check_selectable(model, select)
        _, validation = data.train_splits(dataset.train)
        assert validation is not None
        held = HeldOut(validation, data.binarize, mix_seed(data.binarize_seed, 0x5E), select.samples)
        last.append(BestModelSelector(select, held))
    return first + list(extra) + last

