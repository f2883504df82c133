"""The brief's incident replayed end to end (bench/incident.py --quick, about 2.5 minutes): slow."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_incident_replay_alerts_retrains_promotes_and_rolls_back(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "incident.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((ROOT / "bench" / "results" / "incident.json").read_text())
    assert res["gate_rejected"] >= 0.02 * (res["requests"] - res["drift_at"]) * 0.5  # the black images refused
    first = res["first_alert_after_drift"]
    assert first is not None and first["request"] - res["drift_at"] <= 1000  # the brief: within 1,000 requests
    assert res["promotion"]["action"] == "promote" and res["rollback"]["action"] == "rollback"
    moves = [(e["alias"], e["from_version"], e["to_version"]) for e in res["alias_history"]]
    assert ("production", 1, 2) in moves and ("canary", 3, None) in moves
