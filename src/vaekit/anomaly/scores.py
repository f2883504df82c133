"""Per-image anomaly scores (larger = more anomalous), each a small :class:`Score` class.

=====================  ==================================================  =====================
name                   score of image x, nats unless stated                needs
=====================  ==================================================  =====================
``mse``                mean over pixels of (x - reconstruct(x))^2          any family
``recon``              -log p(x | z = posterior mean) (VQ-VAE: its codes)  any family
``neg_elbo``           -(1/k) sum_k log w_k, w_k = p(x|z_k) p(z_k)/q(z_k|x)  gaussian_posterior, defines_elbo
``nll``                -log p(x), importance sampled with k samples        gaussian_posterior, defines_elbo
``kl``                 KL(q(z|x) || p(z)), closed form                     gaussian_posterior, defines_elbo
``latent_norm``        ||E_q[z]||_2 (no unit)                              continuous_latent
``mahalanobis``        Mahalanobis distance of E_q[z] to the aggregated    continuous_latent, fit
                       posterior of reference images (no unit)
``complexity``         -log p(x) - L(x), L = PNG length (Serrà et al. 2020)  gaussian_posterior, defines_elbo
``likelihood_regret``  log p(x; encoder tuned on x) - log p(x) (Xiao et al.)  gaussian_posterior, defines_elbo
``typicality``         |s(x) - mean_ref s| / std_ref s of a base score      base's, fit
``ensemble``           sum_j max(0, z_j)^2 of standardized components      components', fit
=====================  ==================================================  =====================

The importance-sampled likelihood is :func:`vaekit.evaluation.nll.log_likelihood`; the ELBO's
log weights come from :func:`vaekit.objectives.iwae.importance_terms` (the code training uses).
Run a score over many images with :func:`score_images` (batched, seeded, input checked).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch

from vaekit.anomaly.base import (
    NotFittedError,
    Score,
    UnsupportedModelError,
    batches,
    check_images,
    check_labels,
    check_number,
    check_positive_int,
    decode,
    encode,
    has_capability,
    require,
)
from vaekit.anomaly.compression import check_compress_level, compressed_length
from vaekit.errors import InputError, describe
from vaekit.evaluation.nll import MAX_K, log_likelihood
from vaekit.objectives.iwae import importance_terms

SCORES: dict[str, type[Score]] = {}


def register_score(cls: type[Score]) -> type[Score]:
    SCORES[cls.name] = cls
    return cls


def _point(model: Any, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """The posterior's point estimate: its mean (B, D), or the code indices of a discrete-latent model."""
    q = encode(model, x, y)
    return q if not has_capability(model, "continuous_latent") else q.mean


@register_score
class MSE(Score):
    """Mean squared error per pixel between x and its reconstruction (decoder mean at the posterior mean)."""

    name = "mse"
    stochastic = True  # autoregressive decoders' mean follows one sampled path

    def compute(self, model, x, y):
        rec = model.reconstruct(x, y)
        return (rec.double() - x.double()).pow(2).flatten(1).mean(1)


@register_score
class Recon(Score):
    """-log p(x|z) at z = the posterior mean (a deterministic code for point-mass or discrete encoders)."""

    name = "recon"

    def compute(self, model, x, y):
        return -decode(model, _point(model, x, y), y).log_prob(x).double()


class _Sampled(Score):
    """A score drawing ``k`` posterior samples per image."""

    default_k: ClassVar[int] = 1
    requires = ("gaussian_posterior", "defines_elbo")
    stochastic = True

    def __init__(self, k: int | None = None, max_samples: int = 1024):
        self.k = check_positive_int("k", self.default_k if k is None else k, upper=MAX_K)
        self.max_samples = check_positive_int("max_samples", max_samples)

    def params(self):
        return {"k": self.k, "max_samples": self.max_samples}


