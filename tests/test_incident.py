"""The brief's incident replayed end to end through the production loop (bench/incident.py).

The default suite runs the ``--tiny`` preset (20-30 s on a shared 2-core machine: a 1-epoch MLP VAE on 6,000
Fashion-MNIST images, 1,000 requests then two canary rounds); ``-m slow`` runs ``--quick`` (about 2.5 minutes).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LATENT_OR_RECON = {"latent_ks", "aggregate_posterior", "latent_mmd", "recon_error_p99"}


def replay(tmp_path: Path, preset: str, results: Path | None = None, threads: int = 2) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "incident.py"), f"--{preset}", "--out", str(tmp_path / "run"),
           "--threads", str(threads)]
    if results is not None:
        cmd += ["--results", str(results)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(((results or ROOT / "bench" / "results") / "incident.json").read_text())


def test_a_tiny_replay_rejects_black_images_alerts_retrains_on_the_capture_promotes_and_rolls_back(tmp_path):
    # one torch thread: two threads spin-waiting for each other on a shared, busy 2-core machine cost minutes
    res = replay(tmp_path, "tiny", tmp_path / "results", threads=1)
    drift_n = res["settings"]["drift"]
    # the gate refused every all-black image (about 3% of the drift traffic), and they never reached the capture
    assert res["black_sent"] >= 5 and res["black_rejected"] == res["black_sent"]
    # a latent / reconstruction alert fires after the drift point, on the production version
    first = next(a for a in res["alerts"] if a["request"] > res["drift_at"] and a["status"] == "firing"
                 and a["rule"] in LATENT_OR_RECON)
    assert first["version"] == "1" and first["request"] - res["drift_at"] <= 500
    assert not [a for a in res["alerts"] if a["request"] <= res["drift_at"] and a["status"] == "firing"]
    # the service captured every accepted drift request (share 1), read back through the store's index
    accepted_drift = drift_n - res["rejected_by_phase"].get("drift", 0)
    assert res["capture"]["since_drift"] == accepted_drift and res["capture"]["shards"] >= 2
    validate = res["pipeline"]["validate"]
    assert "'low_variance': 0" in validate  # no black image was captured, nothing to quarantine for it
    # the emergency candidate passed the suite, became the canary and was promoted; the degraded one rolled back
    assert all(c["passed"] for c in res["gate"]) and res["pipeline"]["register"].startswith("registered fashion/2")
    assert res["promotion"]["action"] == "promote" and res["rollback"]["action"] == "rollback"
    moves = [(e["alias"], e["from_version"], e["to_version"]) for e in res["alias_history"]]
    assert moves == [("production", None, 1), ("canary", None, 2), ("production", 1, 2), ("canary", 2, None),
                     ("canary", None, 3), ("canary", 3, None)]


@pytest.mark.slow
def test_the_incident_replay_alerts_retrains_promotes_and_rolls_back(tmp_path):
    res = replay(tmp_path, "quick")
    assert res["black_rejected"] == res["black_sent"] > 0  # every black image refused by the gate
    first = res["first_alert_after_drift"]
    assert first is not None and first["request"] - res["drift_at"] <= 1000  # the brief: within 1,000 requests
    assert res["promotion"]["action"] == "promote" and res["rollback"]["action"] == "rollback"
    moves = [(e["alias"], e["from_version"], e["to_version"]) for e in res["alias_history"]]
    assert ("production", 1, 2) in moves and ("canary", 3, None) in moves
