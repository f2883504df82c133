"""Anomaly scores, detector, typicality test and OOD metrics, against independent computations."""

from __future__ import annotations

import io
import json
import math
import zlib

import numpy as np
import pytest
import torch
from helpers import rand_images
from PIL import Image

from vaekit.anomaly import (
    SCORES,
    AnomalyDetector,
    NotFittedError,
    TypicalityTest,
    UnsupportedModelError,
    aupr,
    auroc,
    compressed_length,
    corrupt,
    fpr_at_tpr,
    has_capability,
    make_score,
    ood_datasets,
    ood_report,
    score_from_dict,
    score_images,
    score_to_dict,
    window_statistics,
)
from vaekit.anomaly.compression import png_bytes
from vaekit.errors import InputError, VaekitError
from vaekit.models import VAE, VAEConfig, build_model

pytestmark = pytest.mark.usefixtures("one_thread")

P_SHAPE = (1, 4, 4)  # 16 pixels
D = 3
SIGMA = 0.3
SCALES = torch.tensor([1.5, 0.8, 0.4], dtype=torch.float64)
B0 = 0.5


def _loadings() -> torch.Tensor:
    """W (16, 3) with orthogonal columns of norms SCALES (so W^T W is diagonal)."""
    q, _ = torch.linalg.qr(torch.randn(16, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    return q * SCALES


def linear_gaussian(exact_posterior: bool = True, shift: float = 0.15, widen: float = 0.5) -> VAE:
    """p(z) = N(0, I), p(x|z) = N(W z + b, sigma^2 I): log p(x) = log N(x; b, W W^T + sigma^2 I) in closed form.

    With orthogonal columns the exact posterior is diagonal: N(M^-1 W^T (x - b), sigma^2 M^-1), M = W^T W + sigma^2 I,
    which the linear encoder heads can represent exactly (``exact_posterior``) or miss (shifted and too wide).
    """
    model = VAE(VAEConfig(input_shape=P_SHAPE, latent_dim=D, hidden_sizes=(), likelihood="gaussian",
                          gaussian_sigma=SIGMA)).double()
    W = _loadings()
    m = SCALES.pow(2) + SIGMA**2  # diag of M
    A = W.T / m[:, None]  # (D, P) = M^-1 W^T
    with torch.no_grad():
        model.decoder.out.weight.copy_(W)
        model.decoder.out.bias.fill_(B0)
        model.to_mean.weight.copy_(A)
        model.to_mean.bias.copy_(-A.sum(1) * B0)
        model.to_logvar.weight.zero_()
        model.to_logvar.bias.copy_(torch.log(SIGMA**2 / m))
        if not exact_posterior:
            model.to_mean.bias.add_(shift)
            model.to_logvar.bias.add_(widen)
    return model.eval()


def closed_form_log_px(x: torch.Tensor) -> torch.Tensor:
    W = _loadings()
    cov = W @ W.T + SIGMA**2 * torch.eye(16, dtype=torch.float64)
    mvn = torch.distributions.MultivariateNormal(torch.full((16,), B0, dtype=torch.float64), covariance_matrix=cov)
    return mvn.log_prob(x.flatten(1).double())


def _x(n: int = 64, seed: int = 1) -> torch.Tensor:
    return rand_images(n, P_SHAPE, seed).double()


# -- each score against an independent computation ---------------------------------------------------
def test_elbo_and_nll_equal_the_closed_form_log_likelihood_under_the_exact_posterior():
    model, x = linear_gaussian(), _x()
    want = -closed_form_log_px(x)
    # exact posterior: every importance weight equals p(x), so any k gives log p(x) exactly
    for name, params in (("neg_elbo", {"k": 1}), ("neg_elbo", {"k": 7}), ("nll", {"k": 3})):
        got = score_images(model, x, name, **params)
        assert torch.allclose(got, want, atol=1e-8), name


def test_nll_converges_to_the_closed_form_with_a_poor_encoder():
    model, x = linear_gaussian(exact_posterior=False), _x(16)
    want = -closed_form_log_px(x)
    elbo = score_images(model, x, "neg_elbo", k=200)
    nll = score_images(model, x, "nll", k=20000)
    assert (elbo - want).min() > 0.05  # the ELBO is a strict bound with this posterior
    assert (nll - want).abs().max() < 0.02
    assert (nll <= elbo + 1e-6).all()


def test_recon_mse_kl_and_latent_norm_against_direct_formulas():
    model, x = linear_gaussian(), _x()
    W = _loadings()
    m = SCALES.pow(2) + SIGMA**2
    mu = (x.flatten(1) - B0) @ W / m  # (B, D), the exact posterior mean
    var = SIGMA**2 / m
    mean_x = mu @ W.T + B0  # decoder mean at the posterior mean, (B, 16)
    const = 16 * (math.log(SIGMA) + 0.5 * math.log(2 * math.pi))
    recon = 0.5 * ((x.flatten(1) - mean_x) ** 2).sum(1) / SIGMA**2 + const
    kl = 0.5 * (var + mu**2 - 1 - torch.log(var)).sum(1)
    assert torch.allclose(score_images(model, x, "recon"), recon, atol=1e-9)
    assert torch.allclose(score_images(model, x, "mse"), ((x.flatten(1) - mean_x) ** 2).mean(1), atol=1e-12)
    assert torch.allclose(score_images(model, x, "kl"), kl, atol=1e-9)
    assert torch.allclose(score_images(model, x, "latent_norm"), mu.norm(dim=1), atol=1e-9)


def test_mahalanobis_matches_numpy_on_the_aggregated_posterior():
    model = linear_gaussian()
    ref, x = _x(300, seed=5), _x(20, seed=6)
    s = make_score("mahalanobis", ridge=0.0).fit(model, ref)
    with torch.no_grad():
        q_ref, q_x = model.encode(ref), model.encode(x)
    mu = q_ref.mean.numpy()
    cov = np.cov(mu.T) + np.diag(np.exp(q_ref.logvar.numpy()).mean(0))
    diff = q_x.mean.numpy() - mu.mean(0)
    want = np.sqrt(np.einsum("bi,ij,bj->b", diff, np.linalg.inv(cov), diff))
    np.testing.assert_allclose(score_images(model, x, s).numpy(), want, rtol=1e-9)


def test_compressed_length_is_the_png_size_and_png_is_lossless():
    x = rand_images(3, (1, 28, 28), 4)
    x[1] = 0.0  # a constant image compresses far better than noise
    lengths = compressed_length(x)
    arr = torch.round(x * 255).to(torch.uint8).numpy()
    for i in range(3):
        data = png_bytes(arr[i])
        assert lengths[i].item() == pytest.approx(len(data) * 8 * math.log(2))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), arr[i, 0])  # lossless round trip
        buf = io.BytesIO()
        Image.fromarray(arr[i, 0]).save(buf, format="PNG", compress_level=9)
        assert len(buf.getvalue()) == len(data)
    # an all-zero image: the PNG is its 57 bytes of container around one zlib stream of the filtered rows
    raw = b"".join(b"\x00" + bytes(28) for _ in range(28))
    assert len(png_bytes(arr[1])) == 57 + len(zlib.compress(raw, 9))
    assert lengths[1] < lengths[0] / 5


