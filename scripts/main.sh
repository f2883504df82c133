#!/usr/bin/env bash
# The main job on embedded defaults: set up, fetch MNIST, train the default VAE briefly,
# evaluate it, and write a sample grid, a reconstruction grid and a metrics JSON under runs/quickstart/;
# then replay the brief's incident through the production loop (runs/incident/, a few minutes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
RUN=runs/quickstart
vaekit data fetch mnist
vaekit data fetch fashion-mnist
vaekit train configs/quickstart.yaml --no-resume "$@"
vaekit evaluate "$RUN" -o "$RUN/eval.json"
vaekit sample "$RUN" -n 64 -o "$RUN/samples.png"
vaekit reconstruct "$RUN" -n 32 -o "$RUN/reconstructions.png"
echo "done: $RUN/eval.json, $RUN/samples.png, $RUN/reconstructions.png, $RUN/metrics.jsonl"
# the production loop on embedded defaults (SQLite, local folders): register, serve, normal then drifting
# traffic, alerts, an emergency retrain through the benchmark-suite gate, canary, promotion, a rollback
python bench/incident.py --quick --out runs/incident --results runs/incident
