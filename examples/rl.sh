#!/usr/bin/env bash
# Reinforcement learning for block diffusion LMs: DiPO (GRPO with step-level log-probs) or DAPO.
#
#   bash examples/rl.sh
#       the embedded default, on CPU, in minutes: starts from the newest quick-start SFT checkpoint
#       under runs/ (bash examples/sft.sh; a fresh tiny model when there is none), 8 prompts x 8
#       samples per step of the synthetic arithmetic train split, reward = accuracy, one rollout
#       server started by the trainer and updated in place after every step; held-out accuracy is
#       measured before the first and after the last step (runs/rl-<time>/summary.json, curves.png)
#   bash examples/rl.sh train.steps=20 optim.lr=5e-5          (the default with overrides)
#   bash examples/rl.sh configs/rl_sdar8b.yaml model.path=/path/to/sft/model
#       the paper recipe: Accelerate + DeepSpeed ZeRO-1 on every GPU of this node, one LMDeploy
#       rollout server per GPU (colocated), weights pushed in place after every step
#   bash examples/rl.sh configs/rl_sdar8b_dapo.yaml model.path=...                  (DAPO)
#   bash examples/rl.sh configs/rl_sdar8b.yaml rollout.urls=[http://10.0.0.5:8000,http://10.0.0.6:8000]
#       a pool of running servers (`dirl serve --backend lmdeploy ...`) instead of colocated ones
#
# Several nodes: run the same command on every node with
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0 address> MASTER_PORT=29500 bash examples/rl.sh CONFIG ...
# Environment: GPUS_PER_NODE (default: every visible GPU), NPROC (CPU processes for a config run
# without GPUs, default 1), PYTHON, ACCELERATE_CONFIG (an accelerate config file to use instead of
# the built-in DeepSpeed ZeRO-1 flags).
set -euo pipefail
cd "$(dirname "$0")/.."

# The interpreter: $PYTHON, else the project's .venv (scripts/install.sh), else python3.
if [[ -n "${PYTHON:-}" ]]; then :
elif [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python
else PYTHON=python3; fi
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

if [[ $# -eq 0 || "${1}" == *=* ]]; then
  # The embedded default: one CPU process (the rollout server runs on the CPU too).
  export ACCELERATE_USE_CPU=true
  exec "$PYTHON" -m dirl.cli rl "$@"
fi

CONFIG="$1"
shift
if [[ ! -f "$CONFIG" ]]; then
  echo "rl.sh: config file '$CONFIG' does not exist" >&2
  exit 2
fi

# Check the config (one-line error naming the key) before any process is launched.
"$PYTHON" - "$CONFIG" "$@" <<'PY'
import sys
from dirl.config import ConfigError
from dirl.train.rl import load_rl_config
try:
    load_rl_config(sys.argv[1], sys.argv[2:])
except ConfigError as e:
    print(f"dirl: error: {e}", file=sys.stderr)
    sys.exit(2)
PY

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
GPUS=0
if command -v nvidia-smi >/dev/null 2>&1; then
  GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
GPUS_PER_NODE="${GPUS_PER_NODE:-$GPUS}"

if [[ "$GPUS_PER_NODE" -eq 0 ]]; then
  # No GPU: gloo processes on the CPU (DeepSpeed ZeRO-1 works there too with dist.strategy=deepspeed).
  export ACCELERATE_USE_CPU=true
  exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --nproc_per_node "${NPROC:-1}" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m dirl.cli rl "$CONFIG" "$@"
fi

if [[ -n "${ACCELERATE_CONFIG:-}" ]]; then
  exec "$PYTHON" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" \
    --num_machines "$NNODES" --machine_rank "$NODE_RANK" \
    --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
    -m dirl.cli rl "$CONFIG" "$@"
fi
exec "$PYTHON" -m accelerate.commands.launch \
  --use_deepspeed --zero_stage 1 --mixed_precision bf16 \
  --num_processes $((GPUS_PER_NODE * NNODES)) --num_machines "$NNODES" --machine_rank "$NODE_RANK" \
  --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
  -m dirl.cli rl "$CONFIG" "$@"
