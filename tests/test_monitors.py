"""Collapse detection: AU/MI on known encoders, the KL alert's exact count, responses, resume."""

import pytest
import torch
from helpers import Crash, callback, configured_trainer

from vaekit.models import VAE, VAEConfig
from vaekit.training import DataConfig, TrainConfig, read_metrics
from vaekit.training.history import choose_fallback, read_history
from vaekit.training.monitors import CollapseMonitor, KLAlert, MonitorConfig, latent_stats
from vaekit.training.schedules import KLConfig


class _T:
    """The two attributes latent_stats needs from a trainer."""

    def __init__(self, model):
        self.model = model


def _encoder_vae(D):
    torch.manual_seed(0)
    return VAE(VAEConfig(latent_dim=D, hidden_sizes=(784,), activation="relu"))


def test_au_zero_and_mi_zero_for_an_encoder_that_ignores_x(mnist):
    m = _encoder_vae(4)
    with torch.no_grad():
        for p in (m.to_mean.weight, m.to_logvar.weight):
            p.zero_()  # the posterior is the same for every x
    x = mnist.test.images[:1000].float() / 255
    stats = latent_stats(_T(m), x, mnist.test.labels[:1000], 0.01, seed=0)
    assert stats["au"] == 0 and abs(stats["mi"]) < 1e-9


def test_au_d_and_mi_positive_for_an_encoder_that_copies_x(mnist):
    D = 4
    m = _encoder_vae(D)
    pixels = [300, 350, 400, 460]  # central pixels that vary across digits
    with torch.no_grad():
        m.encoder.net[0].weight.copy_(torch.eye(784))  # hidden = relu(x) = x
        m.encoder.net[0].bias.zero_()
        m.to_mean.weight.zero_()
        m.to_mean.bias.zero_()
        for d, px in enumerate(pixels):
            m.to_mean.weight[d, px] = 3.0  # z_d = 3 * pixel
        m.to_logvar.weight.zero_()
        m.to_logvar.bias.fill_(-6.0)  # a sharp posterior
    x = mnist.test.images[:1000].float() / 255
    stats = latent_stats(_T(m), x, mnist.test.labels[:1000], 0.01, seed=0)
    assert stats["au"] == D and stats["mi"] > 1.0


def test_kl_alert_fires_after_exactly_n_low_steps():
    a = KLAlert(threshold=0.01, patience=5)
    assert [a.update(0.001) for _ in range(4)] == [False] * 4  # N - 1 low steps: silent
    assert a.update(0.001) is True  # the N-th fires
    assert a.update(0.001) is False  # once per episode
    b = KLAlert(0.01, 3)
    seq = [0.0, 0.0, 0.5, 0.0, 0.0, 0.0]  # a healthy step resets the count
    assert [b.update(v) for v in seq] == [False, False, False, False, False, True]


def _cfg(**kw):
    base = dict(epochs=2, batch_size=64, checkpoint_every=8, progress=False, tensorboard="off", seed=3,
                eval_batch_size=500)
    base.update(kw)
    return TrainConfig(**base)


def _model():
    torch.manual_seed(0)
    return VAE(VAEConfig(latent_dim=6, hidden_sizes=(64,)))


def test_alert_in_training_log_with_warn(mnist_small, tmp_path):
    # every step counts as low when the threshold is huge: the alert fires at step `patience`
    mon = MonitorConfig(kl_threshold=1e9, patience=7, on_collapse="warn", samples=200)
    t = configured_trainer(_model(), mnist_small, _cfg(max_steps=10), run_dir=tmp_path / "w", monitor=mon)
    with pytest.warns(UserWarning, match="collapse"):
        res = t.fit()
    assert res.summaries["collapse"]["alerts"] == [{"cause": "kl", "step": 7, "onset": 1, "action": "warn"}]
    events = [e for e in read_metrics(tmp_path / "w" / "metrics.jsonl", "event") if e["event"] == "collapse"]
    assert events[0]["step"] == 7 and "7 consecutive steps" in events[0]["reason"]


def test_stop_response_ends_training_and_keeps_the_model(mnist_small, tmp_path):
    mon = MonitorConfig(kl_threshold=1e9, patience=5, on_collapse="stop", samples=200)
    res = configured_trainer(_model(), mnist_small, _cfg(), run_dir=tmp_path / "s", monitor=mon).fit()
    assert res.steps == 5 and res.stopped and "collapse" in res.stopped
    assert (tmp_path / "s" / "model" / "model.safetensors").is_file()


