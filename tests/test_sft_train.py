"""SFT training end to end: multi-process runs, kill and resume, atomic checkpoints, learning."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dirl.train.checkpoint import is_complete, latest_checkpoint, list_checkpoints, load_checkpoint
from dirl.train.sft import load_sft_config, train_sft

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_sft_loss import SMALL, torchrun  # noqa: E402

TRAIN = SMALL + ["train.global_batch_size=8", "train.micro_batch_size=2", "train.max_steps=10",
                 "optim.lr=3e-3", "optim.warmup_steps=2"]


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for _, p in sorted(model.named_parameters())])


def _single_process_params(tmp_path: Path, overrides: list[str]) -> tuple[torch.Tensor, dict]:
    box = {}
    cfg = load_sft_config(None, overrides + [f"output_dir={tmp_path}", "run_name=single"])
    summary = train_sft(cfg, on_finish=lambda m, acc: box.setdefault("p", _flat(m)))
    return box["p"], summary


def _check_two_rank_run(out: Path, single: torch.Tensor, strategy: str, tol: float) -> None:
    p0 = torch.load(out / "params_rank0.pt")
    p1 = torch.load(out / "params_rank1.pt")
    assert torch.equal(p0, p1), "ranks ended with different parameters"
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["strategy"] == strategy
    assert s["loss_last"] < 0.8 * s["loss_first"], (s["loss_first"], s["loss_last"])
    # and the same trajectory as one process with the whole batch (fp32; Adam amplifies rounding a little)
    assert (p0 - single).abs().max().item() < tol
    assert is_complete(s["final_checkpoint"])


def test_two_process_ddp_run_matches_one_process(tmp_path):
    single, s1 = _single_process_params(tmp_path, TRAIN)
    out = tmp_path / "ddp"
    torchrun(["train", str(out), *TRAIN, "dist.strategy=ddp", f"output_dir={tmp_path}", "run_name=ddp"])
    _check_two_rank_run(out, single, "ddp", tol=1e-4)


@pytest.mark.slow
def test_two_process_deepspeed_zero1_run_matches_one_process(tmp_path):
    single, _ = _single_process_params(tmp_path, TRAIN)
    out = tmp_path / "ds"
    torchrun(["train", str(out), *TRAIN, "dist.strategy=deepspeed", f"output_dir={tmp_path}", "run_name=ds",
              "train.save_every=5"])
    _check_two_rank_run(out, single, "deepspeed", tol=1e-4)
    # the sharded ZeRO optimizer state was written once per rank
    ck = latest_checkpoint(tmp_path / "ds")
    assert sorted(p.name for p in (ck / "optimizer").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    assert json.loads((ck / "trainer_state.json").read_text())["optimizer"] == "zero-sharded"
    # resume under ZeRO-1 from the middle checkpoint: the same final parameters
    import shutil

    shutil.rmtree(ck)
    assert latest_checkpoint(tmp_path / "ds").name == "step_00000005"
    out2 = tmp_path / "ds_resumed"
    torchrun(["train", str(out2), *TRAIN, "dist.strategy=deepspeed", f"output_dir={tmp_path}", "run_name=ds",
              "train.save_every=5"])
    assert torch.equal(torch.load(out2 / "params_rank0.pt"), torch.load(out2 / "params_rank1.pt"))
    assert (torch.load(out2 / "params_rank0.pt") - torch.load(out / "params_rank0.pt")).abs().max().item() < 1e-6
    assert json.loads((out2 / "summary.json").read_text())["start_step"] == 5


def test_one_process_deepspeed_run_matches_the_plain_run(tmp_path):
    """``dist.strategy=deepspeed`` with no launcher: the run makes its own one-process group (on a
    port the OS picks) and trains exactly as the plain one-process run does. DeepSpeed builds no C++
    op for it (an empty extensions folder stays empty): its CPU shared-memory collective, which
    training never calls, would take a compiler and about 50 s (dirl.train.common.skip_deepspeed_shm_op)."""
    single, _ = _single_process_params(tmp_path, TRAIN)
    out = tmp_path / "ds1"
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    extensions = tmp_path / "torch_extensions"
    env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               TORCH_EXTENSIONS_DIR=str(extensions))
    cmd = [sys.executable, str(HERE / "helpers_dist.py"), "train", str(out), *TRAIN, "dist.strategy=deepspeed",
           f"output_dir={tmp_path}", "run_name=ds1"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 1 and s["strategy"] == "deepspeed"
    assert (torch.load(out / "params_rank0.pt") - single).abs().max().item() < 1e-4
    assert is_complete(s["final_checkpoint"])
    assert not extensions.exists() or not any(extensions.rglob("*")), sorted(extensions.rglob("*"))


# --------------------------------------------------------------------------------------------
# kill and resume
# --------------------------------------------------------------------------------------------


def test_a_fresh_start_keeps_an_earlier_runs_checkpoints_apart(tmp_path):
    """train.resume=never in a run folder with checkpoints: they are set aside (kept), the new
    run's own checkpoints are pruned only among themselves, and its summary names one that exists.
    Resuming past the run's steps, from a missing path or from the other command's checkpoint is
    one ConfigError naming the key, before any step."""
    from dirl.config import ConfigError

    def run(*extra):
        cfg = load_sft_config(None, SMALL + [f"output_dir={tmp_path}", "run_name=r", "train.global_batch_size=4",
                                             "train.micro_batch_size=4", "train.keep_last=2", *extra])
        return train_sft(cfg)

    run("train.max_steps=6", "train.save_every=2")
    run_dir = tmp_path / "r"
    assert [s for s, _ in list_checkpoints(run_dir)] == [4, 6]
    summary = run("train.max_steps=3", "train.save_every=1", "train.resume=never")
    assert [s for s, _ in list_checkpoints(run_dir)] == [2, 3]
    assert Path(summary["final_model"]).is_dir() and "step_00000003" in summary["final_model"]
    (aside,) = run_dir.glob("checkpoints.replaced-*")
    assert sorted(d.name for d in aside.iterdir()) == ["step_00000004", "step_00000006"]
    with pytest.raises(ConfigError, match="config key 'train.max_steps': the run resumes from step 3"):
        run("train.max_steps=2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="config key 'train.resume': '.*empty' is neither"):
        run(f"train.resume={tmp_path / 'empty'}")
    state = latest_checkpoint(run_dir) / "trainer_state.json"
    state.write_text(json.dumps(dict(json.loads(state.read_text()), kind="rl")))
    with pytest.raises(ConfigError, match="is a 'dirl rl' checkpoint"):
        run("train.max_steps=4")


def test_a_resumed_run_keeps_the_settings_of_its_checkpoint(tmp_path):
    """The optimizer's restored state would keep the old lr and a changed data seed would meet the
    old cursor: a resume with other data, optimizer or batch settings is one ConfigError naming the
    key; more steps are allowed."""
    from dirl.config import ConfigError

    def run(*extra):
        cfg = load_sft_config(None, SMALL + [f"output_dir={tmp_path}", "run_name=r", "train.global_batch_size=4",
                                             "train.micro_batch_size=4", "train.save_every=1", *extra])
        return train_sft(cfg)

    run("train.max_steps=2")
    for bad, key in (("optim.lr=0.5", "optim.lr"), ("data.seed=7", "data.seed"), ("data.num_samples=32", "data.num_samples"),
                     ("train.global_batch_size=8", "train.global_batch_size")):
        with pytest.raises(ConfigError, match=f"config key '{key}': the run resumed from .* was made with"):
            run("train.max_steps=3", bad)
    assert run("train.max_steps=3")["start_step"] == 2
    # a re-save killed between its two renames leaves step 3 only as a hidden complete copy: the
    # next run brings it back and resumes from it, not from step 2
    ckpts = tmp_path / "r" / "checkpoints"
    os.replace(ckpts / "step_00000003", ckpts / ".step_00000003.old")
    assert run("train.max_steps=4")["start_step"] == 3


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _losses(run: Path) -> dict[int, float]:
    out = {}
    for ln in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(ln)
        out[r["step"]] = r["loss"]
    return out


def test_sigkill_then_resume_continues_like_an_uninterrupted_run(tmp_path):
    steps = 18
    common = SMALL + ["train.global_batch_size=4", "train.micro_batch_size=2", f"train.max_steps={steps}",
                      "train.save_every=3", "train.keep_last=2", f"output_dir={tmp_path}"]
    # the reference: one uninterrupted run
    ref = train_sft(load_sft_config(None, common + ["run_name=ref"]))
    ref_losses = _losses(Path(ref["run_dir"]))
    assert sorted(ref_losses) == list(range(1, steps + 1))

    run = tmp_path / "killed"
    args = [*common, "run_name=killed"]
    # the first run holds after its first checkpoint (tests/helpers_dist.py sft-hold) and is killed
    # there: an event, so a fast machine cannot finish the run before the kill
    proc = subprocess.Popen([sys.executable, str(HERE / "helpers_dist.py"), "sft-hold", "-", *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    for line in proc.stdout:  # a hang fails by the suite's per-test timeout
        log.append(line)
        if line.startswith("HELD"):
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert log and log[-1].startswith("HELD"), "".join(log)[-3000:]
    assert proc.returncode == -signal.SIGKILL
    first = latest_checkpoint(run)
    assert first is not None and not (run / "summary.json").exists()
    killed_at = int(json.loads((first / "trainer_state.json").read_text())["step"])
    assert killed_at == 3 and log[-1].strip().endswith("step 3")

    cmd = [sys.executable, "-m", "dirl.cli", "sft", *args]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    resumed_from = int(re.search(r"resumed from .* at step (\d+)", r.stdout).group(1))
    assert resumed_from >= killed_at
    got = _losses(run)
    assert sorted(got) == list(range(1, steps + 1))  # steps logged after the checkpoint were redone once
    for s in range(1, steps + 1):
        assert abs(got[s] - ref_losses[s]) <= 1e-5 * max(1.0, abs(ref_losses[s])), (s, got[s], ref_losses[s])
    # final weights match too
    from safetensors.torch import load_file

    wa = load_file(str(Path(ref["final_model"]) / "model.safetensors"))
    wb = load_file(str(run / "checkpoints" / f"step_{steps:08d}" / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    assert len(list_checkpoints(run)) <= 2  # keep_last


def test_a_checkpoint_reaches_the_disk_before_it_is_marked_complete(tmp_path, monkeypatch):
    """Power loss, not a kill: every file of a checkpoint and every folder holding one is fsynced
    before COMPLETE is written, COMPLETE itself before the rename that publishes the checkpoint,
    and the checkpoints folder after it. (Which files ``os.fsync`` was given is read back from
    /proc; nothing is faked: the calls still flush.)"""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc")
    from dirl.config import OptimConfig, TinyModelConfig
    from dirl.model.tiny import build_tiny_model
    from dirl.train.checkpoint import save_checkpoint
    from dirl.train.common import build_optimizer, build_scheduler

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync " + os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace(a, b):
        events.append(f"replace {a} {b}")
        return real_replace(a, b)

    model, tok = build_tiny_model(TinyModelConfig(hidden_size=64, num_hidden_layers=1, intermediate_size=128))
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    sched = build_scheduler(opt, OptimConfig(lr=1e-3), 10)
    run = (tmp_path / "run").resolve()
    for resave in (False, True):  # a first save, then the same step again (the swap)
        events.clear()
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        final = save_checkpoint(run, 1, model, tok, opt, sched, {"cursor": 1})
        monkeypatch.undo()
        tmp = run / "checkpoints" / ".step_00000001.tmp"
        synced = [e.split(" ", 1)[1] for e in events if e.startswith("fsync ")]
        marker = synced.index(str(tmp / "COMPLETE"))
        expected = {str(tmp / f.relative_to(final)) for f in final.rglob("*") if f.name != "COMPLETE"}
        assert expected <= set(synced[:marker]), sorted(expected - set(synced[:marker]))
        publish = next(i for i, e in enumerate(events) if e == f"replace {tmp} {final}")
        written = events.index(f"fsync {tmp / 'COMPLETE'}")
        assert f"fsync {tmp}" in events[written + 1:publish]  # the folder's entry of COMPLETE
        assert f"fsync {run / 'checkpoints'}" in events[publish + 1:]
        assert is_complete(final) and not tmp.exists()


def test_sigkill_during_saves_never_leaves_a_complete_looking_broken_checkpoint(tmp_path):
    from dirl.config import OptimConfig, TinyModelConfig
    from dirl.model.tiny import build_tiny_model
    from dirl.train.common import build_optimizer, build_scheduler

    # killed inside the 4th save (events from tests/helpers_dist.py, not delays): between two state
    # files, just before the rename that publishes it, and while an old checkpoint is being pruned
    points = ("write", "publish", "prune")
    procs = {point: subprocess.Popen(
        [sys.executable, str(HERE / "helpers_dist.py"), "save-loop", str(tmp_path / point), point],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for point in points}
    try:
        for point, proc in procs.items():
            run = tmp_path / point
            lines = []
            for line in proc.stdout:
                if line.startswith(("saved", "HELD")):  # (deepspeed may log a line first)
                    lines.append(line.strip())
                if line.startswith("HELD"):
                    break
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            assert lines == ["saved 1", "saved 2", "saved 3", f"HELD {point}"], lines
            assert [s for s, _ in list_checkpoints(run)] == ([2, 3, 4] if point == "prune" else [1, 2, 3])
            cks = list_checkpoints(run)
            assert cks
            for step, ck in cks:
                model, _ = build_tiny_model(TinyModelConfig(hidden_size=64, num_hidden_layers=1, intermediate_size=128))
                opt = build_optimizer(model, OptimConfig(lr=1e-3))
                sched = build_scheduler(opt, OptimConfig(lr=1e-3), 1000)
                st = load_checkpoint(ck, model=model, optimizer=opt, scheduler=sched)
                assert st["step"] == step and st["extra"]["cursor"] == step
            # anything else in the folder is a hidden temporary that latest_checkpoint ignores
            others = [p.name for p in (run / "checkpoints").iterdir() if not is_complete(p)]
            assert all(n.startswith(".") for n in others), others
    finally:
        for proc in procs.values():  # the held loops never exit by themselves
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------------
# the embedded default learns: an independent greedy decoder, used on the quick-start's SFT model
# by tests/test_quickstart.py (one SFT run of the default serves both checks)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_decode(model, tok, questions: list[str], max_new_tokens: int = 40) -> list[str]:
    """Naive block-by-block greedy decoding without a cache: the current block starts all [M]; each
    forward sees the committed text block-causally and the current block bidirectionally, and keeps
    the single most confident masked position; a block is finished when no [M] is left."""
    from dirl.data.chat import prompt_ids, stop_token_ids
    from dirl.model.attention import block_causal_meta

    B, M = model.block_size, model.mask_token_id
    stops = set(stop_token_ids(tok))
    model.eval()
    groups: dict[int, list[tuple[int, list[int]]]] = {}
    for i, q in enumerate(questions):
        ids = prompt_ids(tok, q)
        groups.setdefault(len(ids), []).append((i, ids))
    out: list[str] = [""] * len(questions)
    for P, items in groups.items():
        x = torch.tensor([ids for _, ids in items])
        n = len(items)
        start, end = P, P + max_new_tokens
        while start < end:
            stop = (start // B + 1) * B
            x = torch.cat([x, torch.full((n, stop - x.shape[1]), M)], 1)
            for _ in range(stop - start):
                logits = model(x, block_causal_meta(x.shape[1], B, batch=n))[:, start:stop].float()
                conf, tokn = torch.softmax(logits, -1).max(-1)
                still = x[:, start:stop] == M
                conf = torch.where(still, conf, torch.full_like(conf, -1.0))
                j = conf.argmax(-1)
                rows = torch.arange(n)
                upd = still[rows, j]
                x[rows[upd], start + j[upd]] = tokn[rows, j][upd]
            start = stop
            if all(any(int(t) in stops for t in row[P:]) for row in x):
                break
        for (i, _), row in zip(items, x):
            gen = row[P:].tolist()
            cut = next((k for k, t in enumerate(gen) if t in stops), len(gen))
            out[i] = tok.decode(gen[:cut], skip_special_tokens=True)
    return out


def boxed_answer(text: str):
    m = re.findall(r"\\boxed\{([^{}]*)\}", text)
    return m[-1].strip() if m else None


def heldout_scores(model, tok, problems) -> dict:
    outs = greedy_decode(model, tok, [p["question"] for p in problems])
    answers = [boxed_answer(o) for o in outs]
    exact = sum(a == p["answer"] for a, p in zip(answers, problems)) / len(problems)
    formatted = sum(a is not None for a in answers) / len(problems)
    # digits of the answer in the right place (partial credit the untrained model cannot get by luck)
    digit = sum(sum(x == y for x, y in zip((a or "").rjust(3), p["answer"].rjust(3))) / 3
                for a, p in zip(answers, problems)) / len(problems)
    return {"exact": exact, "formatted": formatted, "digits": digit, "samples": outs[:3]}


# --------------------------------------------------------------------------------------------
# configuration, schedules, command line
# --------------------------------------------------------------------------------------------


def test_shipped_configs(tiny_dir):
    from dirl.config import to_dict
    from dirl.train.common import deepspeed_config_dict
    from dirl.train.sft import SFTConfig

    root = HERE.parent
    default = SFTConfig()
    default.validate()  # resolves what the defaults leave open (data.num_samples for the source)
    assert to_dict(load_sft_config(str(root / "configs/sft_default.yaml"))) == to_dict(default)
    c = load_sft_config(str(root / "configs/sft_sdar8b.yaml"), [f"model.path={tiny_dir}"])
    assert (c.data.source, c.data.max_length, c.train.global_batch_size, c.train.max_steps) == \
        ("Auraithm/GLM4.6-OpenR1Math-SFT", 8192, 512, 100)
    assert (c.optim.lr, c.optim.schedule, c.optim.weight_decay, c.dist.strategy) == (1e-5, "cosine", 0.0, "deepspeed")
    ds = deepspeed_config_dict(c.dist, micro_batch_size=1, gradient_accumulation_steps=64, max_grad_norm=1.0,
                               mixed_precision="bf16")
    assert ds["zero_optimization"]["stage"] == 1 and ds["bf16"]["enabled"] is True
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (1, 64, 1.0)
    # a section override keeps the run's other defaults
    o = load_sft_config(None, ["optim.lr=1e-4"])
    assert o.optim.lr == 1e-4 and o.optim.schedule == SFTConfig().optim.schedule
    assert o.optim.warmup_steps == SFTConfig().optim.warmup_steps


def test_cli_rejects_bad_config_in_one_line(capsys):
    from dirl.cli import main
    from dirl.config import ConfigError

    assert main(["sft", "train.nope=1"]) == 2
    assert "unknown config key 'train.nope'" in capsys.readouterr().err
    assert main(["sft", "train.global_batch_size=10", "train.micro_batch_size=4"]) == 2
    assert "train.global_batch_size" in capsys.readouterr().err
    # values AdamW, numpy or the model would refuse only after the model is built, or take silently
    # (a negative min_lr_ratio ends the cosine schedule in gradient ascent), name their key first
    for bad, key in (("optim.min_lr_ratio=-2", "optim.min_lr_ratio"), ("optim.betas=[1.5,0.9]", "optim.betas"),
                     ("optim.eps=-1", "optim.eps"), ("optim.lr=nan", "optim.lr"), ("data.seed=-1", "data.seed"),
                     ("model.tiny.num_attention_heads=3", "model.tiny.num_attention_heads"),
                     ("model.tiny.num_hidden_layers=0", "model.tiny.num_hidden_layers")):
        from dirl.train.rl.config import load_rl_config

        assert main(["sft", bad]) == 2, bad
        assert f"config key '{key}'" in capsys.readouterr().err, bad
        with pytest.raises(ConfigError, match=f"config key '{key}'"):
            load_rl_config(None, [bad])


def test_schedules():
    from dirl.config import OptimConfig
    from dirl.train.common import lr_multiplier

    cos = OptimConfig(schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    vals = [lr_multiplier(s, cos, 12) for s in range(12)]
    assert vals[:2] == [0.5, 1.0] and abs(vals[2] - 1.0) < 1e-12
    assert all(a >= b for a, b in zip(vals[1:], vals[2:])) and abs(lr_multiplier(12, cos, 12) - 0.1) < 1e-12
    cw = OptimConfig(schedule="constant_with_warmup", warmup_steps=4)
    assert [lr_multiplier(s, cw, 10) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_multiplier(3, OptimConfig(schedule="constant", warmup_steps=5), 10) == 1.0
