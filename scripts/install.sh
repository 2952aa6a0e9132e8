#!/usr/bin/env bash
# Install dirl into ./.venv for CPU use (or GPU with DIRL_GPU=1).
# torch is installed first and alone, pinned, so that pip never pulls several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "dirl needs Python >= 3.10")'
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
extras="test"
[ "${DIRL_GPU:-0}" = "1" ] && extras="test,gpu"
"$VENV/bin/python" -m pip install -q -e ".[$extras]"
echo "dirl installed in $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
