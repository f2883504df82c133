#!/usr/bin/env bash
# GPU checks, for a machine with a CUDA GPU and PyTorch (CI has none): the CUDA test module (every
# family in fp32 and bf16 autocast, resume, model selection, NLL against CPU) and a VQ-VAE run
# under torchrun with the NCCL backend (one process: the all_reduce of its EMA codebook statistics
# needs two GPUs, NCCL refuses two ranks on one; the CPU suite tests it under gloo). Logs go to $OUT
# (default /tmp/vaekit-gpu-check). Uses the installed vaekit, or src/ when it is not installed.
#   scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/vaekit-gpu-check}
mkdir -p "$OUT"
python3 -c "import vaekit" 2>/dev/null || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
rc=0
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"
python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py 2>&1 | tee "$OUT/pytest_cuda.log" || rc=1
python3 -m pytest -q -s -p no:cacheprovider -o addopts="" tests/test_cuda.py -k serving 2>&1 | grep -E "batch-1|passed|failed" | tee "$OUT/serving_cuda.log" || rc=1
torchrun --standalone --nproc_per_node=1 -m vaekit.cli.main train --set model=vqvae --set train.max_steps=200 \
    --set train.progress=false --set train.precision=bf16 --set name=gpu-vqvae-nccl --set out_dir="$OUT/runs" \
    --set train.tensorboard=off 2>&1 | tail -n 8 | tee "$OUT/torchrun_vqvae.log" || rc=1
grep -h '"event": "start"' "$OUT/runs/gpu-vqvae-nccl/metrics.jsonl" | tee -a "$OUT/torchrun_vqvae.log"
tail -n 1 "$OUT/runs/gpu-vqvae-nccl/metrics.jsonl" | cut -c1-400 | tee -a "$OUT/torchrun_vqvae.log"
exit $rc