def test_complexity_is_nll_minus_compressed_length():
    model, x = linear_gaussian(), _x(8)
    want = -closed_form_log_px(x) - compressed_length(x)
    assert torch.allclose(score_images(model, x, "complexity", k=2), want, atol=1e-8)


def _exact_posterior(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    W = _loadings()
    m = SCALES.pow(2) + SIGMA**2
    return (x.flatten(1) - B0) @ W / m, (SIGMA**2 / m).expand(x.shape[0], D)


def test_likelihood_regret_is_the_amortization_gap_in_closed_form():
    """With the ELBO as the bound, tuning the linear encoder on one image reaches the exact posterior,
    so the regret is KL(q(z|x) || p(z|x)) of the untuned encoder, a closed form for two Gaussians."""
    x = _x(2)
    poor = linear_gaussian(exact_posterior=False, shift=0.3, widen=1.0)
    before = [p.detach().clone() for p in poor.parameters()]
    with torch.no_grad():
        q = poor.encode(x)
    mean, var = _exact_posterior(x)
    qv = q.logvar.exp()
    want = 0.5 * (qv / var + (q.mean - mean) ** 2 / var - 1 + torch.log(var / qv)).sum(1)
    # small steps: Adam moves each of the 16 x 3 weights by about lr, the mean by about lr * sum(x)
    got = score_images(poor, x, "likelihood_regret", steps=1500, lr=2e-3, weight_decay=0.0, k=4000, bound="elbo")
    assert want.min() > 2
    assert torch.allclose(got, want, atol=0.15), (got, want)  # Monte Carlo error of the two ELBOs, and SGD noise
    assert all(torch.equal(a, b) for a, b in zip(before, poor.parameters(), strict=True))  # model untouched
    exact = linear_gaussian()
    r0 = score_images(exact, x, "likelihood_regret", steps=30, lr=1e-3, k=4000)  # the IWAE bound
    assert r0.abs().max() < 0.02  # nothing to gain: the encoder is already the exact posterior


def test_likelihood_regret_finds_the_encoder_parameters():
    from vaekit.anomaly.scores import LikelihoodRegret

    model = linear_gaussian()
    x = _x(1)
    params = LikelihoodRegret.encoder_parameters(model, x, None)
    names = {n for n, p in model.named_parameters() if any(p is q for q in params)}
    assert names == {"to_mean.weight", "to_mean.bias", "to_logvar.weight", "to_logvar.bias"}


# -- detection metrics against hand-computed values ----------------------------------------------------
def test_metrics_match_hand_computed_values():
    # in = {0.1, 0.4}, OOD = {0.35, 0.8}: OOD beats in in 3 of 4 pairs
    assert auroc([0.1, 0.4], [0.35, 0.8]) == pytest.approx(0.75)
    # ranked 0.8(+) 0.4(-) 0.35(+) 0.1(-): AP = 0.5 * 1 + 0.5 * 2/3
    assert aupr([0.1, 0.4], [0.35, 0.8]) == pytest.approx(0.5 + 1 / 3)
    # flagging both OOD images needs threshold 0.35, which flags 0.4: FPR 1/2
    assert fpr_at_tpr([0.1, 0.4], [0.35, 0.8]) == pytest.approx(0.5)
    # ties count one half: out 2 vs in {1, 2, 2} -> 1 + 0.5 + 0.5, out 3 -> 3; 5 of 6
    assert auroc([1, 2, 2], [2, 3]) == pytest.approx(5 / 6)
    # tied run 2,2,2 flagged together: precision 2/4 at recall 1 after 3 (+) alone at 1/2
    assert aupr([1, 2, 2], [2, 3]) == pytest.approx(0.5 * 1 + 0.5 * 0.5)
    assert fpr_at_tpr([1, 2, 2], [2, 3]) == pytest.approx(2 / 3)
    assert auroc([0, 1], [2, 3]) == 1.0 and auroc([2, 3], [0, 1]) == 0.0
    assert fpr_at_tpr([0, 1], [2, 3]) == 0.0


def test_metrics_agree_with_torchmetrics_on_random_scores():
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision

    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, generator=g)
    b = torch.randn(200, generator=g) + 0.7
    a[:20] = b[:20]  # ties across the classes
    s = torch.cat([a, b])
    t = torch.cat([torch.zeros(300), torch.ones(200)]).long()
    assert auroc(a, b) == pytest.approx(float(binary_auroc(s, t)), abs=1e-6)
    assert aupr(a, b) == pytest.approx(float(binary_average_precision(s, t)), abs=1e-6)


