"""Drift detectors, each checked against an independent computation on a case with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from vaekit.errors import ConfigError, InputError, NotFittedError
from vaekit.monitoring.detectors import (
    DetectorResult,
    ExceedanceDetector,
    GateCounts,
    GateRejectionDetector,
    InputStatsDetector,
    KSDetector,
    MMDDetector,
    MomentsDetector,
    RollingMeanDetector,
    adjust_pvalues,
    aggregated_moments,
    default_detectors,
    latent_norm_detector,
    mmd_from_blocks,
    mmd_from_kernel,
    random_labellings,
    rbf_kernel,
    recon_error_detector,
    reference_offset_sd,
)
from vaekit.monitoring.reference import Reference, Window, reference_from_arrays, reference_from_profile
from vaekit.objectives.mmd import mmd_rbf

pytestmark = pytest.mark.usefixtures("one_thread")
D = 6


def gaussian(n: int, seed: int, shift: np.ndarray | float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, D)) + shift


# -- KS ----------------------------------------------------------------------------------------------
def test_ks_pvalues_equal_scipy_per_dimension():
    ref, win = gaussian(400, 0), gaussian(150, 1, shift=np.array([0, 0, 0.6, 0, 0, 0]))
    det = KSDetector().fit(Reference(latent=ref))
    res = det.score(Window(latent=win))
    direct = [stats.ks_2samp(ref[:, d], win[:, d]).pvalue for d in range(D)]
    np.testing.assert_allclose(res.details["p_values"], direct, rtol=1e-12)
    assert res.drifted and res.details["flagged"] == [2]  # only the shifted dimension
    assert res.p_value == pytest.approx(min(1.0, min(direct) * D))  # Bonferroni
    assert not det.score(Window(latent=gaussian(150, 2))).drifted


def _ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """sup |ECDF_a - ECDF_b| by hand: both ECDFs evaluated at every pooled value."""
    t = np.concatenate([a, b])
    fa = np.searchsorted(np.sort(a), t, side="right") / a.size
    fb = np.searchsorted(np.sort(b), t, side="right") / b.size
    return float(np.abs(fa - fb).max())


def test_ks_margin_p_values_are_the_one_sample_law_past_the_dkw_margin():
    ref, win = gaussian(400, 0), gaussian(150, 1, shift=np.array([0, 0, 1.0, 0, 0, 0]))
    det = KSDetector(confidence=0.99).fit(Reference(latent=ref))
    assert det.margin_ == pytest.approx(math.sqrt(math.log(2 * D / 0.01) / (2 * 400)))
    res = det.score(Window(latent=win))
    dist = np.array([_ks_distance(ref[:, d], win[:, d]) for d in range(D)])
    np.testing.assert_allclose(res.details["p_values"], stats.kstwo.sf(np.maximum(dist - det.margin_, 0), 150),
                               rtol=1e-10)
    plain = [stats.ks_2samp(ref[:, d], win[:, d]).pvalue for d in range(D)]
    np.testing.assert_allclose(res.details["p_values_without_margin"], plain, rtol=1e-12)
    assert res.statistic == pytest.approx(dist.max())
    assert res.drifted and res.details["flagged"] == [2]
    assert min(res.details["p_values"]) > min(plain)  # the margin costs power
    for bad in (1.0, 0.3, True, "0.99"):
        with pytest.raises(ConfigError, match="confidence"):
            KSDetector(confidence=bad).fit(Reference(latent=ref))


def test_ks_margin_covers_the_reference_cdf_and_bounds_each_reference_false_alarm_rate():
    """The margin is the DKW-Massart bound with a union over features: with probability >= confidence every
    reference ECDF is within it of the true CDF (checked on uniform data, where the true CDF is the identity),
    and then no reference's false-alarm rate exceeds alpha; the plain test's does, for some references."""
    rng = np.random.default_rng(5)
    n, feats = 150, 3
    margin = KSDetector(confidence=0.9).fit(Reference(latent=rng.random((n, feats)))).margin_
    grid = np.arange(1, n + 1) / n
    sups = []
    for _ in range(2000):
        u = np.sort(rng.random((n, feats)), axis=0)
        sups.append(np.maximum(np.abs(grid[:, None] - u), np.abs(grid[:, None] - 1 / n - u)).max())
    assert np.mean(np.array(sups) <= margin) >= 0.9

    alpha, m, wins = 0.05, 50, 200
    plain, tolerant = [], []
    for _ in range(16):
        ref = Reference(latent=rng.normal(size=(n, feats)))
        dets = [KSDetector(alpha=alpha, confidence=c).fit(ref) for c in (None, 0.9)]
        windows = [Window(latent=rng.normal(size=(m, feats))) for _ in range(wins)]
        plain.append(np.mean([dets[0].score(w).drifted for w in windows]))
        tolerant.append(np.mean([dets[1].score(w).drifted for w in windows]))
    noise = 2.5 * math.sqrt(alpha * (1 - alpha) / wins)
    assert max(tolerant) <= alpha and max(plain) > alpha + noise / 2
    assert abs(np.mean(plain) - alpha) < noise  # the plain test's level holds on average over references


def test_benjamini_hochberg_by_hand():
    p = np.array([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205])
    # m p_(i) / i = .008 .032 .104 .082 .0672 .08 .08457 .205, then the running minimum from the end
    hand = [0.008, 0.032, 0.0672, 0.0672, 0.0672, 0.08, 0.074 * 8 / 7, 0.205]
    np.testing.assert_allclose(adjust_pvalues(p, "bh"), hand)
    np.testing.assert_allclose(adjust_pvalues(p, "bonferroni"), np.minimum(1, p * 8))
    # BH flags at 0.05 the two smallest; Bonferroni (0.05/8 = 0.00625) only the first
    assert (adjust_pvalues(p, "bh") < 0.05).sum() == 2 and (adjust_pvalues(p, "bonferroni") < 0.05).sum() == 1


def test_ks_bh_detector_uses_bh():
    ref, win = gaussian(400, 0), gaussian(150, 3, shift=0.25)
    res = KSDetector(correction="bh").fit(Reference(latent=ref)).score(Window(latent=win))
    direct = np.array([stats.ks_2samp(ref[:, d], win[:, d]).pvalue for d in range(D)])
    np.testing.assert_allclose(res.details["adjusted"], stats.false_discovery_control(direct), rtol=1e-10)


def test_input_stats_detector_reads_pixel_fields():
    rng = np.random.default_rng(0)
    ref = Reference(pixel_mean=rng.normal(0.13, 0.03, 500), pixel_var=rng.normal(0.1, 0.02, 500))
    det = InputStatsDetector().fit(ref)
    same = Window(pixel_mean=rng.normal(0.13, 0.03, 200), pixel_var=rng.normal(0.1, 0.02, 200))
    brighter = Window(pixel_mean=rng.normal(0.23, 0.03, 200), pixel_var=rng.normal(0.1, 0.02, 200))
    assert not det.score(same).drifted
    r = det.score(brighter)
    assert r.drifted and r.details["flagged"] == [0]


# -- moments -----------------------------------------------------------------------------------------
def test_aggregated_moments_match_monte_carlo_of_the_mixture():
    rng = np.random.default_rng(0)
    mu = rng.normal(0.3, 0.5, size=(200, D))
    logvar = rng.normal(-1.0, 0.3, size=(200, D))
    mean, var = aggregated_moments(mu, logvar)
    # draw z ~ q(z) = (1/N) sum_x N(mu(x), sigma^2(x)) directly and compare
    z = mu[None] + np.exp(0.5 * logvar)[None] * rng.normal(size=(2000, 200, D))
    z = z.reshape(-1, D)
    np.testing.assert_allclose(mean, z.mean(0), atol=0.01)
    np.testing.assert_allclose(var, z.var(0), rtol=0.01)


def test_fixed_moments_rule_is_the_briefs():
    det = MomentsDetector(rule="fixed").fit()
    n = 1000
    prior_like = Window(latent=np.zeros((n, D)), logvar=np.zeros((n, D)))  # q(z) = N(0, I) exactly
    r = det.score(prior_like)
    assert not r.drifted and r.statistic == pytest.approx(0.8)  # var 1 -> 0.8 / 1
    mu = np.zeros((n, D))
    mu[:, 1] = 0.15  # mean 0.15 > 0.1 in dim 1
    lv = np.zeros((n, D))
    lv[:, 4] = math.log(0.7)  # var 0.7 < 0.8 in dim 4
    r = det.score(Window(latent=mu, logvar=lv))
    assert r.drifted and r.details["flagged"] == [1, 4]
    assert r.statistic == pytest.approx(1.5)  # 0.15 / 0.1


def test_calibrated_moments_false_alarms_and_power():
    rng = np.random.default_rng(1)
    ref = Reference(latent=rng.normal(size=(2000, D)), logvar=rng.normal(-2, 0.1, size=(2000, D)))
    det = MomentsDetector(n_splits=500).fit(ref)
    alarms = [det.score(Window(latent=rng.normal(size=(200, D)), logvar=rng.normal(-2, 0.1, size=(200, D)))).drifted
              for _ in range(100)]
    assert sum(alarms) <= 4  # alpha = 0.01: expect 1 in 100
    shrunk = Window(latent=0.7 * rng.normal(size=(200, D)), logvar=rng.normal(-2, 0.1, size=(200, D)))
    r = det.score(shrunk)
    assert r.drifted and r.p_value < 0.01 and r.details["variance"] == "q(z)"


# -- MMD ---------------------------------------------------------------------------------------------
def direct_mmd2(x: np.ndarray, y: np.ndarray, bws: tuple[float, ...]) -> float:
    """The unbiased estimator by its definition, with explicit loops over pairs."""
    def k(a, b):
        return sum(math.exp(-float(((a - b) ** 2).sum()) / (2 * s * s)) for s in bws)
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_mmd_statistic_matches_the_direct_formula():
    x, y, bws = gaussian(12, 0), gaussian(9, 1, shift=0.5), (0.7, 1.4, 2.8)
    want = direct_mmd2(x, y, bws)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    assert mmd_rbf(xt, yt, bws) == pytest.approx(want, rel=1e-10)
    pooled = torch.cat([xt, yt])
    wx = torch.zeros(1, 21, dtype=torch.float64)
    wx[0, :12] = 1.0  # the identity labelling: the matrix form the permutations use
    assert float(mmd_from_kernel(rbf_kernel(pooled, pooled, bws), wx, 3.0)[0]) == pytest.approx(want, rel=1e-10)
    # a relabelling: the direct formula on the permuted split
    perm = np.random.default_rng(0).permutation(21)
    wx = torch.zeros(1, 21, dtype=torch.float64)
    wx[0, perm[:12]] = 1.0
    p = pooled.numpy()
    want_p = direct_mmd2(p[perm[:12]], p[perm[12:]], bws)
    assert float(mmd_from_kernel(rbf_kernel(pooled, pooled, bws), wx, 3.0)[0]) == pytest.approx(want_p, rel=1e-10)


def test_mmd_detector_p_values_and_power():
    ref = Reference(latent=gaussian(1000, 0))
    det = MMDDetector(n_permutations=200, n_reference=300).fit(ref)
    r = det.score(Window(latent=gaussian(150, 5, shift=0.4)))
    assert r.drifted and r.p_value == pytest.approx(1 / 201)
    assert r.statistic == pytest.approx(mmd_rbf(det.reference_, torch.from_numpy(gaussian(150, 5, shift=0.4)),
                                                det.bandwidths_))
    small = MMDDetector(n_permutations=100, n_reference=150, confidence=None).fit(ref)
    ps = [small.score(Window(latent=gaussian(80, 100 + i))).p_value for i in range(25)]
    assert 0.2 < float(np.mean(ps)) < 0.8  # uniform p-values under no drift have mean 1/2
    # the margin: the statistic less z sd(A) is compared with the same permutations, so p only grows
    tol = MMDDetector(n_permutations=100, n_reference=150).fit(ref)
    assert tol.margin_ == pytest.approx(stats.norm.ppf(0.99) * tol.offset_sd_) and tol.margin_ > 0
    for i in range(5):
        res = tol.score(Window(latent=gaussian(80, 200 + i)))
        assert res.p_value >= res.details["p_value_without_margin"]
    with pytest.raises(ConfigError, match="n_permutations"):
        MMDDetector(n_permutations=50).fit(ref)


def test_mmd_permutation_test_has_level_alpha_on_exchangeable_data():
    """The plain permutation test (confidence=None), a fresh reference and window from one distribution per
    trial: the share of alarms must be the test's
    exact level P(p < alpha) = (ceil(alpha (P + 1)) - 1) / (P + 1) = 9 / 200 here, within binomial error.
    Labellings that are not uniform, or an observed statistic computed unlike the permuted ones (the biased
    V-statistic for the observed labelling alarms on about half of these windows), fall out of the interval."""
    alpha, perms, trials = 0.05, 199, 1000
    level = (math.ceil(alpha * (perms + 1)) - 1) / (perms + 1)  # p = (1 + b) / 200 < 0.05  <=>  b <= 8
    assert level == pytest.approx(0.045)
    rng = np.random.default_rng(7)
    rejected = 0
    for t in range(trials):
        ref = rng.standard_t(5, size=(60, 3))  # heavy tails: exactness does not rest on Gaussian data
        win = rng.standard_t(5, size=(40, 3))
        det = MMDDetector(alpha=alpha, n_permutations=perms, seed=t, confidence=None).fit(Reference(latent=ref))
        rejected += det.score(Window(latent=win)).drifted
    lo, hi = stats.binom(trials, level).ppf([0.0005, 0.9995])  # a two-sided 99.9 % interval: [25, 68]
    assert lo <= rejected <= hi, (rejected, lo, hi)


def test_mmd_block_form_equals_the_pooled_matrix_and_the_direct_formula():
    x, y, bws = gaussian(14, 0), gaussian(9, 1, shift=0.3), (0.7, 1.4, 2.8)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    labels = random_labellings(14, 9, 6, np.random.default_rng(0))  # (6, 23), 14 ones per row
    assert labels.shape == (6, 23) and (labels.sum(1) == 14).all()
    pooled = mmd_from_kernel(rbf_kernel(torch.cat([xt, yt]), torch.cat([xt, yt]), bws), labels, 3.0)
    blocks = mmd_from_blocks(rbf_kernel(xt, xt, bws), rbf_kernel(xt, yt, bws), rbf_kernel(yt, yt, bws), labels, 3.0)
    np.testing.assert_allclose(blocks.numpy(), pooled.numpy(), rtol=1e-12)
    both = np.concatenate([x, y])
    for row, got in zip(labels.numpy().astype(bool), blocks.numpy(), strict=True):
        assert got == pytest.approx(direct_mmd2(both[row], both[~row], bws), rel=1e-10)


def test_mmd_reference_offset_sd_matches_the_spread_of_the_exactly_centred_term():
    """Independent check of sd(A): for N(0, I) and an RBF kernel the mean embedding is known in closed form,
    mu(x) = (s^2 / (s^2 + 1))^(D/2) exp(-|x|^2 / (2 (s^2 + 1))) and E k = (s^2 / (s^2 + 2))^(D/2), so A (the
    reference-only term, kernel centred at the population) can be computed exactly for many references and its
    standard deviation compared with the estimate from one reference's kernel matrix."""
    n, d, s = 80, 2, 1.3
    rng = np.random.default_rng(3)
    a_values, estimates = [], []
    for _ in range(400):
        x = rng.normal(size=(n, d))
        k = rbf_kernel(torch.from_numpy(x), torch.from_numpy(x), (s,)).numpy()
        mu = (s * s / (s * s + 1)) ** (d / 2) * np.exp(-(x ** 2).sum(1) / (2 * (s * s + 1)))
        kt = k - mu[:, None] - mu[None, :] + (s * s / (s * s + 2)) ** (d / 2)
        a_values.append((kt.sum() - np.trace(kt)) / (n * (n - 1)))
        estimates.append(reference_offset_sd(torch.from_numpy(k)))
    assert abs(np.mean(a_values)) < 3 * np.std(a_values) / math.sqrt(400)  # A has mean 0
    assert float(np.median(estimates)) == pytest.approx(float(np.std(a_values)), rel=0.15)


