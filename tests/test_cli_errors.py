"""Every kind of bad input to the ``dirl`` command gives one line on stderr and exit code 2.

The cases are cheap: tiny files, a tiny model, commands that fail before any real work. They run
through ``dirl.cli.main`` in this process (the stderr of the call is all there is to see); a few also
run as real processes, where a traceback would show.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dirl import cli

ROOT = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"\d+%\|.*\|")
TINY_SFT = ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_hidden_layers=1",
            "model.tiny.head_dim=16", "train.max_steps=1", "train.global_batch_size=2", "train.micro_batch_size=2",
            "dist.strategy=single", "logging.log_every=1"]


def _w(path: Path, data) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return str(path)


def _rl(tmp: Path, *overrides: str) -> list[str]:
    return ["rl", f"output_dir={tmp / 'runs'}", f"runs_dir={tmp / 'runs'}", *overrides]


def _sft(tmp: Path, *overrides: str, config: str | None = None) -> list[str]:
    return ["sft"] + ([config] if config else []) + TINY_SFT + [f"output_dir={tmp / 'runs'}", *overrides]


def _data(tmp: Path, name: str, content) -> list[str]:
    return [f"data.source={_w(tmp / name, content)}"]


def _model(tmp: Path, tiny_dir: Path, edit=None) -> str:
    d = tmp / "model"
    shutil.copytree(tiny_dir, d)
    if edit:
        edit(d)
    return str(d)


def _truncate(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _disagree(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"] = cfg["hidden_size"] * 2
    cfg["head_dim"] = cfg.get("head_dim") or 16
    (d / "config.json").write_text(json.dumps(cfg))


def _rollout(tmp: Path, model: str, rows, out: str | None = None) -> list[str]:
    inp = _w(tmp / "prompts.jsonl", rows)
    return ["rollout", "--model", model, "--input", inp, "--output", out or str(tmp / "out.jsonl"),
            "--device", "cpu", "--max-new-tokens", "4", "--no-progress"]


def _full_disk(out: Path) -> str:
    """An output whose temporary file is a link to /dev/full: writing it fails with ENOSPC (the
    command writes ``OUT.tmp`` and renames it; the rename never happens, and would move the link)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    (out.parent / (out.name + ".tmp")).symlink_to("/dev/full")
    return str(out)


GOOD_ROW = json.dumps({"prompt": "1+1=", "response": "2"}) + "\n"

