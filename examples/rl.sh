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
#   bash examples/rl.sh configs/rl_sdar8b.yaml server.urls=[http://10.0.0.5:8000,http://10.0.0.6:8000]
#       a pool of running servers (`dirl serve --backend lmdeploy ...`) instead of colocated ones
#
# Several nodes: run the same command on every node with
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0 address> MASTER_PORT=29500 bash examples/rl.sh CONFIG ...
# Environment: NPROC_PER_NODE (processes per node; default every visible GPU, or 1 without GPUs,
# where the processes use gloo on the CPU), GPUS_PER_NODE, ACCELERATE_CONFIG (default
# configs/accelerate/zero1.yaml; configs/accelerate/ddp.yaml for plain DDP), PYTHON; see examples/launch.sh.
set -euo pipefail
source "$(dirname "$0")/launch.sh"
dirl_launch rl "$@"
