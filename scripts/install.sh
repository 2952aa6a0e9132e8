#!/usr/bin/env bash
# Install dirl into ./.venv for CPU use (or GPU with DIRL_GPU=1), with the exact versions CI runs.
#
# torch is installed first and alone, pinned, so that pip never pulls several GB of CUDA wheels on a
# CPU machine; then dirl with the `test` extra (and `gpu`, LMDeploy 0.18.0, with DIRL_GPU=1).
# Both steps use a constraints file (exact versions of everything, docs/INSTALL.md):
#   DIRL_CONSTRAINTS=auto   (default) constraints/cpu-py311.txt, or constraints/gpu-py312.txt with DIRL_GPU=1
#   DIRL_CONSTRAINTS=none   the newest releases pyproject.toml's ranges admit
#   DIRL_CONSTRAINTS=FILE   that file
# Other settings: PYTHON (default python3), VENV (default .venv), TORCH_SPEC (default torch==2.13.0 on
# CPU, torch==2.12.1 with DIRL_GPU=1: LMDeploy 0.18.0 needs torch<=2.12.1).
set -euo pipefail
case "${DIRL_CONSTRAINTS:-auto}" in  # a relative FILE is taken from where the script was started
  auto|none|/*) ;;
  *) [ -f "$DIRL_CONSTRAINTS" ] && DIRL_CONSTRAINTS="$PWD/$DIRL_CONSTRAINTS" ;;
esac
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
GPU=${DIRL_GPU:-0}
if [ "$GPU" = "1" ]; then
  TORCH_SPEC=${TORCH_SPEC:-torch==2.12.1}
  extras="test,gpu"
  auto=constraints/gpu-py312.txt
else
  TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
  extras="test"
  auto=constraints/cpu-py311.txt
fi
case "${DIRL_CONSTRAINTS:-auto}" in
  auto) constraints=$auto ;;
  none) constraints= ;;
  *) constraints=$DIRL_CONSTRAINTS ;;
esac
if [ -n "$constraints" ] && [ ! -f "$constraints" ]; then
  echo "install.sh: constraints file '$constraints' not found (DIRL_CONSTRAINTS=none installs without one)" >&2
  exit 1
fi
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "dirl needs Python >= 3.11")'
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_c=()
[ -n "$constraints" ] && pip_c=(-c "$constraints")
fail() {
  echo "install.sh: $1 failed" >&2
  if [ -n "$constraints" ]; then
    echo "install.sh: $constraints pins versions for the Python and platform named at its top;" \
         "DIRL_CONSTRAINTS=none takes the newest releases within the ranges of pyproject.toml" >&2
  fi
  exit 1
}
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "${pip_c[@]}" "$TORCH_SPEC" || fail "pip install $TORCH_SPEC"
"$VENV/bin/python" -m pip install -q "${pip_c[@]}" -e ".[$extras]" || fail "pip install -e .[$extras]"
"$VENV/bin/python" -m pip check
echo "dirl installed in $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)')," \
     "constraints: ${constraints:-none})"