# (id, what the one line must contain, argv builder(tmp, tiny_dir))
CASES = [
    # -- data rows: file and line
    ("data invalid json", "rows.jsonl:2: invalid JSON", lambda t, m: _sft(t, *_data(t, "rows.jsonl", GOOD_ROW + "{oops\n"))),
    ("data row not an object", "rows.jsonl:1:", lambda t, m: _sft(t, *_data(t, "rows.jsonl", "[1, 2]\n"))),
    ("data missing field", "rows.jsonl:2: missing field 'response'",
     lambda t, m: _sft(t, *_data(t, "rows.jsonl", GOOD_ROW + '{"prompt": "x"}\n'))),
    ("data bad role", "rows.jsonl:1:", lambda t, m: _sft(t, *_data(
        t, "rows.jsonl", json.dumps({"messages": [{"role": "wizard", "content": "x"}]}) + "\n"))),
    ("data not utf-8", "rows.jsonl:2: not UTF-8", lambda t, m: _sft(t, *_data(t, "rows.jsonl", GOOD_ROW.encode()
                                                                             + b'{"prompt": "\xff\xfe", "response": "2"}\n'))),
    ("data empty file", "rows.jsonl", lambda t, m: _sft(t, *_data(t, "rows.jsonl", ""))),
    ("data missing file", "does not exist", lambda t, m: _sft(t, f"data.source={t / 'none.jsonl'}")),
    ("data bad extension", "unsupported extension", lambda t, m: _sft(t, *_data(t, "rows.csv", "a,b\n"))),
    ("data json not an array", "rows.json:1: expected a JSON array", lambda t, m: _sft(t, *_data(t, "rows.json", '"x"'))),
    ("data truncated json array", "rows.json:", lambda t, m: _sft(t, *_data(t, "rows.json", "[" + GOOD_ROW.strip() + ","))),
    ("data every row too long", "data.max_length", lambda t, m: _sft(t, "data.max_length=4",
                                                                    *_data(t, "rows.jsonl", GOOD_ROW * 3))),
    ("data a directory", "rows.jsonl", lambda t, m: _sft(t, f"data.source={(t / 'rows.jsonl').mkdir() or t / 'rows.jsonl'}")),
    # -- configs: the key
    ("config unknown key", "train.max_stepz", lambda t, m: _sft(t, "train.max_stepz=3")),
    ("config wrong type", "train.max_steps", lambda t, m: _sft(t, "train.max_steps=lots")),
    ("config bad value", "optim.lr", lambda t, m: _sft(t, "optim.lr=-1")),
    ("config yaml syntax", "cfg.yaml", lambda t, m: _sft(t, config=_w(t / "cfg.yaml", "train: [1, 2\n"))),
    ("config not a mapping", "cfg.yaml", lambda t, m: _sft(t, config=_w(t / "cfg.yaml", "- 1\n- 2\n"))),
    ("config not utf-8", "cfg.yaml", lambda t, m: _sft(t, config=_w(t / "cfg.yaml", b"train:\n  seed: \xff\n"))),
    ("config missing file", "none.yaml", lambda t, m: _sft(t, config=str(t / "none.yaml"))),
    ("config unknown section", "trian", lambda t, m: _sft(t, config=_w(t / "cfg.yaml", "trian:\n  seed: 1\n"))),
    ("config bad override", "override", lambda t, m: _sft(t, "train.seed")),
    ("config section check", "config key 'dist.zero_stage': must be 0, 1 or 2", lambda t, m: _sft(t, "dist.zero_stage=3")),
    ("config dist timeout", "config key 'dist.timeout_s': must be > 0", lambda t, m: _sft(t, "dist.timeout_s=0")),
    ("config synthetic test split", "config key 'data.split': the synthetic task trains on 'train'",
     lambda t, m: _sft(t, "data.split=test")),
    ("config huge seed", "config key 'train.seed': a seed must be an integer in [0, 4294967295]",
     lambda t, m: _sft(t, "train.seed=99999999999999999999")),
    ("config odd head_dim", "config key 'model.tiny.head_dim': must be even", lambda t, m: _sft(t, "model.tiny.head_dim=7")),
    ("config flex on cpu", "config key 'model.attn_backend': flex needs CUDA to train",
     lambda t, m: _sft(t, "model.attn_backend=flex")),
    *([("config wandb missing", "config key 'logging.wandb_project': needs the wandb package",
        lambda t, m: _sft(t, "logging.wandb_project=x"))] if importlib.util.find_spec("wandb") is None else []),
    ("rl synthetic test split", "config key 'data.split'", lambda t, m: _rl(t, "data.split=test")),
    ("rl digits", "config key 'data.digits': must be > 0", lambda t, m: _rl(t, "data.digits=0")),
    ("rl eval benchmark", "config key 'eval.benchmark': unknown benchmark 'nope'", lambda t, m: _rl(t, "eval.benchmark=nope")),
    ("rl eval seed", "config key 'eval.seed': a seed must be", lambda t, m: _rl(t, "eval.seed=-1")),
    ("rl server device", "config key 'server.device': expected auto, cpu, cuda or cuda:N", lambda t, m: _rl(t, "server.device=gpu")),
    ("rl every prompt too long", "config key 'data.max_prompt_tokens': 2 of the 2 prompts drawn were skipped",
     lambda t, m: _rl(t, "data.max_prompt_tokens=1", "train.filter_groups=false", "train.steps=1",
                      "train.prompts_per_step=2", "train.num_generations=2", "eval.every=0")),
    ("rl more mini-batches than responses", "config key 'train.num_mini_batches': 1000 is more than the",
     lambda t, m: _rl(t, "train.num_mini_batches=1000")),
    ("rl custom reward shadows a built-in", "config key 'custom_rewards.accuracy': 'accuracy' is a built-in reward",
     lambda t, m: _rl(t, "custom_rewards.accuracy=os:getcwd")),
    ("rl custom reward not a function", "config key 'custom_rewards.x': 'os:sep' is not a function",
     lambda t, m: _rl(t, "custom_rewards.x=os:sep", "rewards.weights={x: 1.0}")),
    ("rl custom reward takes no argument", "config key 'custom_rewards.x': 'os:getcwd' must take one argument",
     lambda t, m: _rl(t, "custom_rewards.x=os:getcwd", "rewards.weights={x: 1.0}")),
    ("rl custom reward fails on a trajectory", "reward 'x' failed on trajectory 0 of the batch (TypeError",
     lambda t, m: _rl(t, "custom_rewards.x=math:sqrt", "rewards.weights={x: 1.0}", "train.filter_groups=false",
                      "train.steps=1", "train.prompts_per_step=2", "train.num_generations=2", "eval.every=0")),
    # -- checkpoints: the path
    ("ckpt missing folder", "does not exist", lambda t, m: _sft(t, f"model.path={t / 'nope'}")),
    ("ckpt is a file", "is not a folder", lambda t, m: _sft(t, f"model.path={_w(t / 'f.txt', 'x')}")),
    ("ckpt no config.json", "has no config.json", lambda t, m: _sft(t, f"model.path={_model(t, m, lambda d: (d / 'config.json').unlink())}")),
    ("ckpt config not json", "config.json' is not valid JSON", lambda t, m: _sft(
        t, f"model.path={_model(t, m, lambda d: (d / 'config.json').write_text('{'))}")),
    ("ckpt config not utf-8", "config.json", lambda t, m: _sft(t, "model.path=" + _model(
        t, m, lambda d: (d / "config.json").write_bytes(b'{"a": "\xff"}')))),
    ("ckpt no weights", "has no weights", lambda t, m: _sft(
        t, f"model.path={_model(t, m, lambda d: (d / 'model.safetensors').unlink())}")),
    ("ckpt truncated safetensors", "model.safetensors", lambda t, m: _sft(t, f"model.path={_model(t, m, _truncate)}")),
    ("ckpt garbage safetensors", "model.safetensors", lambda t, m: _sft(
        t, f"model.path={_model(t, m, lambda d: (d / 'model.safetensors').write_bytes(b'garbage' * 10))}")),
    ("ckpt config disagrees with weights", "config.json", lambda t, m: _sft(t, f"model.path={_model(t, m, _disagree)}")),
    ("serve missing model", "does not exist", lambda t, m: ["serve", "--model", str(t / "nope")]),
    ("serve not a model", "--model: ", lambda t, m: ["serve", "--model", str(t)]),
    ("rollout truncated safetensors", "model.safetensors", lambda t, m: _rollout(t, _model(t, m, _truncate), GOOD_ROW)),
    # -- other inputs
    ("rollout bad row", "prompts.jsonl:1", lambda t, m: _rollout(t, str(m), '{"prompt": 5}\n')),
    ("rollout not utf-8", "prompts.jsonl:1: not UTF-8", lambda t, m: _rollout(t, str(m), b'{"prompt": "\xff"}\n')),
    ("rollout missing input", "none.jsonl", lambda t, m: ["rollout", "--model", str(m), "--input", str(t / "none.jsonl"),
                                                          "--output", str(t / "o.jsonl"), "--device", "cpu"]),
    ("disk full", "no space left on device", lambda t, m: _rollout(t, str(m), '{"prompt": "1+1="}\n',
                                                                  out=_full_disk(t / "out.jsonl"))),
    ("score bad trajectory", "traj.jsonl:1", lambda t, m: ["score", "--model", str(m), "--input",
                                                          _w(t / "traj.jsonl", '{"token_ids": "x"}\n'),
                                                          "--output", str(t / "o.jsonl"), "--device", "cpu"]),
    ("score non-integer tokens", "traj.jsonl:2: trajectory 'b': 'token_ids' must be a list of integers",
     lambda t, m: ["score", "--model", str(m), "--input", _w(t / "traj.jsonl", json.dumps(
         {"request_id": "a", "prompt_ids": [5], "token_ids": [6, 7, 8, 9], "step_map": [1, 1, 1, 1]}) + "\n" + json.dumps(
         {"request_id": "b", "prompt_ids": [5], "token_ids": ["x"], "step_map": [1]}) + "\n"),
         "--output", str(t / "o.jsonl"), "--device", "cpu"]),
]


