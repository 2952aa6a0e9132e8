#!/usr/bin/env bash
# Supervised fine-tuning of a block diffusion LM with the random-masking blockwise NELBO.
#
#   bash examples/sft.sh
#       the embedded default, on CPU, in about 3 minutes on 2 idle cores: a tiny SDAR-architecture
#       model made on the spot (model.tiny.*), 7,000 problems of the synthetic arithmetic train split
#       (worked column steps, an imperfect teacher's) packed into rows of 96 tokens, 800 steps;
#       prints the final checkpoint (SDAR layout) at the end.
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
# Environment: NPROC_PER_NODE (processes per node; default every visible GPU, or 1 without GPUs,
# where the processes use gloo on the CPU), GPUS_PER_NODE, ACCELERATE_CONFIG (default
# configs/accelerate/zero1.yaml; configs/accelerate/ddp.yaml for plain DDP), PYTHON; see examples/launch.sh.
# Resume: rerun the same command with run_name=<the run's folder name> (train.resume=auto picks up
# its newest complete checkpoint).
set -euo pipefail
source "$(dirname "$0")/launch.sh"
dirl_launch sft "$@"
