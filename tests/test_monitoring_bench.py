"""The logic of bench/drift.py on small synthetic inputs (the full run is `python bench/drift.py`)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")
BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def drift():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_drift", BENCH / "drift.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_stats(n: int, seed: int, recon: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"latent": rng.normal(size=(n, 3)), "logvar": np.zeros((n, 3)), "recon_mse": rng.gamma(4, recon / 4, n),
            "recon_nats": rng.normal(80, 5, n), "kl": rng.normal(20, 2, n), "latent_norm": rng.gamma(9, 0.2, n),
            "pixel_mean": rng.normal(0.13, 0.03, n), "pixel_var": rng.normal(0.1, 0.02, n)}


def test_rotation_by_90_degrees_is_rot90(drift):
    x = torch.zeros(1, 1, 6, 6)
    x[0, 0, 0, 1] = 1.0  # one pixel near the top-left corner
    r = drift.rotate(x, 90.0)
    turned = torch.rot90(x, k=1, dims=(2, 3))  # counter-clockwise in array coordinates
    flipped = torch.rot90(x, k=-1, dims=(2, 3))
    assert torch.allclose(r, turned, atol=1e-5) or torch.allclose(r, flipped, atol=1e-5)
    assert drift.rotate(x, 0.0).allclose(x, atol=1e-6)


def test_windows_mix_the_stated_share(drift):
    stats = {"clean": fake_stats(1000, 0), "new": fake_stats(300, 1, recon=1.0)}
    rng = np.random.default_rng(0)
    clean, dr, k = drift.drifted_rows(rng, stats, "new", 0.15, 200)
    assert k == 30 and len(clean["recon_mse"]) == 170 and len(dr["recon_mse"]) == 30
    w = drift.make_window([clean, dr])
    assert len(w) == 200 and w.timestamps.max() - w.timestamps.min() == pytest.approx(300.0)
    assert len(np.unique(clean["recon_nats"])) == 170  # drawn without replacement within a window


def test_stream_delay_with_real_detectors(drift):
    from vaekit.monitoring.detectors import recon_error_detector
    from vaekit.monitoring.reference import reference_from_arrays

    ref = reference_from_arrays(**fake_stats(2000, 5))
    stats = {"clean": fake_stats(2000, 6), "bad": fake_stats(500, 7, recon=1.0), "same": fake_stats(500, 8)}
    dets = {"recon_p99": recon_error_detector().fit(ref)}
    rng = np.random.default_rng(0)
    # every drifted request is far above the p99: the first score after the onset fires
    assert drift.stream_delay(dets, rng, stats, "bad", 1.0, window=200, step=50, length=400) == {"recon_p99": 50}
    # no drift: no alarm within the stream
    assert drift.stream_delay(dets, rng, stats, "same", 1.0, window=200, step=50, length=400) == {"recon_p99": None}


def test_summaries(drift):
    from scipy import stats

    assert drift._median([100, None, 300]) == 300 and drift._median([None, None, 100]) is None
    assert drift._upper95(0, 200) == pytest.approx(1 - 0.025 ** (1 / 200))
    assert drift._upper95(2, 200) == pytest.approx(stats.beta.ppf(0.975, 3, 198))


def test_image_stats_match_inspect(drift):
    from vaekit import VAE, VAEConfig

    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=4, hidden_sizes=(32,))).eval()
    x = torch.rand(7, 1, 28, 28)
    s = drift.image_stats(model, x, batch=3)
    with torch.no_grad():
        ins = model.inspect(x)
    np.testing.assert_allclose(s["latent"], ins.latent.double().numpy(), atol=1e-5)  # batching: float32 rounding
    np.testing.assert_allclose(s["kl"], ins.kl.double().numpy(), rtol=1e-4)
    np.testing.assert_allclose(s["pixel_var"], x.flatten(1).double().var(1, unbiased=False).numpy(), rtol=1e-9)
