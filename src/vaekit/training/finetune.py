"""Fine-tuning: start from other weights, train only some parts, keep the rest bitwise unchanged.

``train.init_from`` names the starting weights:

- a model folder (``model.safetensors`` + ``model.json``, as :meth:`BaseModel.save` writes);
- a run folder: its saved model (``RUN/model``) when there is one, else its newest readable
  checkpoint;
- a registry reference ``NAME@ALIAS`` or ``NAME/VERSION`` (``vaekit.registry``, imported only
  then), in the registry at ``train.registry``, else ``$VAEKIT_REGISTRY``, else the registry's
  default; the source is recorded as the exact version (``NAME/VERSION``) the reference named
  when the run started, so a later alias move does not change what the run was tuned from.

They are loaded into the model only when a run starts afresh; a resumed run continues from its
own checkpoint. ``train.trainable`` lists parameter groups (``model.parameter_groups()``, e.g.
``decoder``, ``codebook``); the parameters of every other group get ``requires_grad=False`` and
are taken out of the optimizers, and each module whose whole state is frozen is held in eval
mode on every forward call (no dropout, no running statistics, no EMA codebook update, no
dead-code restart), so frozen weights and buffers stay bitwise unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vaekit.errors import CheckpointError, ConfigError
from vaekit.models.base import BaseModel, load_model
from vaekit.training.checkpoint import find_resumable

REFERENCE = re.compile(r"^[A-Za-z0-9][\w.-]*(@[A-Za-z0-9][\w.-]*|/\d+)$")


def check_init_from(spec: str | None) -> None:
    """ConfigError when ``spec`` is neither an existing folder nor a registry reference."""
    if spec is None or Path(spec).is_dir() or REFERENCE.match(spec):
        return
    raise ConfigError(f"train.init_from={spec!r} is neither an existing run or model folder nor a registry "
                      f"reference (NAME@ALIAS or NAME/VERSION)")


def load_init_state(spec: str, registry: str | None = None) -> tuple[dict[str, torch.Tensor], str, str]:
    """(state dict, model family, where it came from) of the weights ``spec`` names (see the module
    docstring); ConfigError when it names none."""
    check_init_from(spec)
    path = Path(spec)
    if not path.is_dir():
        return _from_registry(spec, registry)
    if (path / "model.safetensors").is_file():
        model = load_model(path)
        return model.state_dict(), model.family, str(path)
    if (path / "model" / "model.safetensors").is_file():
        model = load_model(path / "model")
        return model.state_dict(), model.family, str(path / "model")
    try:
        found, _ = find_resumable(path / "checkpoints")
    except CheckpointError as exc:
        raise ConfigError(f"train.init_from={spec!r}: no readable checkpoint in it: {exc}") from exc
    if found is None:
        raise ConfigError(f"train.init_from={spec!r} holds no model (model.safetensors or model/) and no checkpoint")
    payload, ckpt = found
    family = ((payload.get("config") or {}).get("model") or {}).get("family", "")
    return payload["model"], family, str(ckpt)


def _from_registry(ref: str, uri: str | None) -> tuple[dict[str, torch.Tensor], str, str]:
    from vaekit.registry import ModelRegistry  # only here: training does not need the registry otherwise

    version = ModelRegistry(uri).get(ref)  # uri None: $VAEKIT_REGISTRY, else the registry's default
    model = load_model(version.artifact_path)
    return model.state_dict(), model.family, f"{version.ref} ({ref}, {version.artifact_path})"


def init_weights(model: BaseModel, state: dict[str, torch.Tensor], family: str, source: str) -> None:
    """Copy ``state`` into ``model`` (in place: optimizers and DDP keep their tensors)."""
    if family and family != model.family:
        raise ConfigError(f"train.init_from: {source} holds a {family!r} model, this run trains {model.family!r}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"train.init_from: the weights of {source} do not fit this model (model.* settings "
                          f"differ): {exc}") from exc


def check_trainable(model: BaseModel, trainable: Sequence[str] | None) -> dict[str, list[str]]:
    """The model's parameter groups; ConfigError when ``trainable`` names one it does not have."""
    groups = model.parameter_groups()
    if trainable is None:
        return groups
    if not groups:
        raise ConfigError(f"train.trainable={list(trainable)} but model family {model.family!r} declares no "
                          f"parameter groups: it trains whole (leave train.trainable unset)")
    unknown = [g for g in trainable if g not in groups]
    if unknown:
        raise ConfigError(f"train.trainable names {unknown}, not parameter groups of {model.family!r}; "
                          f"its groups are {sorted(groups)}")
    return groups


class Frozen:
    """What :func:`freeze` did, undone by :meth:`release` (the model is whole again after a run)."""

    def __init__(self, names: set[str], params: list[nn.Parameter], handles: list[Any]):
        self.names, self.params, self.handles = names, params, handles

    def release(self) -> None:
        for handle in self.handles:
            handle.remove()
        for p in self.params:
            p.requires_grad_(True)
        self.handles, self.params = [], []


def freeze(model: BaseModel, trainable: Sequence[str]) -> Frozen:
    """Freeze every group not in ``trainable`` (see the module docstring)."""
    groups = check_trainable(model, trainable)
    keep = {n for g in trainable for n in groups[g]}
    frozen = {n for g, names in groups.items() if g not in trainable for n in names} - keep
    params = [p for name, p in model.named_parameters() if name in frozen and p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    handles = [m.register_forward_pre_hook(_hold_eval) for m in frozen_modules(model, frozen)]
    return Frozen(frozen, params, handles)


def _hold_eval(module: nn.Module, args: Any) -> None:
    module.train(False)  # whatever model.train() did: a frozen part never updates its own state


def frozen_modules(model: nn.Module, frozen: set[str]) -> list[nn.Module]:
    """The outermost submodules whose every parameter and buffer is in ``frozen``."""
    out: list[nn.Module] = []
    taken: list[str] = []
    for prefix, module in model.named_modules():
        if not prefix or any(prefix.startswith(t + ".") for t in taken):
            continue
        names = [f"{prefix}.{n}" for n, _ in module.named_parameters()] + [
            f"{prefix}.{n}" for n, _ in module.named_buffers()]
        if names and all(n in frozen for n in names):
            out.append(module)
            taken.append(prefix)
    return out


def drop_frozen(optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Take the parameters that need no gradient out of every optimizer (before its first step):
    no update, no weight decay, no moment state for them."""
    for opt in optimizers.values():
        for group in opt.param_groups:
            group["params"] = [p for p in group["params"] if p.requires_grad]
