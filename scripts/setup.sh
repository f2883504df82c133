#!/usr/bin/env bash
# Create .venv and install vaekit with its dependencies. Safe to run again: it skips work already done.
#
# PyTorch is installed first, pinned, so pip never pulls a multi-GB CUDA build on a CPU machine.
# GPU users: VAEKIT_TORCH="torch==2.13.0" VAEKIT_TORCH_INDEX=https://download.pytorch.org/whl/cu128 scripts/setup.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
TORCH_SPEC="${VAEKIT_TORCH:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.vaekit-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  if [ -n "${VAEKIT_TORCH_INDEX:-}" ]; then
    .venv/bin/python -m pip install -q "$TORCH_SPEC" --index-url "$VAEKIT_TORCH_INDEX"
  else
    .venv/bin/python -m pip install -q "$TORCH_SPEC"
  fi
  .venv/bin/python -m pip install -q -e ".[dev]"
  rm -f .venv/.vaekit-setup-*
  touch "$stamp"
fi
