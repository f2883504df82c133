"""Importance-sampled negative log-likelihood (Burda et al. 2015, Eq. 8 and Section 5.1).

    log p(x) ~= logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log k,   z_k ~ q(z|x)

The estimate is a lower bound on log p(x) for every k (so the NLL is an upper bound) and
tightens as k grows. The log weights come from :func:`vaekit.objectives.iwae.log_importance_weights`,
the same code the IWAE objective trains with. Samples are drawn in chunks of at most
``max_samples`` (k_chunk x examples) decoder evaluations, and the k weights of an example are
reduced with a running logsumexp, so memory does not grow with k.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from vaekit.errors import InputError, describe
from vaekit.objectives.iwae import log_importance_weights

MAX_K = 100_000


def supports_nll(model: Any) -> tuple[bool, str]:
    """(True, "") if ``model`` declares ``defines_elbo`` (a posterior density, a prior and a decoder
    likelihood, see :class:`vaekit.models.base.BaseModel`); else (False, why)."""
    if not model.defines_elbo:
        return False, (f"{type(model).__name__} defines no ELBO (no posterior density and prior), "
                       "so the importance-sampled NLL does not apply")
    return True, ""


def _check_model(model: Any) -> None:
    ok, why = supports_nll(model)
    if not ok:
        raise InputError(f"the importance-sampled NLL needs a model that defines an ELBO: {why}")


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise InputError(f"k must be an integer in [1, {MAX_K}], got {describe(k)}")
    return k


def _check_max_samples(max_samples: Any) -> int:
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise InputError(f"max_samples must be a positive integer, got {describe(max_samples)}")
    return max_samples


@torch.no_grad()
def log_likelihood(
    model: Any,
    x: torch.Tensor,
    k: int = 5000,
    *,
    y: torch.Tensor | None = None,
    max_samples: int = 1024,
) -> torch.Tensor:
    """Importance-sampled log p(x) of each example of a batch x (B, C, H, W): (B,) nats, float64.

    Draws ``k`` samples z ~ q(z|x) per example, at most ``max_samples`` decoder evaluations at a
    time: examples are taken ``max(1, max_samples // k)`` at a time and their samples in chunks of
    ``max_samples // examples``. Memory is a few times ``max_samples`` decoder outputs (about 13 MB
    for 28x28 images at the default); on CPU, chunks whose logits fit in the cache run faster than
    bigger ones (Burda MLP, 2 threads: 1024 takes 0.67x the time of 4096; ``python bench/nll_chunks.py``).
    The random stream is the caller's (seed it, or use :func:`nll`).
    ``y`` holds labels for conditional models.
    """
    _check_model(model)
    k, max_samples = _check_k(k), _check_max_samples(max_samples)
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[0] == 0:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"x must be a non-empty batch tensor (B, ...), got {got}")
    B = x.shape[0]
    per = max(1, min(B, max_samples // k))  # examples per group
    out = []
    for lo in range(0, B, per):
        xs = x[lo : lo + per]
        ys = y[lo : lo + per] if y is not None else None
        chunk = max(1, max_samples // xs.shape[0])  # samples per chunk for this group
        running = None  # logsumexp of the log weights seen so far, (b,)
        done = 0
        while done < k:
            n = min(chunk, k - done)
            log_w = log_importance_weights(model, xs, n, ys).double()  # (n, b)
            part = torch.logsumexp(log_w, dim=0)
            running = part if running is None else torch.logaddexp(running, part)
            done += n
        out.append(running - math.log(k))
    return torch.cat(out)


class NLLAccumulator:
    """Collects per-example log p(x) estimates; ``compute()`` returns the mean NLL and its standard error.

    ``update(log_px)`` takes a (B,) tensor of per-example log-likelihoods in nats. The standard
    error is the sample standard deviation of the per-example NLL divided by sqrt(n): the spread
    across test points (the Monte Carlo error of each estimate is much smaller at large k).
    """

    def __init__(self, num_dims: int):
        if isinstance(num_dims, bool) or not isinstance(num_dims, int) or num_dims < 1:
            raise InputError(f"num_dims must be a positive integer (pixels per example), got {describe(num_dims)}")
        self.num_dims = num_dims
        self.reset()

    def reset(self) -> None:
        self.values: list[torch.Tensor] = []

    def update(self, log_px: torch.Tensor) -> None:
        if not isinstance(log_px, torch.Tensor) or log_px.ndim != 1:
            got = tuple(log_px.shape) if isinstance(log_px, torch.Tensor) else type(log_px).__name__
            raise InputError(f"log_px must be a 1-D tensor of per-example log-likelihoods, got {got}")
        if not torch.isfinite(log_px).all():
            raise InputError("log_px holds non-finite values (a decoder produced NaN or -inf log-likelihoods)")
        self.values.append(log_px.detach().double().cpu())

    def compute(self) -> dict[str, float | int]:
        if not self.values:
            raise InputError("NLLAccumulator.compute() called before any update()")
        nll = -torch.cat(self.values)
        n = nll.numel()
        mean = nll.mean().item()
        stderr = (nll.std(unbiased=True).item() / math.sqrt(n)) if n > 1 else float("nan")
        to_bits = 1.0 / (self.num_dims * math.log(2.0))
        return {"nll": mean, "nll_stderr": stderr, "bits_per_dim": mean * to_bits,
                "bits_per_dim_stderr": stderr * to_bits, "n": n}


@torch.no_grad()
def nll(
    model: Any,
    batches: Iterable[Any],
    k: int = 5000,
    *,
    seed: int = 0,
    max_samples: int = 1024,
    max_examples: int | None = None,
    per_example: bool = False,
) -> dict[str, Any]:
    """Importance-sampled NLL of ``model`` over every example served by ``batches``.

    ``batches`` yields ``(x, y)`` pairs (as :class:`vaekit.data.BatchLoader` does) or bare x
    tensors (B, C, H, W); evaluate on binarized data for a Bernoulli model. Samples come from a
    generator seeded with ``seed`` inside a forked RNG, so the caller's stream is untouched and
    the result is reproducible. ``max_examples`` stops after that many examples.

    Returns ``nll`` (mean -log p(x), nats per example), ``nll_stderr`` (standard error across
    examples), ``bits_per_dim`` and its standard error (nats / (pixels * ln 2)), ``n``, ``k``,
    and ``log_px`` (list of per-example estimates) when ``per_example``.
    """
    _check_model(model)
    k = _check_k(k)
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                     or max_examples < 1):
        raise InputError(f"max_examples must be a positive integer or None, got {describe(max_examples)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    conditional = model.conditional
    acc: NLLAccumulator | None = None
    seen = 0
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for batch in batches:
                x, y = (batch[0], batch[1]) if isinstance(batch, tuple | list) else (batch, None)
                if max_examples is not None:
                    x = x[: max_examples - seen]
                    y = y[: x.shape[0]] if y is not None else None
                if acc is None:
                    acc = NLLAccumulator(math.prod(x.shape[1:]))
                x = x.to(device)
                labels = y.to(device) if (conditional and y is not None) else None
                if conditional and labels is None:
                    raise InputError(f"{type(model).__name__} is conditional: batches must yield (x, y) pairs")
                acc.update(log_likelihood(model, x, k, y=labels, max_samples=max_samples))
                seen += x.shape[0]
                if max_examples is not None and seen >= max_examples:
                    break
    finally:
        model.train(was_training)
    if acc is None:
        raise InputError("nll received no batches")
    result: dict[str, Any] = {**acc.compute(), "k": k}
    if per_example:
        result["log_px"] = torch.cat(acc.values).tolist()
    return result
