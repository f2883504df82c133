"""Deployment loop: routing, the canary decision (pure), and latent comparison of two versions."""

import math
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import ortho_group

from vaekit.deploy import CanaryPolicy, RoutingPolicy, Window, compare_latents, decide, linear_cka, unit_hash
from vaekit.deploy.policy import mean_ratio_bounds, quantile_bounds
from vaekit.errors import ConfigError, InputError

# per-image reconstruction MSE of an MNIST VAE is right-skewed with a coefficient of variation about 0.5;
# a log-normal with sigma 0.5 has CV 0.53
SIGMA = 0.5


def errors(rng, n, scale=1.0):
    return rng.lognormal(math.log(0.03), SIGMA, n) * scale


# -- routing -------------------------------------------------------------------------------------------
def test_routing_is_the_same_in_another_process_and_hits_the_share():
    keys = [f"req-{i}" for i in range(20000)]
    policy = RoutingPolicy(canary_share=0.05)
    here = [policy.route(k) for k in keys[:50]]
    code = ("from vaekit.deploy import RoutingPolicy; p = RoutingPolicy(canary_share=0.05); "
            "print(','.join(p.route(f'req-{i}') for i in range(50)))")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert there.split(",") == here  # stable across processes (no per-process hash seed)
    n = sum(policy.route(k) == "canary" for k in keys)
    assert abs(n - 1000) < 4 * math.sqrt(20000 * 0.05 * 0.95)  # the configured share within binomial error
    assert all(policy.route(k, has_canary=False) == "production" for k in keys[:200])
    mirrored = sum(RoutingPolicy(shadow_share=0.1).mirror(k) for k in keys)
    assert abs(mirrored - 2000) < 4 * math.sqrt(20000 * 0.1 * 0.9)
    other = RoutingPolicy(canary_share=0.05, salt="canary-2")
    overlap = sum(policy.route(k) == other.route(k) == "canary" for k in keys)
    assert overlap < 150  # a new salt reshuffles who is in the canary (independent: about 50)


def test_routing_validates_its_settings():
    with pytest.raises(ConfigError, match="canary_share"):
        RoutingPolicy(canary_share=1.5)
    with pytest.raises(InputError, match="non-empty string"):
        unit_hash("")
    assert 0 <= unit_hash("a") < 1 and unit_hash("a") == unit_hash("a") != unit_hash("a", "salt")


# -- the bounds behind the decision ------------------------------------------------------------------------
def test_mean_ratio_bounds_cover_the_true_ratio_at_the_stated_rate():
    rng = np.random.default_rng(0)
    misses_low = misses_high = 0
    for _ in range(400):
        b = mean_ratio_bounds(errors(rng, 3000), errors(rng, 600, 1.1), confidence=0.95)
        misses_low += b["lower"] > 1.1
        misses_high += b["upper"] < 1.1
    # each one-sided bound fails with probability 5%: 20 of 400 expected, 4 sigma = 17
    assert misses_low < 37 and misses_high < 37


def test_quantile_bounds_are_order_statistics_that_cover_the_quantile():
    rng = np.random.default_rng(1)
    true_p99 = math.exp(math.log(0.03) + SIGMA * 2.3263478740408408)  # lognormal quantile
    low = high = 0
    for _ in range(400):
        lo, hi = quantile_bounds(errors(rng, 2000), 0.99, 0.95)
        low += lo > true_p99
        high += hi < true_p99
    assert low < 37 and high < 37  # conservative: at most about 5% each
    x = np.arange(1.0, 101.0)
    lo, hi = quantile_bounds(x, 0.99, 0.9)
    assert lo in x and hi == math.inf  # 100 points cannot bound a p99 from above at 90%


# -- decide ----------------------------------------------------------------------------------------------------
def test_an_a_a_canary_is_never_rolled_back_over_100_windows():
    rng = np.random.default_rng(2)
    policy = CanaryPolicy(min_duration_s=0)
    actions = [decide(Window(errors(rng, 19000), kl=rng.gamma(20, 1, 19000)),
                      Window(errors(rng, 1000), kl=rng.gamma(20, 1, 1000), duration_s=60), policy).action
               for _ in range(100)]
    assert "rollback" not in actions
    assert "promote" in actions  # and a passing canary does get promoted


