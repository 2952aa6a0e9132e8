#!/usr/bin/env bash
# Supervised fine-tuning of a block diffusion LM with the random-masking blockwise NELBO.
#
#   bash examples/sft.sh
#       the embedded default, on CPU, in about 3 minutes on 2 idle cores: a tiny SDAR-architecture
#       model made on the spot (model.tiny.*), 4,000 problems of the synthetic arithmetic train split
#       (worked column steps) packed into rows of 128 tokens, 600 steps; prints the final checkpoint
#       (SDAR layout) at the end.
#       Outputs under runs/sft-<time>/: config.yaml, metrics.jsonl, tensorboard/, loss.png,
#       checkpoints/, summary.json
#   bash examples/sft.sh train.max_steps=100 model.path=/path/to/tiny       (the default with overrides)
#   bash examples/sft.sh configs/sft_sdar8b.yaml
#       the paper recipe (SDAR-8B-Chat, 8k rows, global batch 512, lr 1e-5, cosine, 100 steps) through
#       accelerate launch with DeepSpeed ZeRO-1 on every GPU of this node
#   bash examples/sft.sh configs/sft_sdar8b.yaml train.micro_batch_size=2 run_name=try2
#
# Several nodes: run the same command on every node with
#   NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0 address> MASTER_PORT=29500 bash examples/sft.sh CONFIG ...
# Environment: NPROC_PER_NODE (processes per node; default every visible GPU, or 1 on a machine
# without GPUs, where the processes use gloo on the CPU), ACCELERATE_CONFIG (default
# configs/accelerate/zero1.yaml; configs/accelerate/ddp.yaml for plain DDP), PYTHON.
# Resume: rerun the same command with run_name=<the run's folder name> (train.resume=auto picks up
# its newest complete checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

if [[ $# -eq 0 || "${1}" == *=* ]]; then
  # The embedded default: one CPU process.
  export ACCELERATE_USE_CPU=true
  exec "$PYTHON" -m dirl.cli sft "$@"
fi

CONFIG="$1"
shift
if [[ ! -f "$CONFIG" ]]; then
  echo "sft.sh: config file '$CONFIG' does not exist" >&2
  exit 2
fi

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
GPUS=0
if command -v nvidia-smi >/dev/null 2>&1; then
  GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi

if [[ "$GPUS" -eq 0 ]]; then
  # No GPU: gloo processes on the CPU (dist.strategy=deepspeed runs ZeRO-1 there as well).
  export ACCELERATE_USE_CPU=true
  exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --nproc_per_node "${NPROC_PER_NODE:-1}" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m dirl.cli sft "$CONFIG" "$@"
fi

NPROC_PER_NODE="${NPROC_PER_NODE:-$GPUS}"
exec "$PYTHON" -m accelerate.commands.launch \
  --config_file "${ACCELERATE_CONFIG:-configs/accelerate/zero1.yaml}" \
  --num_processes $((NPROC_PER_NODE * NNODES)) --num_machines "$NNODES" --machine_rank "$NODE_RANK" \
  --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
  -m dirl.cli sft "$CONFIG" "$@"
