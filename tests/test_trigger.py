"""The monitor starts the emergency retrain on a drift alert (vaekit.deploy.trigger.RetrainTrigger): once per
alert episode, never twice after a restart, again for a later episode; its own ``vaekit retrain emergency``
process really runs (here it refuses: the model was registered from a bare folder, without a run config, which
its log says), and ``vaekit monitor run --on-alert-retrain`` wires it up."""

from __future__ import annotations

import json
import logging
import time

import pytest
from test_monitor import T0, fashion, held, make_records, setup, trained  # noqa: F401  (fixtures)

from vaekit.cli.main import main
from vaekit.deploy.trigger import MARKER, RetrainTrigger
from vaekit.errors import ConfigError
from vaekit.monitoring.monitor import Monitor

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def wait_for_exit(trigger: RetrainTrigger, mon: Monitor, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while trigger.running and time.monotonic() < deadline:
        time.sleep(0.2)
        trigger(mon)  # reaps: records the exit status


def test_one_retrain_per_alert_episode_even_across_a_monitor_restart(setup, mnist, fashion, tmp_path):  # noqa: F811
    reg, store, model = setup
    out = tmp_path / "triggered"
    trig = RetrainTrigger(["latent_ks", "latent_mmd"], tmp_path / "capture", out)
    mon = Monitor(store, reg, "mnist", window_s=300, min_requests=200, hooks=[trig])
    store.append(make_records(model, held(fashion, 0, 300), "1", T0 - 300, T0, prefix="a"))
    it = mon.run_once(now=T0)
    assert {"latent_ks", "latent_mmd"} <= {e.rule for e in it.events} and not it.sink_errors
    (episode,) = [p.parent for p in out.glob(f"*/{MARKER}")]
    doc = json.loads((episode / MARKER).read_text())
    assert doc["version"] == "1" and sorted(a.split("@")[0] for a in doc["alerts"]) == ["latent_ks", "latent_mmd"]
    assert doc["command"][3:8] == ["retrain", "emergency", "--name", "mnist", "--data"]
    assert "--store" in doc["command"] and "--registry" in doc["command"] and doc["pid"]
    wait_for_exit(trig, mon)
    doc = json.loads((episode / MARKER).read_text())
    assert doc["exit_status"] == 2  # the real pipeline ran and refused, saying why:
    assert "no recorded run config" in (episode / "pipeline.log").read_text()
    # still firing, and a restarted monitor (state rebuilt from the store): nothing starts again
    store.append(make_records(model, held(fashion, 300, 300), "1", T0, T0 + 300, prefix="b"))
    assert trig(mon) is None and mon.run_once(now=T0 + 300).events == []
    trig2 = RetrainTrigger(["latent_ks", "latent_mmd"], tmp_path / "capture", out)
    mon2 = Monitor(store, reg, "mnist", window_s=300, min_requests=200, hooks=[trig2])
    mon2.run_once(now=T0 + 300)
    assert trig2.running == {} and len(list(out.glob(f"*/{MARKER}"))) == 1
    # back to MNIST: resolved; drift again later: a new episode, a new retrain
    store.append(make_records(model, held(mnist, 1000, 300), "1", T0 + 300, T0 + 600, prefix="c"))
    assert {e.status for e in mon2.run_once(now=T0 + 600).events} == {"resolved"}
    store.append(make_records(model, held(fashion, 600, 300), "1", T0 + 600, T0 + 900, prefix="d"))
    mon2.run_once(now=T0 + 900)
    assert len(list(out.glob(f"*/{MARKER}"))) == 2
    wait_for_exit(trig2, mon2)


def test_an_alert_on_the_canary_route_starts_nothing(setup, mnist, fashion, tmp_path):  # noqa: F811
    reg, store, model = setup
    trig = RetrainTrigger(["latent_ks"], tmp_path / "capture", tmp_path / "out")
    mon = Monitor(store, reg, "mnist", window_s=300, min_requests=200, hooks=[trig])
    store.append(make_records(model, held(mnist, 1000, 300), "1", T0 - 300, T0, prefix="a"))
    store.append(make_records(model, held(fashion, 0, 300), "1", T0 - 300, T0, prefix="k", route="canary"))
    it = mon.run_once(now=T0)
    assert "latent_ks" in {e.rule for g in it.groups if g.route == "canary" for e in g.events}
    assert not (tmp_path / "out").exists() and trig.running == {}
    with pytest.raises(ConfigError, match=r"unknown rule\(s\) \['nope'\]"):
        RetrainTrigger(["nope"], tmp_path, tmp_path).check_rules([r.name for r in mon.rules])


def test_vaekit_monitor_run_on_alert_retrain(setup, fashion, tmp_path, capsys, caplog):  # noqa: F811
    reg, store, model = setup
    now = time.time()
    store.append(make_records(model, held(fashion, 0, 300), "1", now - 240, now - 1))
    base = ["monitor", "run", "--store", store.uri, "--registry", reg.uri, "--artifacts", str(tmp_path / "artifacts"),
            "--model", "mnist", "--once"]
    out = tmp_path / "triggered"
    assert main([*base, "--on-alert-retrain", "nope", "--capture-dir", str(tmp_path / "cap")]) == 2
    assert "unknown rule(s) ['nope']" in capsys.readouterr().err
    assert main([*base, "--on-alert-retrain", "latent_ks"]) == 2
    assert "needs --capture-dir" in capsys.readouterr().err
    args = [*base, "--on-alert-retrain", "latent_ks,aggregate_posterior", "--capture-dir", str(tmp_path / "cap"),
            "--retrain-out", str(out), "--retrain-arg=--epochs", "--retrain-arg=1"]
    with caplog.at_level(logging.INFO, logger="vaekit.deploy.trigger"):
        assert main(args) == 0
    (marker,) = out.glob(f"mnist-v1-*/{MARKER}")
    doc = json.loads(marker.read_text())
    assert doc["command"][-2:] == ["--epochs", "1"] and "started the emergency retrain" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vaekit.deploy.trigger"):
        assert main(args) == 0  # a second monitor while the alert still fires: nothing new
    assert "started the emergency retrain" not in caplog.text and len(list(out.glob(f"*/{MARKER}"))) == 1
    deadline = time.monotonic() + 120  # the retrain process runs on its own, and refuses (no run config)
    while "no recorded run config" not in (marker.parent / "pipeline.log").read_text():
        assert time.monotonic() < deadline, (marker.parent / "pipeline.log").read_text()
        time.sleep(0.2)