@pytest.mark.parametrize("case,want,argv", CASES, ids=[c for c, _, _ in CASES])
def test_bad_input_gives_one_line_and_exit_2(case, want, argv, tmp_path, tiny_dir, capsys, monkeypatch):
    monkeypatch.delenv("DIRL_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    args = argv(tmp_path, tiny_dir)
    capsys.readouterr()
    rc = cli.main(args)
    err = capsys.readouterr().err
    # progress bars of loading a checkpoint aside, the error is one line
    lines = [ln for ln in err.splitlines() if ln.strip() and not PROGRESS.search(ln)]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("dirl: error: ") and want in lines[0], lines[0]


def _run(args, env_extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("DIRL_DEBUG", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "dirl.cli", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)


def test_as_a_process_one_line_and_a_traceback_only_when_asked(tmp_path, tiny_dir):
    args = _rollout(tmp_path, _model(tmp_path, tiny_dir, _truncate), GOOD_ROW)
    proc = _run(args)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not PROGRESS.search(ln)]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for debug_args, env in ((["--debug", *args], None), (args, {"DIRL_DEBUG": "1"})):
        proc = _run(debug_args, env)
        assert proc.returncode == 2 and "Traceback" in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("dirl: error: ")


def test_eval_config_errors_come_before_torch_is_imported(tmp_path):
    """``dirl eval`` checks its config (keys, values, the model folder) without importing torch, so
    a typo is answered at once; torch comes with the work (the server is a process of its own)."""
    code = ("import sys; from dirl import cli; rc = cli.main(sys.argv[1:]); "
            "print('torch' in sys.modules, 'transformers' in sys.modules); sys.exit(rc)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("DIRL_DEBUG", None)
    for args, want in ((["eval", "decoding.temprature=1"], "decoding.temprature"),
                       (["eval", f"model.path={tmp_path / 'nowhere'}"], "config key 'model.path'"),
                       (["eval", "num_samples=0"], "config key 'num_samples'")):
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                              env=env, cwd=tmp_path)
        assert proc.returncode == 2 and want in proc.stderr, proc.stderr
        assert proc.stdout.split() == ["False", "False"], (args, proc.stdout, proc.stderr)
