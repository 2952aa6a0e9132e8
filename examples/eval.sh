#!/usr/bin/env bash
# Evaluate a model on math benchmarks.
#
#   bash examples/eval.sh
#       the embedded default: the newest embedded-default checkpoint under runs/ (from
#       examples/sft.sh or examples/rl.sh; a freshly made tiny model when there is none) on the
#       held-out synthetic arithmetic problems, on CPU, in a few minutes
#   bash examples/eval.sh configs/eval_sdar8b.yaml model.path=/path/to/DiRL-8B-Instruct
#       DiRL's evaluation: MATH500, GSM8K, AIME2024, AIME2025, OlympiadBench, 16 samples each
#   bash examples/eval.sh configs/eval_sdar8b_static.yaml model.path=...        (static decoding)
#   bash examples/eval.sh configs/eval_sdar8b.yaml server.urls=[http://10.0.0.2:8000]
#       against running rollout servers (`dirl serve ...`) instead of a local one
#
# Any config key can be overridden as key.sub=value (e.g. data.limit=20 num_samples=4
# data.data_dir=../shared/data/benchmarks). The report (report.md, metrics.json) and every
# response (responses.jsonl) go to output_dir (default runs/eval/<model>-<settings hash>); running
# the same command again resumes an interrupted evaluation.
set -euo pipefail
cd "$(dirname "$0")/.."

# The interpreter: $PYTHON, else the project's .venv (scripts/install.sh), else python3.
if [[ -n "${PYTHON:-}" ]]; then :
elif [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python
else PYTHON=python3; fi

if [[ $# -eq 0 || "${1}" == *=* ]]; then
  exec "$PYTHON" -m dirl.cli eval configs/eval_default.yaml "$@"
fi
exec "$PYTHON" -m dirl.cli eval "$@"