def test_mmd_margin_keeps_each_reference_false_alarm_rate_near_alpha():
    """The plain permutation test is exact on average over references, not for each: a reference with a
    positive offset A alarms on more than alpha of its windows. With the margin (confidence 0.99) no reference
    of these 16 exceeds alpha by more than binomial noise; without it, some do, by far."""
    alpha, n, m, wins = 0.05, 120, 40, 150
    rng = np.random.default_rng(11)
    plain, tolerant = [], []
    for r in range(16):
        ref = Reference(latent=rng.normal(size=(n, 3)))
        dets = [MMDDetector(alpha=alpha, n_permutations=99, seed=r, confidence=c).fit(ref) for c in (None, 0.99)]
        windows = [Window(latent=rng.normal(size=(m, 3))) for _ in range(wins)]
        plain.append(np.mean([dets[0].score(w).drifted for w in windows]))
        tolerant.append(np.mean([dets[1].score(w).drifted for w in windows]))
    noise = 2.5 * math.sqrt(alpha * (1 - alpha) / wins)  # binomial sd of one reference's rate
    assert max(tolerant) <= alpha + noise and np.mean(tolerant) < alpha
    assert max(plain) > alpha + noise and np.mean(plain) > np.mean(tolerant)


def test_mmd_reference_kernel_is_reused_and_the_statistic_is_unchanged():
    ref, win = gaussian(700, 0), gaussian(120, 3, shift=0.1)
    det = MMDDetector(n_reference=500).fit(Reference(latent=ref))
    assert det.reference_.shape == (500, D) and det.reference_kernel_.shape == (500, 500)
    np.testing.assert_allclose(det.reference_kernel_, rbf_kernel(det.reference_, det.reference_, det.bandwidths_))
    r = det.score(Window(latent=win))
    assert r.statistic == pytest.approx(mmd_rbf(det.reference_, torch.from_numpy(win), det.bandwidths_), rel=1e-9)
    assert r.details["n_reference"] == 500
    whole = MMDDetector().fit(Reference(latent=ref))  # the default keeps every row of a reference up to 2,000
    assert whole.reference_.shape == (700, D)
    np.testing.assert_array_equal(whole.reference_.numpy(), ref)


