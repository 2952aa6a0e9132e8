"""Multi-node launch proven on one machine: examples/sft.sh started twice as NNODES=2 (NODE_RANK 0 and
1, MASTER_ADDR=127.0.0.1, one process each) trains as one 2-process job: both ranks end with the same
parameters, equal to those of a 2-process single-node run of the same config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ports import rendezvous_port
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.tiny.hidden_size=64", "model.tiny.num_hidden_layers=2", "model.tiny.head_dim=16",
        "model.tiny.intermediate_size=128"]
SFT_ARGS = [*TINY, "data.num_samples=48", "data.max_length=96", "train.max_steps=2", "train.global_batch_size=4",
            "train.micro_batch_size=2", "logging.progress_bar=false", "logging.tensorboard=false"]


def _env(port: int, **extra) -> dict:
    return dict(os.environ, PYTHON=sys.executable, GPUS_PER_NODE="0", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port), OMP_NUM_THREADS="1", **extra)


def _launch(script: str, args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(ROOT / "examples" / script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def _finish(p: subprocess.Popen) -> str:
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-4000:]
    return out


def _weights(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    return summary, load_file(str(Path(summary["final_model"]) / "model.safetensors"))


@pytest.mark.slow
def test_sft_two_nodes_train_as_one_job(tmp_path):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"output_dir: {tmp_path}\n")
    port = rendezvous_port()
    nodes = [_launch("sft.sh", [str(cfg), "run_name=nodes", *SFT_ARGS],
                     _env(port, NNODES="2", NODE_RANK=str(r), NPROC_PER_NODE="1")) for r in (0, 1)]
    for p in nodes:
        _finish(p)
    _finish(_launch("sft.sh", [str(cfg), "run_name=single", *SFT_ARGS], _env(rendezvous_port(), NPROC_PER_NODE="2")))

    two_nodes, w_nodes = _weights(tmp_path / "nodes")
    one_node, w_single = _weights(tmp_path / "single")
    assert two_nodes["world_size"] == 2 and two_nodes["steps"] == 2, two_nodes
    assert two_nodes["ranks_in_sync"], two_nodes["param_digest_per_rank"]
    assert len(two_nodes["param_digest_per_rank"]) == 2
    assert two_nodes["param_digest_per_rank"] == one_node["param_digest_per_rank"]
    assert w_nodes.keys() == w_single.keys()
    for k in w_nodes:
        assert (w_nodes[k] == w_single[k]).all(), k


RL_ARGS = ["runs_dir=/nonexistent", "train.steps=2", "train.prompts_per_step=2", "train.num_generations=4",
           "train.micro_batch_size=8", "train.filter_groups=false", "train.save_every=0", "optim.lr=1e-3",
           "rollout.decoding.max_new_tokens=8", "eval.enabled=false", "logging.progress_bar=false",
           "logging.tensorboard=false", "custom_rewards.sevens=helpers_rl_dist:digit_fraction",
           "rewards.weights={sevens: 1.0}"]  # a reward that varies within a group: real updates


@pytest.mark.slow
@pytest.mark.first
def test_rl_two_nodes_train_as_one_job(tmp_path, tiny_dir):
    """examples/rl.sh as two one-process "nodes": each rank starts its own rollout server (colocated),
    and the job ends with the parameters of a 2-process single-node run."""
    cfg = tmp_path / "rl.yaml"
    cfg.write_text(f"output_dir: {tmp_path}\nmodel:\n  path: {tiny_dir}\n")
    port = rendezvous_port()
    path = os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])  # the toy reward's module
    nodes = [_launch("rl.sh", [str(cfg), "run_name=nodes", *RL_ARGS],
                     _env(port, NNODES="2", NODE_RANK=str(r), NPROC_PER_NODE="1", PYTHONPATH=path)) for r in (0, 1)]
    for p in nodes:
        _finish(p)
    _finish(_launch("rl.sh", [str(cfg), "run_name=single", *RL_ARGS],
                    _env(rendezvous_port(), NPROC_PER_NODE="2", PYTHONPATH=path)))

    two_nodes, w_nodes = _weights(tmp_path / "nodes")
    one_node, w_single = _weights(tmp_path / "single")
    assert two_nodes["world_size"] == 2 and two_nodes["servers"] == "colocated", two_nodes
    assert two_nodes["ranks_in_sync"], two_nodes["param_digest_per_rank"]
    assert two_nodes["param_digest_per_rank"] == one_node["param_digest_per_rank"]
    for k in w_nodes:
        assert (w_nodes[k] == w_single[k]).all(), k
    start = load_file(str(tiny_dir / "model.safetensors"))
    assert any(not (w_nodes[k] == start[k]).all() for k in start)  # the two steps did train
    logs = sorted(p.name for p in (tmp_path / "nodes" / "logs").glob("server-rank*.log"))
    assert logs == ["server-rank0.log", "server-rank1.log"]
