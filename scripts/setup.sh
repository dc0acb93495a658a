#!/usr/bin/env bash
# Sets up everything LayerMoE needs on a Debian/Ubuntu machine: system MPI (for mpi4py), a virtual
# environment in .venv, and the package with its extras: tests, TensorBoard (tracking), lm-evaluation-harness
# (harness). Safe to re-run.
#   TORCH_SPEC   pip requirement for torch (default torch==2.13.0, the CPU wheel this project is tested with); the
#                test extra pins triton 3.7.1, the version torch 2.13.0 declares (the router-kernel tests need it)
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! dpkg -s libopenmpi-dev openmpi-bin >/dev/null 2>&1; then
  echo "[setup] installing system packages: libopenmpi-dev openmpi-bin (for mpi4py)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libopenmpi-dev openmpi-bin >/dev/null
fi
for tool in apt-get dpkg-deb; do
  command -v "$tool" >/dev/null || { echo "[setup] $tool is required (the built-in corpus comes from Debian packages)"; exit 1; }
done

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  python3 -m venv .venv
fi
echo "[setup] installing layermoe and its dependencies into .venv (first time: ~1-2 minutes)"
.venv/bin/python -m pip install -q --upgrade pip
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" -e ".[test,tracking,harness]"
echo "[setup] done: $(.venv/bin/python -c 'import torch, deepspeed, transformers; print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}")')"
