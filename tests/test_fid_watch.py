"""The scheduled FID job on a real registry and record store: a VAE trained briefly on MNIST and a tiny extractor
(one epoch on 1,500 images); the calibration against an independent computation; a worse version promoted to
production fires ``fid_samples`` once (stored, logged, posted to a real webhook), moving back resolves it; the CLI."""

from __future__ import annotations

import json
import logging
import math
import warnings

import numpy as np
import pytest
import torch
from scipy import linalg
from test_monitor import Receiver

from vaekit.cli.main import main
from vaekit.data import ImageDataset
from vaekit.errors import ConfigError, InputError
from vaekit.evaluation.extractor import load_extractor, train_extractor
from vaekit.models import VAE, VAEConfig
from vaekit.models.base import load_model
from vaekit.monitoring.fid_watch import FIDWatch, calibrate, split_half_fid
from vaekit.monitoring.monitor import Monitor, firing_alerts
from vaekit.monitoring.sinks import LogSink, WebhookSink
from vaekit.monitoring.store import RecordStore
from vaekit.registry import ModelRegistry
from vaekit.training import TrainConfig, Trainer

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]
T0 = 1_800_000_000.0
N = 200  # samples per FID: small, for a test (the job's default is 2,000)


@pytest.fixture(scope="module")
def small(mnist):
    """MNIST with a 1,000-image test split: the FID reference set of these tests."""
    return ImageDataset("mnist", mnist.train.subset(2000), mnist.test.subset(1000), mnist.classes, mnist.provenance)


@pytest.fixture(scope="module")
def models(tmp_path_factory, small):
    """A VAE trained 2 epochs on 2,000 MNIST images, the same with its output bias shifted (a broken version),
    and a tiny extractor."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("fidw")
    cfg = TrainConfig(epochs=2, batch_size=64, checkpoint_every=0, progress=False, tensorboard="off", seed=0,
                      eval_batch_size=500)
    good = Trainer(VAE(VAEConfig(latent_dim=8, hidden_sizes=(128,))), small, cfg, run_dir=root / "r").fit().model_dir
    broken = VAE(VAEConfig(latent_dim=8, hidden_sizes=(128,)))
    broken.load_state_dict(load_model(good).state_dict())
    with torch.no_grad():
        broken.decoder.out.bias.add_(8.0)  # a broken retrain: every pixel near white
    bad = broken.save(root / "broken")
    ext = train_extractor("mnist", out_dir=root / "ext", seed=0, epochs=1,
                          data=ImageDataset("mnist", small.train.subset(1500), small.test, small.classes))
    return good, bad, ext


@pytest.fixture
def setup(db_uri, tmp_path, models, monkeypatch):
    monkeypatch.setenv("VAEKIT_CACHE", str(tmp_path / "cache"))  # reference statistics of this test's extractor
    good, bad, ext = models
    reg = ModelRegistry(db_uri, artifact_root=tmp_path / "artifacts", actor="tester@ci")
    reg.register(good, "mnist", alias="production", reason="test", profile=False)
    reg.register(bad, "mnist", reason="a broken retrain", profile=False)
    store = RecordStore(db_uri)
    yield reg, store, load_extractor("mnist", ext), ext
    store.close()
    reg.close()


def independent_fid(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID by another route: numpy covariances and Tr((S1 S2)^1/2) from the eigenvalues of S1^1/2 S2 S1^1/2."""
    m1, m2 = feats_a.mean(0), feats_b.mean(0)
    s1, s2 = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    with warnings.catch_warnings():  # 200 images of 128 ReLU features: a singular covariance is expected
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        r1 = linalg.sqrtm(s1).real
    ev = np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev).sum())


def test_calibration_matches_an_independent_computation(setup, small):
    reg, store, ext, _ = setup
    model = reg.load("mnist/1")
    cal = calibrate(model, "1", N, "mnist", ext, repeats=3, seed=5, data=small)
    test_feats = ext.features(small.test.images.float() / 255).double().numpy()
    draws = []
    for s in (5, 6, 7):
        torch.manual_seed(s)
        with torch.no_grad():
            x = model.sample(N).clamp(0, 1)
        draws.append(independent_fid(ext.features(x).double().numpy(), test_feats))
    np.testing.assert_allclose(cal.draws, draws, rtol=1e-5)
    assert cal.baseline == pytest.approx(np.mean(draws), rel=1e-5) and cal.std == pytest.approx(np.std(draws, ddof=1),
                                                                                                   rel=1e-4)
    halves = []
    for s in (5, 6, 7):
        pick = np.random.default_rng(s).permutation(1000)[: 2 * N]
        halves.append(independent_fid(test_feats[pick[:N]], test_feats[pick[N:]]))
    half = float(np.mean(halves))
    assert cal.split_half == pytest.approx(half, rel=1e-5)
    assert split_half_fid("mnist", N, ext, seed=5, data=small) == pytest.approx(halves[0], rel=1e-5)
    margin = max(3 * half, 3 * cal.std * math.sqrt(1 + 1 / 3))
    assert cal.threshold == pytest.approx(cal.baseline + margin, rel=1e-6) and cal.seeds == (5, 6, 7)
    with pytest.raises(InputError, match=r"n must be in \[2, 500\].*got 501"):
        split_half_fid("mnist", 501, ext, data=small)
    with pytest.raises(ConfigError, match="repeats must be an integer >= 2.*got 1"):
        calibrate(model, "1", N, "mnist", ext, repeats=1, data=small)
    with pytest.raises(ConfigError, match="multiple must be a finite number >= 0, got -1"):
        calibrate(model, "1", N, "mnist", ext, multiple=-1, data=small)


