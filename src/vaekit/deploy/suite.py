"""The benchmark suite every candidate passes before it may become a canary.

``run_suite`` evaluates a model with the same report parts (:mod:`vaekit.evaluation.parts`) on
each named distribution (e.g. ``original``: the test split it was first trained for, and ``new``:
held-out recent production data). ``gate(candidate, production, policy)`` compares the two
versions figure by figure, in the direction each part declares (``better``: lower or higher):

* on the distributions in ``policy.keep`` (default ``original``) the candidate may be at most
  ``tolerance`` worse than production (2%, the brief's margin): more is forgetting;
* on every other distribution it may be at most ``new_tolerance`` worse (default 0: a retrained
  model must not be worse where it was retrained);

and the candidate passes only when every compared figure does. The result says which figure
failed, on which distribution, by how much.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaekit.data.dataset import ImageDataset
from vaekit.errors import ConfigError, InputError, describe
from vaekit.evaluation.parts import PARTS
from vaekit.evaluation.report import EvalConfig, evaluate_model


@dataclass(frozen=True)
class SuitePolicy:
    """What the suite runs and how much worse a candidate may be."""

    parts: tuple[str, ...] = ("elbo", "recon", "fid")  # report parts run on every distribution
    tolerance: float = 0.02  # allowed relative loss on the distributions in ``keep`` (forgetting)
    new_tolerance: float = 0.0  # allowed relative loss on the other distributions
    keep: tuple[str, ...] = ("original",)  # distributions the candidate must not forget
    examples: int | None = None  # evaluate on the first N test images of each distribution (None: all)
    fid_samples: int = 5000  # generated images for FID (where the part applies)

    def __post_init__(self) -> None:
        bad = [p for p in self.parts if p not in PARTS]
        if bad or not self.parts:
            raise ConfigError(f"parts must be a non-empty list from {list(PARTS)}, got {list(self.parts)!r}")
        for name in ("tolerance", "new_tolerance"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < 1:
                raise ConfigError(f"{name} must be a number in [0, 1), got {describe(v)}")


@dataclass
class GateResult:
    passed: bool
    reasons: list[str]  # one line per failed figure ("" when it passed)
    comparisons: list[dict[str, Any]] = field(default_factory=list)  # every figure compared


def run_suite(model: Any, distributions: Mapping[str, ImageDataset], out_dir: str | os.PathLike,
              policy: SuitePolicy | None = None, *, binarize: str = "none") -> dict[str, dict[str, Any]]:
    """Each distribution's report metrics (part -> result) for ``model``; reports written under ``out_dir/<name>``."""
    policy = policy or SuitePolicy()
    if not distributions:
        raise InputError("run_suite needs at least one distribution (name -> ImageDataset)")
    config = EvalConfig(metrics=policy.parts, test_examples=policy.examples, fid_samples=policy.fid_samples)
    return {name: evaluate_model(model, data, Path(out_dir) / name, config, binarize=binarize, name=name)["metrics"]
            for name, data in distributions.items()}


def _relative_loss(candidate: float, production: float, better: str) -> float:
    """How much worse the candidate is, relative to production (negative: better)."""
    scale = abs(production) if production != 0 else 1.0
    return (candidate - production) / scale if better == "lower" else (production - candidate) / scale


def gate(candidate: Mapping[str, Mapping[str, Any]], production: Mapping[str, Mapping[str, Any]],
         policy: SuitePolicy | None = None) -> GateResult:
    """Compare two :func:`run_suite` results figure by figure (see the module docstring)."""
    policy = policy or SuitePolicy()
    missing = sorted(set(production) - set(candidate))
    if missing:
        raise InputError(f"the candidate was not evaluated on {missing}; both need the same distributions")
    comparisons, reasons = [], []
    for dist, prod_parts in production.items():
        allowed = policy.tolerance if dist in policy.keep else policy.new_tolerance
        for part_name, prod_result in prod_parts.items():
            cand_result = candidate[dist].get(part_name, {})
            if "skipped" in prod_result or "skipped" in cand_result or part_name not in PARTS:
                continue
            part = PARTS[part_name]
            cand_fig = part.headline(cand_result)
            for key, prod_value in part.headline(prod_result).items():
                if key not in cand_fig:
                    continue
                loss = _relative_loss(float(cand_fig[key]), float(prod_value), part.better[key])
                ok = loss <= allowed
                comparisons.append({"distribution": dist, "figure": f"{part_name}.{key}", "candidate": cand_fig[key],
                                    "production": prod_value, "better": part.better[key], "relative_loss": loss,
                                    "allowed": allowed, "passed": ok})
                if not ok:
                    reasons.append(f"{dist}: {part_name}.{key} {cand_fig[key]:.4g} vs production {prod_value:.4g} "
                                   f"({loss:+.1%} worse, {allowed:.0%} allowed)")
    if not comparisons:
        return GateResult(False, ["no figure could be compared (every part was skipped)"], [])
    return GateResult(not reasons, reasons, comparisons)