# -- the gate's rejection share ------------------------------------------------------------------------
def test_gate_rejection_share_needs_both_the_share_and_the_binomial_test():
    det = GateRejectionDetector().fit()
    assert det.baseline_rate_ == 0.002 and det.max_share == 0.01
    # n = 500: 5 refused is 1 %, not more than 1 %; 6 is 1.2 % with P(K >= 6) far below alpha
    assert not det.score(GateCounts(500, 5)).drifted
    r = det.score(GateCounts(500, 6, {"low_variance": 6}))
    assert r.drifted and r.statistic == pytest.approx(0.012) and r.threshold == 0.01
    assert r.p_value == pytest.approx(1 - stats.binom.cdf(5, 500, 0.002), rel=1e-9)
    assert r.p_value == pytest.approx(1 - sum(math.comb(500, j) * 0.002 ** j * 0.998 ** (500 - j) for j in range(6)))
    # a big window: 0.9 % is far beyond the clean rate but not over 1 %: no alarm
    big = det.score(GateCounts(100_000, 900))
    assert big.p_value < 1e-100 and not big.drifted
    # n = 200 at a clean rate of 1 %: the binomial test is what stops 3 refusals (1.5 %) alarming
    lax = GateRejectionDetector(baseline_rate=0.01).fit()
    assert not lax.score(GateCounts(200, 3)).drifted and GateRejectionDetector().fit().score(GateCounts(200, 3)).drifted
    assert det.score(GateCounts(300, 0)).p_value == 1.0