def test_a_canary_5_percent_worse_is_rolled_back_within_a_stated_number_of_requests():
    """Canary at 5% of traffic, decided every 500 canary requests on its growing window: with the default
    policy (2% margin, 99% confidence) every trial rolls back by 12,000 canary requests (240,000 in all)."""
    policy = CanaryPolicy(min_duration_s=0)
    first = []
    for trial in range(20):
        rng = np.random.default_rng(100 + trial)
        prod, can = errors(rng, 19 * 12000), errors(rng, 12000, 1.05)
        for n in range(500, 12001, 500):
            d = decide(Window(prod[: 19 * n]), Window(can[:n], duration_s=n), policy)
            assert d.action != "promote"
            if d.action == "rollback":
                first.append(n)
                assert any("reconstruction error mean" in r for r in d.reasons)
                break
    assert len(first) == 20, f"rolled back in {len(first)} of 20 trials"
    assert np.median(first) <= 6000


def test_decide_waits_for_requests_and_duration_and_explains():
    rng = np.random.default_rng(3)
    policy = CanaryPolicy(min_requests=500, min_duration_s=3600)
    d = decide(Window(errors(rng, 1000)), Window(errors(rng, 100), duration_s=10), policy)
    assert d.action == "hold" and "fewer than 500" in d.reasons[0]
    d = decide(Window(errors(rng, 40000)), Window(errors(rng, 20000), duration_s=600), policy)
    assert d.action == "hold" and "600 s of the 3600 s" in d.reasons[0]
    assert d.evidence["recon_mean"]["upper"] <= 1.02 and d.evidence["canary"]["n"] == 20000


def test_fid_drift_and_collapse_roll_back_even_on_small_windows():
    rng = np.random.default_rng(4)
    p = CanaryPolicy(min_duration_s=0)
    d = decide(Window(errors(rng, 100), fid=10.0), Window(errors(rng, 50), fid=10.5), p)
    assert d.action == "rollback" and "FID" in d.reasons[0]
    assert decide(Window(errors(rng, 100), fid=10.0), Window(errors(rng, 50), fid=10.1), p).action == "hold"
    d = decide(Window(errors(rng, 5000), latent_drift_p=0.4), Window(errors(rng, 1000), latent_drift_p=1e-6), p)
    assert d.action == "rollback" and "drifted" in d.reasons[0]
    both = decide(Window(errors(rng, 5000), latent_drift_p=1e-5), Window(errors(rng, 1000), latent_drift_p=1e-6), p)
    assert both.action != "rollback"  # the data moved, not the canary
    d = decide(Window(errors(rng, 5000), kl=rng.gamma(20, 1, 5000)),
               Window(errors(rng, 1000), kl=rng.gamma(20, 1, 1000) * 0.1), p)
    assert d.action == "rollback" and "collapse" in d.reasons[0]


def test_decide_validates_its_input():
    with pytest.raises(InputError, match="recon must be finite, got 1 NaN/inf value"):
        Window(np.array([0.1, float("nan")]))
    with pytest.raises(InputError, match=r"recon must be an array \(N,\) with N >= 0, got shape \(2, 2\)"):
        Window(np.zeros((2, 2)))
    with pytest.raises(InputError, match="one value per image"):
        Window(np.ones(3), kl=np.ones(2))
    with pytest.raises(InputError, match="two Window objects"):
        decide([0.1], Window(np.ones(3)))
    with pytest.raises(ConfigError, match="margin"):
        CanaryPolicy(margin=-0.1)


# -- latent comparison ---------------------------------------------------------------------------------------
def _hsic_cka(x, y):
    """CKA through centred Gram matrices (Kornblith et al. 2019, Eq. 3): an independent computation."""
    n = x.shape[0]
    h = np.eye(n) - 1.0 / n
    k, lm = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    hsic = lambda a, b: np.sum(a * b)  # noqa: E731  (tr(A B) for symmetric A, B)
    return hsic(k, lm) / math.sqrt(hsic(k, k) * hsic(lm, lm))


def test_cka_and_procrustes_see_through_rotation_and_scale():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 6))
    rot = ortho_group.rvs(6, random_state=1)
    same = compare_latents(x, 3.0 * x @ rot + 2.0)
    assert same["linear_cka"] == pytest.approx(1.0, abs=1e-9)
    assert same["procrustes_disparity"] == pytest.approx(0.0, abs=1e-9)
    other = compare_latents(x, rng.normal(size=(300, 6)))
    assert other["linear_cka"] < 0.1 and other["procrustes_disparity"] > 0.8
    y = x[:, :4] + 0.3 * rng.normal(size=(300, 4))  # a narrower, noisy code of the same inputs
    assert linear_cka(x, y) == pytest.approx(_hsic_cka(x, y), rel=1e-9)
    assert 0.3 < compare_latents(x, y)["linear_cka"] < 1
    with pytest.raises(InputError, match="same inputs"):
        linear_cka(x, x[:10])