def test_recover_reloads_before_onset_and_applies_free_bits(mnist_small, tmp_path):
    # threshold above any real KL: every episode fires, so the run recovers twice then stops
    mon = MonitorConfig(kl_threshold=1e9, patience=12, on_collapse="recover", recover_free_bits=0.3,
                        max_recoveries=2, samples=200)
    t = configured_trainer(_model(), mnist_small, _cfg(epochs=3), run_dir=tmp_path / "r", monitor=mon)
    res = t.fit()
    assert res.summaries["collapse"]["recoveries"] == 2 and res.stopped and "max_recoveries" in res.stopped
    events = read_metrics(tmp_path / "r" / "metrics.jsonl", "event")
    rec = [e for e in events if e["event"] == "recover"]
    assert len(rec) == 2
    assert rec[0]["from_checkpoint"].endswith("step-000000000.pt")  # onset 1: only the initial one is older
    assert "free bits on at 0.3" in rec[0]["change"]
    steps = read_metrics(tmp_path / "r" / "metrics.jsonl", "train")
    assert any(r.get("branch") == 1 and r.get("free_bits") == 0.3 for r in steps)
    assert callback(t, "kl").free_bits == 0.3


def test_schedule_free_bits_and_monitor_state_survive_resume(mnist_small, tmp_path):
    kl = KLConfig(schedule="cyclical", cycles=2, cycle_ratio=0.5, free_bits=0.1)
    mon = MonitorConfig(every_steps=10, samples=200, kl_threshold=1e9, patience=1000)  # streak keeps growing

    def make(run, callbacks=()):
        return configured_trainer(_model(), mnist_small, _cfg(), data_config=DataConfig(binarize="dynamic"),
                                  run_dir=run, kl=kl, monitor=mon, callbacks=callbacks)

    ref = make(tmp_path / "ref")
    ref.fit()
    crashed = make(tmp_path / "run", [Crash(43)])
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    resumed = make(tmp_path / "run")
    resumed.fit()
    for (k, a), (_, b) in zip(ref.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert callback(resumed, "collapse").alert.streak == callback(ref, "collapse").alert.streak == 64
    a = read_metrics(tmp_path / "ref" / "metrics.jsonl", "train")
    b = read_metrics(tmp_path / "run" / "metrics.jsonl", "train")
    assert [r["kl_weight"] for r in a] == [r["kl_weight"] for r in b]
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl", "monitor")] == \
        [r["step"] for r in read_metrics(tmp_path / "ref" / "metrics.jsonl", "monitor")]


def test_history_index_and_fallback(mnist_small, tmp_path):
    t = configured_trainer(_model(), mnist_small, _cfg(epochs=3, checkpoint_every=0, keep_checkpoints=1,
                                                       keep_history=2),
                           run_dir=tmp_path / "h", monitor=MonitorConfig(samples=200))
    t.fit()
    entries = read_history(tmp_path / "h")
    kinds = [(e["step"], e["kind"]) for e in entries]
    assert kinds[0] == (0, "initial") and all(k == "epoch" for _, k in kinds[1:])
    assert [s for s, _ in kinds] == [0, 32, 96], "history thinned to 2 epoch checkpoints, spread out"
    for e in entries[1:]:
        assert e["test_recon"] is not None and e["au"] is not None and e["mi"] is not None
    best = choose_fallback(entries, tolerance=10.0)
    assert best["test_kl"] == max(e["test_kl"] for e in entries if e.get("test_kl") is not None)


def test_choose_fallback_rule():
    entries = [
        {"step": 1, "test_recon": 100.0, "test_kl": 2.0},
        {"step": 2, "test_recon": 90.0, "test_kl": 10.0},
        {"step": 3, "test_recon": 89.0, "test_kl": 0.1},  # best recon, collapsed
        {"step": 4, "test_recon": None, "test_kl": None},
    ]
    assert choose_fallback(entries, tolerance=0.02)["step"] == 2  # 90 is within 2% of 89
    assert choose_fallback(entries, tolerance=0.001)["step"] == 3


def test_monitor_config_validation():
    from vaekit.errors import ConfigError

    with pytest.raises(ConfigError, match="on_collapse"):
        MonitorConfig(on_collapse="panic")
    with pytest.raises(ConfigError, match="samples"):
        MonitorConfig(samples=1)
    assert CollapseMonitor.keep_state_on_recover