def test_gate_rejection_false_alarm_rate_is_bounded_at_the_baseline_rate():
    """Exactly, from the binomial law: over windows of n images at a clean rate p <= baseline, the share of
    alarms is P(K >= k*) for the smallest alarming k*, which must be <= alpha (and, simulated, is)."""
    det = GateRejectionDetector().fit()
    for n in (200, 500, 2000):
        k_star = next(k for k in range(n + 1) if det.score(GateCounts(n, k)).drifted)
        far = float(stats.binom.sf(k_star - 1, n, 0.002))
        assert far <= 0.01
        sim = np.random.default_rng(n).binomial(n, 0.002, size=20_000)
        assert np.mean(sim >= k_star) == pytest.approx(far, abs=4 * math.sqrt(far / 20_000) + 1e-4)


def test_gate_rejection_errors_name_the_value():
    with pytest.raises(InputError, match="rejected must be <= n, got rejected=5, n=3"):
        GateCounts(3, 5)
    with pytest.raises(InputError, match="GateCounts.n must be an integer >= 0, got -1"):
        GateCounts(-1, 0)
    with pytest.raises(ConfigError, match="max_share must be a number in"):
        GateRejectionDetector(max_share=1.5).fit()
    with pytest.raises(NotFittedError):
        GateRejectionDetector().score(GateCounts(10, 1))
    with pytest.raises(InputError, match="GateCounts, got Window"):
        GateRejectionDetector().fit().score(Window(latent=gaussian(5, 0)))