def test_a_worse_version_in_production_fires_once_and_resolves(setup, small, caplog):
    reg, store, ext, _ = setup
    hook = Receiver()
    try:
        watch = FIDWatch(store, reg, "mnist@production", n_samples=N, extractor=ext, data=small,
                         sinks=[LogSink(), WebhookSink(hook.url, retries=1, backoff=0.05)])
        first = watch.run_once(now=T0, seed=100)  # calibrates on version 1, then checks it
        assert first.version == "1" and not first.result.drifted and first.events == []
        assert first.fid < first.calibration.threshold and first.calibration.version == "1"
        # the alias moves to the broken version: its samples are far from MNIST
        reg.set_alias("mnist", "production", 2, "emergency retrain")
        with caplog.at_level(logging.WARNING, logger="vaekit.monitoring.alerts"):
            bad = watch.run_once(now=T0 + 3600, seed=101)
        assert bad.version == "2" and bad.result.drifted
        assert bad.fid - bad.calibration.baseline > 4 * bad.calibration.margin  # far beyond the line
        assert bad.calibration == first.calibration  # compared with the stored baseline, not with itself
        (e,) = bad.events
        assert (e.rule, e.status, e.version, e.detector) == ("fid_samples", "firing", "2", "fid")
        assert e.value == pytest.approx(bad.fid) and e.threshold == pytest.approx(first.calibration.threshold)
        (posted,) = hook.alerts()
        assert posted["rule"] == "fid_samples" and posted["fingerprint"] == "fid_samples@2/fid"
        assert any("fid_samples" in r.message for r in caplog.records)
        # a new job (a cron run): the state comes from the store, so the same drift emits nothing new
        again = FIDWatch(store.uri, reg, "mnist@production", n_samples=N, extractor=ext, data=small)
        assert again.run_once(now=T0 + 7200, seed=102).events == []
        again.close()
        # the monitor's view lists the FID alert among those firing (route "fid")
        assert [(a["rule"], a["route"]) for a in Monitor(store, reg, "mnist").firing()] == [("fid_samples", "fid")]
        reg.set_alias("mnist", "production", 1, "rollback")
        back = watch.run_once(now=T0 + 10800, seed=103)
        # back on version 1, the firing alert of version 2 stays until version 2 is checked again: the
        # rules key alerts by version, as the monitor's do
        assert back.version == "1" and not back.result.drifted
    finally:
        hook.close()
    rows = store.fid_rows("mnist")
    assert [r["kind"] for r in rows] == ["calibration", "check", "check", "check", "check"]
    assert [r["version"] for r in rows[1:]] == ["1", "2", "2", "1"] and [r["drifted"] for r in rows[1:]] == [
        False, True, True, False]
    assert rows[2]["fid"] == pytest.approx(bad.fid) and rows[2]["doc"]["seed"] == 101
    assert firing_alerts(store.alert_events("mnist")) and store.alert_events("mnist")[0]["route"] == "fid"


def test_pinned_version_resolves_and_the_cli_runs_once(setup, small, capsys, tmp_path):
    reg, store, ext, ext_dir = setup
    watch = FIDWatch(store, reg, "mnist/2", n_samples=N, extractor=ext, data=small)
    watch.calibration(reg.load("mnist/1"), "1", "mnist")  # the baseline: version 1
    assert watch.run_once(now=T0, seed=1).events[0].status == "firing"
    # the CLI, once (as from cron), against the same store: version 2 still fires: no new event, exit 3 asked
    base = ["--store", store.uri, "--registry", reg.uri, "--artifacts", str(tmp_path / "artifacts"),
            "--extractor", str(ext_dir), "--once"]
    where = [*base, "--n-samples", str(N)]
    args = ["monitor", "fid", *where, "--model", "mnist/2", "--json", "--fail-on-drift"]
    assert main(args) == 3
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["version"] == "2" and doc["drifted"] and doc["events"] == []
    assert doc["calibration"]["version"] == "1" and doc["n_samples"] == N
    # a fixed version of the good model resolves nothing (it never fired) and passes
    assert main(["monitor", "fid", *where, "--model", "mnist/1", "--fail-on-drift"]) == 0
    assert "mnist/1: FID" in capsys.readouterr().out
    assert main(["monitor", "fid", *base, "--n-samples", "1", "--model", "mnist/1", "--once"]) == 2
    assert "n_samples must be an integer >= 2, got 1" in capsys.readouterr().err
