#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv with torch, this package and its test extras.
# Where no NVIDIA GPU is visible it installs the CPU build of torch (torch==2.13.0) instead of the
# multi-GB CUDA build that a plain `torch` requirement would pull.
#   usage: ./setup.sh            (VENV=path ./setup.sh to choose another location)
set -euo pipefail
cd "$(dirname "$0")"
venv=${VENV:-.venv}
python3 -m venv "$venv"
pip="$venv/bin/python -m pip"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found, installing the CUDA build of torch"
  $pip install "torch>=2.6"  # 2.6+: torch.multinomial no longer syncs the host on CUDA (a per-step sync)
else
  echo "setup: no GPU found, installing the CPU build of torch"
  $pip install "torch==2.13.0"
fi
$pip install -e ".[test]"
echo "setup: done. Activate with: source $venv/bin/activate"
