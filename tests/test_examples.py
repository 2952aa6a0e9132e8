"""examples/sft.sh and examples/rl.sh (the shared examples/launch.sh): a config is checked before
any process starts, and a config run on a machine without GPUs launches gloo processes on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ports import rendezvous_port

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.tiny.hidden_size=64", "model.tiny.num_hidden_layers=2", "model.tiny.head_dim=16",
        "model.tiny.intermediate_size=128"]


def _run(script: str, args: list[str], **env) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHON=sys.executable, GPUS_PER_NODE="0", MASTER_PORT=str(rendezvous_port()), **env)
    return subprocess.run(["bash", str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                          env=e, timeout=600)


@pytest.mark.parametrize("script", ["sft.sh", "rl.sh"])
def test_a_bad_config_key_fails_before_launch(tmp_path, script):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  no_such_key: 1\n")
    r = _run(script, [str(cfg)])
    assert r.returncode == 2, r.stderr
    assert "dirl: error: unknown config key 'train.no_such_key'" in r.stderr, r.stderr
    assert "torch.distributed" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("script", ["sft.sh", "rl.sh"])
def test_a_missing_config_file_is_named(tmp_path, script):
    r = _run(script, [str(tmp_path / "nope.yaml")])
    assert r.returncode == 2 and "nope.yaml' does not exist" in r.stderr, r.stderr


@pytest.mark.slow
def test_sft_config_run_with_two_cpu_processes(tmp_path):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"output_dir: {tmp_path}\nrun_name: launched\n")
    r = _run("sft.sh", [str(cfg), *TINY, "data.num_samples=48", "data.max_length=96", "train.max_steps=2",
                        "train.global_batch_size=4", "train.micro_batch_size=2", "logging.progress_bar=false",
                        "logging.tensorboard=false"], NPROC_PER_NODE="2")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "launched" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2, summary