# -- exceedance ---------------------------------------------------------------------------------------
def test_exceedance_counts_and_p_value():
    ref_values = np.arange(1, 1001, dtype=float)  # p99 = 990.01: 10 values above
    det = recon_error_detector().fit(Reference(recon_mse=ref_values))
    assert det.threshold_ == pytest.approx(np.quantile(ref_values, 0.99)) and det.n_above_ == 10
    win = np.full(200, 5.0)
    win[:7] = 2000.0  # 7 of 200 above the line (3.5 %)
    r = det.score(Window(recon_mse=win))
    assert r.details["count"] == 7 and r.statistic == pytest.approx(0.035)
    p0 = stats.beta.ppf(0.99, 11, 990)  # the 99 % upper bound of the reference's exceedance rate
    assert det.p0_ == pytest.approx(p0) and r.p_value == pytest.approx(stats.binom(200, p0).sf(6))
    marginal = ExceedanceDetector("recon_mse", quantile=0.99, confidence=None).fit(Reference(recon_mse=ref_values))
    assert marginal.score(Window(recon_mse=win)).p_value == pytest.approx(stats.betabinom(200, 11, 990).sf(6))
    fixed = ExceedanceDetector("recon_mse", quantile=0.99, test="fixed").fit(Reference(recon_mse=ref_values))
    rf = fixed.score(Window(recon_mse=win))
    assert rf.drifted and rf.p_value is None  # 3.5 % > 1 %