@register_score
class NegELBO(_Sampled):
    """-ELBO estimated with k posterior samples: -(1/k) sum_k log w_k (k = 1: the training loss at beta 1)."""

    name = "neg_elbo"

    def compute(self, model, x, y):
        return -importance_terms(model, x, self.k, y).log_w.double().mean(0)


@register_score
class NLL(_Sampled):
    """-log p(x) by importance sampling with k samples (an upper bound that tightens with k)."""

    name = "nll"
    default_k = 100

    def compute(self, model, x, y):
        return -log_likelihood(model, x, self.k, y=y, max_samples=self.max_samples)


@register_score
class KL(Score):
    """KL(q(z|x) || p(z)) in closed form (``model.kl_per_example``: N(0, I), or a CVAE's learned p(z|c))."""

    name = "kl"
    requires = ("gaussian_posterior", "defines_elbo")

    def compute(self, model, x, y):
        return model.kl_per_example(encode(model, x, y), y).double()


@register_score
class LatentNorm(Score):
    """Euclidean norm of the posterior mean, ||E_q[z]||_2."""

    name = "latent_norm"
    requires = ("continuous_latent",)

    def compute(self, model, x, y):
        return encode(model, x, y).mean.double().norm(dim=1)


@register_score
class Mahalanobis(Score):
    """Mahalanobis distance of the posterior mean to the aggregated posterior of reference images.

    ``fit`` approximates q(z) = (1/N) sum_n q(z|x_n) by a Gaussian with its exact first two
    moments: mean m = mean_n mu_n and covariance S = Cov_n(mu_n) + mean_n diag(sigma_n^2)
    (sigma = 0 for a point-mass encoder). The score is sqrt((mu(x) - m)^T S^-1 (mu(x) - m)).
    ``ridge`` is added to S's diagonal (relative to its mean variance) to keep it invertible.
    """

    name = "mahalanobis"
    requires = ("continuous_latent",)
    needs_fit = True

    def __init__(self, ridge: float = 1e-6):
        self.ridge = check_number("ridge", ridge, low=0.0)

    def params(self):
        return {"ridge": self.ridge}

    @property
    def fitted(self) -> bool:
        return hasattr(self, "mean_")

    @torch.no_grad()
    def fit(self, model, reference, y=None, *, batch_size=256, seed=0):
        self.check_model(model)
        reference = check_images(model, reference, "reference")
        y = check_labels(model, y, reference.shape[0])
        if reference.shape[0] < 2:
            raise InputError(f"reference must hold at least 2 images to estimate a covariance, "
                             f"got {reference.shape[0]}")
        was = model.training
        model.eval()
        mus, vars_ = [], []
        try:
            for xb, yb in batches(reference, y, batch_size):
                q = encode(model, xb.to(model.device), yb.to(model.device) if yb is not None else None)
                mus.append(q.mean.double().cpu())
                if has_capability(model, "gaussian_posterior"):
                    vars_.append(q.logvar.double().exp().cpu())
        finally:
            model.train(was)
        mu = torch.cat(mus)  # (N, D)
        cov = torch.cov(mu.T, correction=1).reshape(mu.shape[1], mu.shape[1])
        if vars_:
            cov = cov + torch.diag(torch.cat(vars_).mean(0))
        self.mean_ = mu.mean(0)
        self.cov_ = cov
        self._factor()
        return self

    def _factor(self) -> None:
        D = self.cov_.shape[0]
        scale = float(torch.diagonal(self.cov_).mean()) or 1.0
        cov = self.cov_ + self.ridge * scale * torch.eye(D, dtype=torch.float64)
        chol, info = torch.linalg.cholesky_ex(cov)
        if int(info) != 0:
            raise InputError(f"the aggregated posterior's covariance is singular (the reference codes span fewer "
                             f"than {D} dimensions); raise ridge above {self.ridge}")
        self.chol_ = chol

    def state(self):
        if not self.fitted:
            return {}
        return {"mean": self.mean_.tolist(), "cov": self.cov_.tolist()}

    def load_state(self, state):
        try:
            mean = torch.tensor(state["mean"], dtype=torch.float64)
            cov = torch.tensor(state["cov"], dtype=torch.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"mahalanobis state must hold 'mean' (D,) and 'cov' (D, D) lists, got "
                             f"{describe(state)}") from exc
        if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
            raise InputError(f"mahalanobis state: mean {tuple(mean.shape)} and cov {tuple(cov.shape)} do not fit")
        self.mean_, self.cov_ = mean, cov
        self._factor()

    def compute(self, model, x, y):
        mu = encode(model, x, y).mean.double().cpu()  # (B, D)
        if mu.shape[1] != self.mean_.shape[0]:
            raise InputError(f"the model's latent has {mu.shape[1]} dimensions but the score was fit on "
                             f"{self.mean_.shape[0]}")
        u = torch.linalg.solve_triangular(self.chol_, (mu - self.mean_).T, upper=False)  # (D, B)
        return u.pow(2).sum(0).sqrt().to(x.device)