# -- applying decisions through the registry --------------------------------------------------------------------
def test_decisions_move_aliases_with_reasons_and_evidence_in_the_history(db_uri, tmp_path):
    import torch

    from vaekit.deploy import Decision, apply_decision, start_canary
    from vaekit.models import VAE, VAEConfig
    from vaekit.registry import ModelRegistry

    reg = ModelRegistry(db_uri, artifact_root=tmp_path / "artifacts", actor="deploy@test")
    for seed in range(3):
        torch.manual_seed(seed)
        VAE(VAEConfig(hidden_sizes=(8,), latent_dim=2)).save(tmp_path / f"m{seed}")
        reg.register(tmp_path / f"m{seed}", "mnist", profile=False)
    reg.set_alias("mnist", "production", 1, "first release")
    start_canary(reg, "mnist", 2, "new candidate")
    assert apply_decision(reg, "mnist", Decision("hold", ["waiting"])) == []
    rng = np.random.default_rng(0)
    d = decide(Window(errors(rng, 19000), version=1), Window(errors(rng, 1000, 1.2), version=2),
               CanaryPolicy(min_duration_s=0))
    assert d.action == "rollback"
    apply_decision(reg, "mnist", d)
    assert reg.aliases("mnist") == {"production": 1}  # the canary is out of traffic, production untouched
    last = reg.history("mnist", "canary")[-1]
    assert last.to_version is None and "rollback" in last.reason and last.evidence["recon_mean"]["lower"] > 1.02
    start_canary(reg, "mnist", 3, "second candidate")
    d = decide(Window(errors(rng, 190000)), Window(errors(rng, 10000), duration_s=90000), CanaryPolicy())
    assert d.action == "promote"
    events = apply_decision(reg, "mnist", d)
    assert [e.alias for e in events] == ["production", "canary"] and reg.aliases("mnist") == {"production": 3}
    prod = reg.history("mnist", "production")
    assert [(e.from_version, e.to_version) for e in prod] == [(None, 1), (1, 3)]
    assert prod[-1].evidence["decision"] == "promote" and prod[-1].actor == "deploy@test"
    with pytest.raises(InputError, match="no 'canary' alias"):
        apply_decision(reg, "mnist", d)
    reg.close()


# -- the benchmark-suite gate --------------------------------------------------------------------------------------
def test_the_suite_gate_passes_an_equal_candidate_and_names_what_a_worse_one_forgot(mnist, tmp_path):
    import torch

    from vaekit.data import ImageDataset, ImageSplit
    from vaekit.deploy.suite import SuitePolicy, gate, run_suite
    from vaekit.models import VAE, VAEConfig
    from vaekit.training import TrainConfig, Trainer

    torch.manual_seed(0)
    prod = VAE(VAEConfig(hidden_sizes=(64,), latent_dim=4))
    small = ImageDataset("mnist", mnist.train.subset(2000), mnist.test.subset(300), mnist.classes, mnist.provenance)
    Trainer(prod, small, TrainConfig(epochs=2, progress=False, tensorboard="off", checkpoint_every=0),
            run_dir=tmp_path / "run").fit()
    later = ImageSplit(mnist.test.images[5000:5300], mnist.test.labels[5000:5300])  # another writer group
    new = ImageDataset("new", small.train, later, small.classes)
    dists = {"original": small, "new": new}
    policy = SuitePolicy(parts=("elbo", "recon"))
    p_res = run_suite(prod, dists, tmp_path / "prod", policy)
    same = gate(run_suite(prod, dists, tmp_path / "same", policy), p_res, policy)
    assert same.passed and same.reasons == [] and len(same.comparisons) == 2 * 4  # 2 dists x (2 elbo + 2 recon)
    worse = VAE(VAEConfig(hidden_sizes=(64,), latent_dim=4))
    worse.load_state_dict(prod.state_dict())
    with torch.no_grad():  # a damaged decoder: every figure gets worse
        for p in worse.decoder.parameters():
            p.add_(0.3 * torch.randn_like(p))
    res = gate(run_suite(worse.eval(), dists, tmp_path / "worse", policy), p_res, policy)
    assert not res.passed
    assert any(r.startswith("original: recon.mse") and "2% allowed" in r for r in res.reasons)
    assert any(r.startswith("new: elbo.neg_elbo") and "0% allowed" in r for r in res.reasons)