def test_exceedance_false_alarm_rates_by_simulation():
    """Monte Carlo on uniform data, where the line's true exceedance probability is 1 - line: the marginal
    test's false-alarm rate is <= alpha, the fixed rule's is as stated, and the tolerance test's
    false-alarm rate exceeds alpha for at most 1 - confidence of the references."""
    rng = np.random.default_rng(0)
    N, n, trials = 1000, 300, 2000
    alarms_marginal, alarms_fixed, stated, unlucky = 0, 0, [], 0
    ks = np.arange(n + 1)
    for _ in range(trials):
        ref, win = rng.random(N), rng.random(n)  # no drift: same distribution
        m = ExceedanceDetector("recon_mse", quantile=0.99, confidence=None).fit(Reference(recon_mse=ref))
        f = ExceedanceDetector("recon_mse", quantile=0.99, test="fixed").fit(Reference(recon_mse=ref))
        t = ExceedanceDetector("recon_mse", quantile=0.99).fit(Reference(recon_mse=ref))
        alarms_marginal += m.score(Window(recon_mse=win)).drifted
        rf = f.score(Window(recon_mse=win))
        alarms_fixed += rf.drifted
        stated.append(rf.details["false_alarm_rate"])
        k_star = ks[t.null_distribution(n).sf(ks - 1) < 0.01][0]  # the smallest count that alarms
        unlucky += stats.binom(n, 1 - t.threshold_).sf(k_star - 1) > 0.01  # this reference's exact FAR
    assert alarms_marginal / trials <= 0.01 + 3 * math.sqrt(0.01 * 0.99 / trials)
    far = alarms_fixed / trials
    assert far == pytest.approx(np.mean(stated), abs=4 * math.sqrt(far * (1 - far) / trials))
    assert far > 0.2  # the brief's "> 1 % of the window" alone alarms often with no drift at all
    assert unlucky / trials <= 0.01 + 3 * math.sqrt(0.01 * 0.99 / trials)