def test_metrics_reject_bad_scores():
    with pytest.raises(InputError, match="in_scores"):
        auroc([], [1.0])
    with pytest.raises(InputError, match="non-finite"):
        aupr([1.0, float("nan")], [1.0])
    with pytest.raises(InputError, match="tpr"):
        fpr_at_tpr([1.0], [2.0], tpr=1.5)


# -- the detector -----------------------------------------------------------------------------------------
def _tiny_vae(seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    return VAE(VAEConfig(input_shape=P_SHAPE, latent_dim=2, hidden_sizes=(8,))).eval()


def test_threshold_gives_the_requested_false_positive_rate_within_binomial_error():
    """Calibrated on held-out in-distribution images, the p95 threshold flags 5% of fresh ones: the
    error is within 4 standard deviations of the calibration quantile's and the test share's binomial errors."""
    model = _tiny_vae()
    calib, test = rand_images(4000, P_SHAPE, 11), rand_images(20000, P_SHAPE, 12)
    for pct in (95.0, 99.0):
        det = AnomalyDetector(model, score="recon", percentile=pct).fit(calib, source="uniform images")
        fpr = float(det.predict(test).double().mean())
        p = 1 - pct / 100
        sd = math.sqrt(p * (1 - p) * (1 / 4000 + 1 / 20000))
        assert abs(fpr - p) < 4 * sd, (pct, fpr)
        assert det.fitted_on_["n_calibration"] == 4000 and det.fitted_on_["source"] == "uniform images"


def test_a_fitted_score_is_calibrated_on_images_it_was_not_fit_on():
    model = _tiny_vae()
    ref = rand_images(400, P_SHAPE, 13)
    det = AnomalyDetector(model, score="mahalanobis", percentile=90, fit_fraction=0.25).fit(ref)
    assert det.fitted_on_["n_score_fit"] == 100 and det.fitted_on_["n_calibration"] == 300
    assert det.calibration_["flagged_share"] == pytest.approx(0.1, abs=0.01)


def test_unfitted_detector_and_scores_raise_a_clear_error():
    model = _tiny_vae()
    det = AnomalyDetector(model, score="neg_elbo")
    for call in (lambda: det.predict(_x(2).float()), lambda: det.score(_x(2).float()), det.to_dict):
        with pytest.raises(NotFittedError, match="fit"):
            call()
    with pytest.raises(NotFittedError, match="mahalanobis"):
        score_images(model, _x(2).float(), "mahalanobis")
    with pytest.raises(NotFittedError):
        TypicalityTest(model).test(_x(100).float())
    assert issubclass(NotFittedError, VaekitError)


def test_detector_round_trips_through_json_and_refuses_other_weights(tmp_path):
    model = _tiny_vae()
    ref, x = rand_images(200, P_SHAPE, 14), rand_images(50, P_SHAPE, 15)
    det = AnomalyDetector(model, score="ensemble", percentile=97).fit(ref, source="held-out")
    doc = json.loads(json.dumps(det.to_dict()))
    again = AnomalyDetector.from_dict(doc, model)
    assert again.threshold_ == det.threshold_
    assert torch.equal(again.score(x), det.score(x)) and torch.equal(again.predict(x), det.predict(x))
    path = det.save(tmp_path / "detector.json")
    assert torch.equal(AnomalyDetector.load(path, model).predict(x), det.predict(x))
    other = _tiny_vae(seed=1)
    with pytest.raises(InputError, match="fit with model"):
        AnomalyDetector.from_dict(doc, other)
    assert AnomalyDetector.from_dict(doc, other, check_model=False).threshold_ == det.threshold_
    broken = dict(doc, threshold="high")
    with pytest.raises(InputError):
        AnomalyDetector.from_dict(broken, model)


def test_detector_validates_its_arguments():
    model = _tiny_vae()
    ref = rand_images(20, P_SHAPE, 16)
    for kwargs, match in (({"percentile": 100}, "percentile"), ({"percentile": 0}, "percentile"),
                          ({"score": "nope"}, "score must be one of"), ({"batch_size": 0}, "batch_size"),
                          ({"fit_fraction": 1.0}, "fit_fraction"), ({"score_params": {"k": 0}}, "k must be")):
        with pytest.raises(InputError, match=match):
            AnomalyDetector(model, **kwargs).fit(ref)


# -- bad inputs and capabilities -------------------------------------------------------------------------
def test_scores_reject_bad_images_naming_the_problem():
    model = _tiny_vae()
    good = rand_images(3, P_SHAPE, 17)
    nan = good.clone()
    nan[0, 0, 0, 0] = float("nan")
    for bad, match in ((good.numpy(), "torch.Tensor"), (good[0], "shape"), ((good * 255).to(torch.uint8), "float"),
                       (good * 2, r"\[0, 1\]"), (nan, "finite"), (good[:0], "at least one")):
        with pytest.raises(InputError, match=match):
            score_images(model, bad, "recon")
    with pytest.raises(InputError, match="k must be"):
        score_images(model, good, "nll", k=0)
    # y is ignored by unconditional families (as by the model interface), required by conditional ones
    assert torch.equal(score_images(model, good, "recon", y=torch.zeros(3, dtype=torch.long)),
                       score_images(model, good, "recon"))
    from vaekit.models import CVAEConfig

    cvae = build_model(CVAEConfig(input_shape=P_SHAPE, latent_dim=2, hidden_sizes=(8,))).eval()
    with pytest.raises(InputError, match="conditional"):
        score_images(cvae, good, "recon")
    with pytest.raises(InputError, match="one row per image"):
        score_images(cvae, good, "recon", y=torch.zeros(2, dtype=torch.long))
    with pytest.raises(InputError, match="bad parameters"):
        score_images(model, good, "kl", k=3)


def test_score_dicts_round_trip():
    model = _tiny_vae()
    ref = rand_images(100, P_SHAPE, 18)
    for name in ("neg_elbo", "complexity", "mahalanobis", "typicality", "ensemble"):
        s = make_score(name)
        if s.needs_fit:
            s.fit(model, ref)
        again = score_from_dict(json.loads(json.dumps(score_to_dict(s))))
        x = rand_images(5, P_SHAPE, 19)
        assert torch.equal(score_images(model, x, again), score_images(model, x, s)), name


def test_every_family_either_scores_or_names_the_missing_capability():
    from test_models import VARIANTS

    x = rand_images(4)
    ref = rand_images(40, seed=3)
    for variant, cfg in VARIANTS.items():
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        y = None
        if model.conditional:
            y = torch.randn(4, cfg.cond_dim) if getattr(cfg, "condition", "class") == "vector" else torch.arange(4)
        for name in SCORES:
            params = {"steps": 1, "k": 2} if name == "likelihood_regret" else {}
            s = make_score(name, **params)
            supported = all(has_capability(model, c) for c in s.requires)
            if not supported:
                with pytest.raises(UnsupportedModelError, match=name):
                    score_images(model, x, s, y)
                continue
            if s.needs_fit:
                yr = None if y is None else torch.cat([y] * 10)[:40]
                s.fit(model, ref, yr)
            out = score_images(model, x, s, y)
            assert out.shape == (4,) and torch.isfinite(out).all(), (variant, name)


# -- typicality and the OOD report ------------------------------------------------------------------------
def test_typicality_test_flags_shifted_windows_at_about_alpha_otherwise():
    model = _tiny_vae()
    ref = rand_images(2000, P_SHAPE, 20)
    test = TypicalityTest(model, "recon", window=20, alpha=0.05, bootstraps=4000).fit(ref)
    fresh = score_images(model, rand_images(4000, P_SHAPE, 21), "recon")
    rate = float(np.mean(window_statistics(test, fresh, 800) > test.epsilon_))
    assert abs(rate - 0.05) < 0.035
    dark = rand_images(20, P_SHAPE, 22) * 0.2
    assert test.test(dark).ood
    with pytest.raises(InputError, match="window must hold 20"):
        test.test(dark[:5])
    again = TypicalityTest.from_dict(json.loads(json.dumps(test.to_dict())), model)
    assert again.test(dark) == test.test(dark)


def test_corruptions_and_ood_sets():
    x = rand_images(6, (1, 28, 28), 23)
    x = torch.round(x * 255) / 255
    sets = ood_datasets("corrupted", x)
    assert set(sets) == {"black", "noise", "inverted", "rotated"}
    assert torch.equal(sets["black"], torch.zeros_like(x))
    assert torch.allclose(sets["inverted"], 1 - x)
    assert torch.equal(sets["rotated"][:, :, 27 - 5, 3], x[:, :, 3, 5])  # counter-clockwise: (r, c) -> (W-1-c, r)
    noise = sets["noise"]
    assert noise.min() >= 0 and noise.max() <= 1 and torch.equal(noise, torch.round(noise * 255) / 255)
    assert (noise - x).abs().mean() > 0.1
    with pytest.raises(InputError, match="ood data must be one of"):
        ood_datasets("svhn", x)
    with pytest.raises(InputError, match="corruption"):
        corrupt(x, "blur")


def test_ood_report_separates_an_obvious_set_and_writes_histograms(tmp_path):
    model = _tiny_vae()
    xin, ref = rand_images(200, P_SHAPE, 24), rand_images(200, P_SHAPE, 25)
    out = {"black": torch.zeros(100, *P_SHAPE), "bright": torch.ones(100, *P_SHAPE)}
    rep = ood_report(model, xin, out, ["recon", "mahalanobis", "complexity"], reference=ref,
                     png_path=tmp_path / "hist.png", time_batches=(1,), time_repeats=3)
    assert set(rep["scores"]) == {"recon", "mahalanobis", "complexity"}
    assert rep["scores"]["complexity"]["ood"]["black"]["auroc"] == 1.0  # nothing compresses like a blank image
    assert rep["scores"]["recon"]["ood"]["bright"]["auroc"] > 0.9
    assert rep["scores"]["recon"]["seconds_per_image_batch1"] > 0
    assert Image.open(tmp_path / "hist.png").format == "PNG"
    with pytest.raises(InputError, match="reference"):
        ood_report(model, xin, out, ["mahalanobis"])


def test_the_ood_report_part_runs_on_corrupted_images_and_skips_without_ood_data(tmp_path):
    from vaekit.data import ImageDataset, ImageSplit
    from vaekit.evaluation.report import EvalConfig, evaluate_model

    g = torch.Generator().manual_seed(26)
    split = ImageSplit(torch.randint(0, 256, (120, *P_SHAPE), dtype=torch.uint8, generator=g), torch.zeros(120).long())
    data = ImageDataset("synthetic", split, split, ("a",))
    model = _tiny_vae()
    rep = evaluate_model(model, data, tmp_path, EvalConfig(metrics=("ood",), ood_data="corrupted", ood_examples=100),
                         name="tiny")
    assert rep["model"] == "tiny"  # the report keeps the model's name (a loop once reused the variable)
    r = rep["metrics"]["ood"]
    assert r["n_in"] == 50 and set(r["n_out"]) == {"black", "noise", "inverted", "rotated"}
    assert r["scores"]["complexity"]["ood"]["black"]["auroc"] == 1.0
    assert (tmp_path / "ood_histograms.png").is_file() and "ood_histograms.png" in (tmp_path / "report.md").read_text()
    skipped = evaluate_model(model, data, tmp_path / "b", EvalConfig(metrics=("ood",)))
    assert "--ood-data" in skipped["metrics"]["ood"]["skipped"]


def test_cli_evaluate_metrics_ood(tmp_path, capsys, mnist):
    from vaekit.cli.main import main

    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=2, hidden_sizes=(16,)))
    folder = model.save(tmp_path / "m", metadata={"data": {"dataset": "mnist"}})
    argv = ["evaluate", str(folder), "--metrics", "ood", "--ood-examples", "200", "--threads", "1"]
    assert main([*argv, "--ood-data", "fashion-mnist", "--report-dir", str(tmp_path / "r")]) == 0
    assert "OOD AUROC ensemble" in capsys.readouterr().out
    r = json.loads((tmp_path / "r" / "report.json").read_text())["metrics"]["ood"]
    assert r["ood_data"] == "fashion-mnist" and r["n_out"] == {"fashion-mnist": 100}
    # the model's own dataset is no OOD set: the only part is skipped and the command fails
    assert main([*argv, "--ood-data", "mnist", "--report-dir", str(tmp_path / "s")]) == 1
    assert "own dataset" in capsys.readouterr().err
