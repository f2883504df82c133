#!/usr/bin/env bash
# The main job on embedded defaults: set up, fetch MNIST, train the default VAE briefly,
# evaluate it, and write a sample grid, a reconstruction grid and a metrics JSON under runs/quickstart/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
RUN=runs/quickstart
vaekit data fetch mnist
vaekit train configs/quickstart.yaml --no-resume "$@"
vaekit evaluate "$RUN" -o "$RUN/eval.json"
vaekit sample "$RUN" -n 64 -o "$RUN/samples.png"
vaekit reconstruct "$RUN" -n 32 -o "$RUN/reconstructions.png"
echo "done: $RUN/eval.json, $RUN/samples.png, $RUN/reconstructions.png, $RUN/metrics.jsonl"