@register_score
class Complexity(_Sampled):
    """Input-complexity corrected likelihood (Serrà et al. 2020): S(x) = -log p(x) - L(x).

    -log p(x) is importance sampled with ``k`` samples; L(x) is the image's PNG length
    (Pillow, ``compress_level``) in nats. A simple image (low L) that a model finds likely only
    because it is simple gets no credit for it.
    """

    name = "complexity"
    default_k = 16

    def __init__(self, k: int | None = None, max_samples: int = 1024, compress_level: int = 9):
        super().__init__(k, max_samples)
        self.compress_level = check_compress_level(compress_level)

    def params(self):
        return {**super().params(), "compress_level": self.compress_level}

    def compute(self, model, x, y):
        nll = -log_likelihood(model, x, self.k, y=y, max_samples=self.max_samples)
        return nll - compressed_length(x, self.compress_level).to(nll.device)


@register_score
class LikelihoodRegret(Score):
    """Likelihood Regret (Xiao et al. 2020): how much log p(x) grows when the encoder is tuned to x alone.

    For each image a copy of the encoder (every parameter that shapes q(z|x) and not p(x|z)) is
    trained for ``steps`` Adam steps (``lr``, weight decay ``weight_decay``, betas (0.9, 0.999))
    on that image's one-sample -ELBO, as in the authors' compute_LR.py (100 steps, lr 2e-4,
    weight decay 5e-5); the score is the bound after minus before, each with ``k`` samples:
    ``bound="iwae"`` (their choice) the importance-sampled log p(x), ``bound="elbo"`` the ELBO
    (then, once tuning converges, the regret is KL(q(z|x) || p(z|x)) of the untuned encoder: the
    amortization gap). One image at a time: ``steps`` forward and backward passes each. Slow; kept
    as the reference it is.
    """

    name = "likelihood_regret"
    requires = ("gaussian_posterior", "defines_elbo")
    stochastic = True
    grad = True

    def __init__(self, steps: int = 100, lr: float = 2e-4, weight_decay: float = 5e-5, k: int = 100,
                 bound: str = "iwae", max_samples: int = 1024):
        if bound not in ("iwae", "elbo"):
            raise InputError(f"bound must be 'iwae' or 'elbo', got {describe(bound)}")
        self.bound = bound
        self.steps = check_positive_int("steps", steps, upper=100_000)
        self.lr = check_number("lr", lr, low=0.0, open_low=True)
        self.weight_decay = check_number("weight_decay", weight_decay, low=0.0)
        self.k = check_positive_int("k", k, upper=MAX_K)
        self.max_samples = check_positive_int("max_samples", max_samples)

    def params(self):
        return {"steps": self.steps, "lr": self.lr, "weight_decay": self.weight_decay, "k": self.k,
                "bound": self.bound, "max_samples": self.max_samples}

    def _bound(self, model: Any, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.bound == "iwae":
            return log_likelihood(model, x, self.k, y=y, max_samples=self.max_samples)
        return importance_terms(model, x, self.k, y).log_w.double().mean(0)

    @staticmethod
    def encoder_parameters(model: Any, x: torch.Tensor, y: torch.Tensor | None) -> list[torch.nn.Parameter]:
        """Parameters with a gradient from q(z|x) and none from p(x|z) (found by one backward pass each)."""
        params = [p for p in model.parameters() if p.requires_grad]
        q = encode(model, x, y)
        enc = torch.autograd.grad((q.mean.sum() + q.logvar.sum()), params, allow_unused=True)
        z = q.mean.detach()
        dec = torch.autograd.grad(decode(model, z, y).log_prob(x).sum(), params, allow_unused=True)
        return [p for p, ge, gd in zip(params, enc, dec, strict=True)
                if ge is not None and bool(ge.abs().sum() > 0) and (gd is None or not bool(gd.abs().sum() > 0))]

    def compute(self, model, x, y):
        with torch.no_grad():
            before = self._bound(model, x, y)
        work = copy.deepcopy(model)
        work.eval()
        enc = self.encoder_parameters(work, x[:1], y[:1] if y is not None else None)
        if not enc:
            raise UnsupportedModelError(f"score 'likelihood_regret' found no encoder-only parameters in "
                                        f"{type(model).__name__}")
        start = [p.detach().clone() for p in enc]
        for p in work.parameters():
            p.requires_grad_(False)
        for p in enc:
            p.requires_grad_(True)
        after = []
        for i in range(x.shape[0]):
            xi, yi = x[i : i + 1], (y[i : i + 1] if y is not None else None)
            with torch.no_grad():
                for p, s in zip(enc, start, strict=True):
                    p.copy_(s)
            opt = torch.optim.Adam(enc, lr=self.lr, betas=(0.9, 0.999), weight_decay=self.weight_decay)
            for _ in range(self.steps):
                loss = -importance_terms(work, xi, 1, yi).log_w.sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                after.append(self._bound(work, xi, yi))
        return torch.cat(after) - before


def _check_spec(spec: Any, name: str) -> Score:
    if isinstance(spec, Score):
        return spec
    if isinstance(spec, str):
        return make_score(spec)
    if isinstance(spec, dict):
        return score_from_dict(spec)
    raise InputError(f"{name} must be a score name, a Score or a score dict, got {describe(spec)}")


class _Standardized(Score):
    """Shared by scores built on other scores: per-component reference mean and std."""

    needs_fit = True

    @property
    def fitted(self) -> bool:
        return hasattr(self, "loc_")

    def _components(self) -> list[Score]:
        raise NotImplementedError

    def check_model(self, model):
        require(model, self.requires, self.name)  # the union of the components' needs
        for c in self._components():
            c.check_model(model)

    def fit(self, model, reference, y=None, *, batch_size=256, seed=0):
        """Fit each component (on the first half of ``reference`` when it needs fitting) and take the
        location and scale of its scores on the rest, so a fitted component is standardized on images
        it was not fit on."""
        comps = self._components()
        reference = check_images(model, reference, "reference")
        n = reference.shape[0]
        y = check_labels(model, y, n)
        if n < 4:
            raise InputError(f"reference must hold at least 4 images, got {n}")
        half = n // 2 if any(c.needs_fit for c in comps) else 0
        locs, scales = [], []
        for c in comps:
            if c.needs_fit:
                c.fit(model, reference[:half], y[:half] if y is not None else None, batch_size=batch_size, seed=seed)
            s = score_images(model, reference[half:], c, y[half:] if y is not None else None,
                             batch_size=batch_size, seed=seed)
            locs.append(float(s.mean()))
            scales.append(float(s.std()) or 1.0)
        self.loc_, self.scale_ = locs, scales
        return self

    def state(self):
        if not self.fitted:
            return {}
        return {"loc": self.loc_, "scale": self.scale_, "components": [c.state() for c in self._components()]}

    def load_state(self, state):
        comps = self._components()
        try:
            loc, scale, sub = list(state["loc"]), list(state["scale"]), list(state["components"])
        except (KeyError, TypeError) as exc:
            raise InputError(f"{self.name} state must hold 'loc', 'scale' and 'components', got "
                             f"{describe(state)}") from exc
        if not len(loc) == len(scale) == len(sub) == len(comps):
            raise InputError(f"{self.name} state holds {len(loc)} components, the score has {len(comps)}")
        for c, s in zip(comps, sub, strict=True):
            c.load_state(s)
        self.loc_, self.scale_ = [float(v) for v in loc], [float(v) for v in scale]

    def standardized(self, model, x, y) -> list[torch.Tensor]:
        return [(c.compute(model, x, y).double() - lo) / sc
                for c, lo, sc in zip(self._components(), self.loc_, self.scale_, strict=True)]


@register_score
class Typicality(_Standardized):
    """Two-sided per-image typicality: |s(x) - mean| / std of a base score on reference images.

    With ``base="neg_elbo"`` it flags images the model finds too unlikely and, unlike the
    likelihood itself, also images it finds far *more* likely than its data (the failure of
    Nalisnick et al. 2019: simple images out of distribution).
    """

    name = "typicality"

    def __init__(self, base: Any = "neg_elbo"):
        self.base = _check_spec(base, "base")
        if self.base.grad:
            raise InputError(f"typicality's base must be a batched score, got {self.base.name!r}")
        self.requires = self.base.requires
        self.stochastic = self.base.stochastic

    def _components(self):
        return [self.base]

    def params(self):
        return {"base": score_to_dict(self.base, state=False)}

    def compute(self, model, x, y):
        return self.standardized(model, x, y)[0].abs()


DEFAULT_ENSEMBLE = ("neg_elbo", {"name": "complexity", "params": {"k": 1}}, "mse")


@register_score
class Ensemble(_Standardized):
    """Sum of squared standardized component scores, each counted where it is above its mean.

        S(x) = sum_j max(0, z_j(x))^2,   z_j = (s_j(x) - mean_j) / std_j

    Means and stds come from in-distribution reference images only (see ``fit``), never from OOD
    data. Components named in ``two_sided`` count in both directions, as z_j^2 (a score whose
    unusually *small* values are anomalous too, such as the likelihood of a model that gives
    simple OOD images a higher likelihood than its data). The default, -ELBO + the input-
    complexity corrected likelihood + reconstruction MSE, covers each one's blind spot: the
    likelihood misses simple images (MNIST under a Fashion-MNIST model, all-black images), the
    complexity correction misses noise (its PNG length is huge), and the MSE misses blank images.
    """

    name = "ensemble"

    def __init__(self, components: Any = DEFAULT_ENSEMBLE, two_sided: Any = ()):
        if isinstance(components, str | Score | dict) or not components:
            raise InputError(f"components must be a non-empty list of scores, got {describe(components)}")
        self.components = [_check_spec(c, "components[i]") for c in components]
        names = [c.name for c in self.components]
        if len(set(names)) != len(names):
            raise InputError(f"components must be distinct scores, got {names}")
        if isinstance(two_sided, str) or not all(n in names for n in two_sided):
            raise InputError(f"two_sided must list component names from {names}, got {describe(two_sided)}")
        if any(c.grad for c in self.components):
            raise InputError("ensemble components must be batched scores (not likelihood_regret)")
        self.two_sided = [str(n) for n in two_sided]
        self.requires = tuple(dict.fromkeys(r for c in self.components for r in c.requires))
        self.stochastic = any(c.stochastic for c in self.components)

    def _components(self):
        return self.components

    def params(self):
        return {"components": [score_to_dict(c, state=False) for c in self.components],
                "two_sided": list(self.two_sided)}

    def compute(self, model, x, y):
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for c, z in zip(self.components, self.standardized(model, x, y), strict=True):
            z = z.to(x.device)
            total += (z if c.name in self.two_sided else z.clamp(min=0)).pow(2)
        return total


# -- construction and (de)serialization -------------------------------------------------------------
def make_score(name: str, **params: Any) -> Score:
    """A score by name (one of :data:`SCORES`) with its parameters."""
    if name not in SCORES:
        raise InputError(f"score must be one of {sorted(SCORES)}, got {describe(name)}")
    try:
        return SCORES[name](**params)
    except TypeError as exc:
        raise InputError(f"bad parameters for score {name!r}: {exc}") from exc


def score_to_dict(score: Score, state: bool = True) -> dict[str, Any]:
    """{"name", "params"[, "state"]}: JSON-safe; :func:`score_from_dict` rebuilds it."""
    out: dict[str, Any] = {"name": score.name, "params": score.params()}
    if state and score.needs_fit:
        out["state"] = score.state()
    return out


def score_from_dict(data: Any) -> Score:
    """Inverse of :func:`score_to_dict` (a fitted state, when present, is restored)."""
    if not isinstance(data, dict) or "name" not in data:
        raise InputError(f"a score dict needs 'name' (and optional 'params', 'state'), got {describe(data)}")
    params = data.get("params") or {}
    if not isinstance(params, dict):
        raise InputError(f"score params must be a dict, got {describe(params)}")
    score = make_score(data["name"], **params)
    if data.get("state"):
        score.load_state(data["state"])
    return score


def as_score(score: Any, **params: Any) -> Score:
    """A Score from a Score, a name (with ``params``) or a score dict."""
    if params:
        if not isinstance(score, str):
            raise InputError(f"score parameters go with a score name, got {describe(score)} and {sorted(params)}")
        return make_score(score, **params)
    return _check_spec(score, "score")


# -- the runner -------------------------------------------------------------------------------------
def score_images(model: Any, x: Any, score: Any = "neg_elbo", y: Any = None, *, batch_size: int = 256,
                 seed: int = 0, **params: Any) -> torch.Tensor:
    """Score every image of x (N, C, H, W) in [0, 1]: (N,) float64 on the CPU, larger = more anomalous.

    ``score`` is a name from :data:`SCORES` (``params`` go to its constructor), a :class:`Score`
    or a score dict. Images go through the model in slices of ``batch_size`` on the model's
    device, in eval mode (restored after). Scores that sample draw from a generator seeded with
    ``seed`` inside a forked RNG: the caller's random stream is untouched and results repeat.
    ``y`` holds labels (or condition vectors) for a conditional model.
    """
    s = as_score(score, **params)
    s.check_model(model)
    if not s.fitted:
        raise NotFittedError(f"score {s.name!r} must be fit on reference images first: "
                             f"score.fit(model, reference) (or use AnomalyDetector)")
    x = check_images(model, x)
    y = check_labels(model, y, x.shape[0])
    batch_size = check_positive_int("batch_size", batch_size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an integer, got {describe(seed)}")
    device = model.device
    was = model.training
    if was:  # eval() walks every module: skipped when already in eval mode (it matters at batch 1)
        model.eval()
    out = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=s.stochastic):
            if s.stochastic:
                # the CPU generator alone (torch.manual_seed also seeds every accelerator backend: 60 us)
                torch.default_generator.manual_seed(seed)
                if device.type == "cuda":
                    torch.cuda.manual_seed(seed)
            with torch.set_grad_enabled(s.grad):
                for xb, yb in batches(x, y, batch_size):
                    xb = xb.to(device)
                    yb = yb.to(device) if yb is not None else None
                    out.append(s.compute(model, xb, yb).detach().double().cpu())
    finally:
        if was:
            model.train(was)
    return torch.cat(out)


__all__ = ["SCORES", "Score", "as_score", "make_score", "require", "score_from_dict", "score_images",
           "score_to_dict"]