def test_latent_norm_rule():
    det = latent_norm_detector().fit(Reference(latent_norm=np.full(2000, 3.0)))
    assert det.threshold_ == 5.0 and det.n_above_ == 0
    norms = np.full(1000, 3.0)
    assert not det.score(Window(latent_norm=norms)).drifted
    norms[:2] = 6.0  # 0.2 % above 5: over the brief's 0.1 %, but 0 of 2,000 reference images only bound the
    fixed = latent_norm_detector(test="fixed").fit(Reference(latent_norm=np.full(2000, 3.0)))
    assert fixed.score(Window(latent_norm=norms)).drifted  # the reference's rate by 0.23 % (99 % confidence)
    assert not det.score(Window(latent_norm=norms)).drifted
    norms[:10] = 6.0  # 1 %
    assert det.score(Window(latent_norm=norms)).drifted


# -- rolling means ------------------------------------------------------------------------------------
def test_rolling_mean_uses_the_last_period_and_three_sigma():
    rng = np.random.default_rng(0)
    ref = Reference(recon_mse=rng.normal(1.0, 0.2, 1000))
    det = RollingMeanDetector(fields=("recon_mse",)).fit(ref)
    ts = np.arange(600, dtype=float)  # one request a second for 10 minutes
    values = np.full(600, 1.0)
    values[:300] = 5.0  # drifted, but more than 5 minutes ago
    values[300:] = rng.normal(1.0, 0.2, 300)
    r = det.score(Window(recon_mse=values, timestamps=ts))
    recent = values[ts >= ts.max() - 300]
    se = ref.recon_mse.std(ddof=1) * math.sqrt(1 / recent.size + 1 / 1000)
    assert r.n == 301 and r.details["z"]["recon_mse"] == pytest.approx((recent.mean() - ref.recon_mse.mean()) / se)
    assert not r.drifted
    values[-300:] += 0.1  # a shift of 0.5 sd of a single request: ~ 7 sigma for a 5-minute mean
    assert det.score(Window(recon_mse=values, timestamps=ts)).drifted


# -- contract ----------------------------------------------------------------------------------------
def full_reference(n: int = 1000, seed: int = 0) -> Reference:
    rng = np.random.default_rng(seed)
    return reference_from_arrays(latent=rng.normal(size=(n, D)), logvar=np.full((n, D), -2.0),
                                 recon_mse=rng.gamma(2, 0.01, n), kl=rng.gamma(20, 1, n),
                                 latent_norm=rng.gamma(16, 0.15, n), pixel_mean=rng.normal(0.13, 0.03, n),
                                 pixel_var=rng.normal(0.1, 0.02, n))


