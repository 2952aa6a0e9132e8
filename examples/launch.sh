# The launcher shared by examples/sft.sh and examples/rl.sh: source it, then `dirl_launch sft|rl ARGS`.
#
#   no arguments, or only key=value overrides   the embedded default: one CPU process
#   CONFIG [key=value ...]                       the config checked first (a bad key fails here, before
#                                                any process starts), then launched on this node:
#     with GPUs     accelerate launch, DeepSpeed ZeRO-1 (ACCELERATE_CONFIG, default configs/accelerate/zero1.yaml)
#     without GPUs  torch.distributed.run, gloo processes on the CPU (NPROC_PER_NODE, default 1)
#
# Environment: NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), GPUS_PER_NODE
# (every visible GPU), NPROC_PER_NODE (processes per node: GPUS_PER_NODE, or 1 without GPUs; NPROC is
# read too), ACCELERATE_CONFIG, PYTHON (default .venv/bin/python, else python3).

dirl_launch() {
  local cmd="$1"
  shift
  cd "$(dirname "${BASH_SOURCE[0]}")/.."

  if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
  fi
  export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

  if [[ $# -eq 0 || "${1}" == *=* ]]; then
    export ACCELERATE_USE_CPU=true
    exec "$PYTHON" -m dirl.cli "$cmd" "$@"
  fi

  local config="$1"
  shift
  if [[ ! -f "$config" ]]; then
    echo "$cmd.sh: config file '$config' does not exist" >&2
    exit 2
  fi
  "$PYTHON" - "$cmd" "$config" "$@" <<'PY'
import importlib
import sys

from dirl.config import ConfigError

cmd, path, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
try:
    getattr(importlib.import_module(f"dirl.train.{cmd}"), f"load_{cmd}_config")(path, overrides)
except ConfigError as e:
    print(f"dirl: error: {e}", file=sys.stderr)
    sys.exit(2)
PY

  local nnodes="${NNODES:-1}" node_rank="${NODE_RANK:-0}"
  local addr="${MASTER_ADDR:-127.0.0.1}" port="${MASTER_PORT:-29500}"
  local gpus=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
  gpus="${GPUS_PER_NODE:-$gpus}"

  if [[ "$gpus" -eq 0 ]]; then
    export ACCELERATE_USE_CPU=true
    exec "$PYTHON" -m torch.distributed.run --nnodes "$nnodes" --node_rank "$node_rank" \
      --nproc_per_node "${NPROC_PER_NODE:-${NPROC:-1}}" --master_addr "$addr" --master_port "$port" \
      -m dirl.cli "$cmd" "$config" "$@"
  fi
  local nproc="${NPROC_PER_NODE:-${NPROC:-$gpus}}"
  exec "$PYTHON" -m accelerate.commands.launch \
    --config_file "${ACCELERATE_CONFIG:-configs/accelerate/zero1.yaml}" \
    --num_processes $((nproc * nnodes)) --num_machines "$nnodes" --machine_rank "$node_rank" \
    --main_process_ip "$addr" --main_process_port "$port" \
    -m dirl.cli "$cmd" "$config" "$@"
}