def full_window(n: int = 200, seed: int = 1) -> Window:
    r = full_reference(n, seed)
    return Window(**{k: getattr(r, k) for k in ("latent", "logvar", "recon_mse", "kl", "latent_norm",
                                                "pixel_mean", "pixel_var")})


@pytest.mark.parametrize("name", list(default_detectors()))
def test_contract_unfitted_fit_score(name):
    det = default_detectors()[name]
    with pytest.raises(NotFittedError, match="fit"):
        det.score(full_window())
    assert not any(k.endswith("_") for k in vars(det) if not k.startswith("_"))  # __init__ only stores arguments
    assert det.fit(full_reference()) is det
    r = det.score(full_window())
    assert isinstance(r, DetectorResult) and r.detector == name and isinstance(r.drifted, bool)
    assert (r.p_value is None) or 0 < r.p_value <= 1
    with pytest.raises(InputError, match="Window"):
        det.score({"latent": np.zeros((5, D))})


def test_input_errors_name_the_field():
    with pytest.raises(InputError, match="Reference.latent"):
        KSDetector().fit(Reference(recon_mse=np.ones(10)))
    with pytest.raises(InputError, match="unknown reference array"):
        reference_from_arrays(latents=np.zeros((3, 2)))
    with pytest.raises(InputError, match="same length"):
        Window(latent=np.zeros((3, 2)), recon_mse=np.zeros(4))
    with pytest.raises(InputError, match="finite"):
        Window(recon_mse=np.array([1.0, np.nan]))
    det = KSDetector().fit(Reference(latent=np.random.default_rng(0).normal(size=(50, 3))))
    with pytest.raises(InputError, match="features"):
        det.score(Window(latent=np.zeros((10, 4))))
    with pytest.raises(ConfigError, match="alpha"):
        KSDetector(alpha=1.5).fit(full_reference())
    with pytest.raises(ConfigError, match="correction"):
        KSDetector(correction="holm").fit(full_reference())


def test_reference_from_profile_maps_names():
    class FakeProfile:  # a stand-in with the reference profile's array names (vaekit.registry.profile)
        arrays = {"ref_means": torch.zeros(4, 2), "recon_nll": torch.ones(7), "mean_norm": torch.ones(7),
                  "intensity_hist": torch.full((4,), 0.25), "agg_mean": torch.zeros(2)}

    ref = reference_from_profile(FakeProfile())
    assert ref.latent.shape == (4, 2) and ref.recon_nats.shape == (7,) and ref.latent_norm.shape == (7,)
    assert ref.intensity_hist.sum() == pytest.approx(1.0) and ref.recon_mse is None


def test_reference_from_a_real_profile(mnist):
    """compute_profile on real MNIST images -> Reference -> every default detector fits and scores."""
    from vaekit import VAE, VAEConfig
    from vaekit.monitoring.reference import window_from_inspection
    from vaekit.registry.profile import compute_profile

    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=4, hidden_sizes=(32,))).eval()
    held = mnist.test.images[:600].float() / 255.0
    profile = compute_profile(model, held[:400], source="MNIST test[:400]", sample_size=300, latency_runs=1,
                              latency_warmup=0)
    ref = reference_from_profile(profile)
    assert ref.latent.shape == (300, 4) and ref.recon_mse.shape == (400,) and ref.intensity_hist.shape == (32,)
    np.testing.assert_allclose(ref.latent_norm, np.linalg.norm(_all_means(model, held[:400]), axis=1), rtol=1e-4)
    with torch.no_grad():
        window = window_from_inspection(model.inspect(held[400:]), held[400:])
    for name, det in default_detectors().items():
        r = det.fit(ref).score(window)
        assert r.detector == name and r.n in (200, len(window))


def _all_means(model, x):
    with torch.no_grad():
        return model.encode(x).mean.double().numpy()
