"""``dirl quickstart``: the embedded default end to end, on CPU, in minutes.

    make the tiny model → eval → SFT → eval → RL → eval → control (more SFT) → eval → report

Every stage is the same command a user would type (``dirl make-tiny-model``, ``dirl sft``,
``dirl eval``, ``dirl rl``), run as a child process (a fork of this one once it has imported what
the stages import; see :func:`_run`) so that its progress bar shows and a failure names its
stage. Everything lands in one folder (default ``runs/quickstart-<time>``):

    tiny/            the untrained model (SDAR layout)
    sft/             the SFT run (metrics.jsonl, loss.png, checkpoints/)
    rl/              the RL run (metrics.jsonl, curves.png, checkpoints/)
    sft_control/     the control: SFT continued from the SFT model for as long as RL took
    rl_speed/        with --speed-reward: RL with the speed reward (and eval_rl_speed/)
    eval_untrained/  eval_sft/  eval_rl/  eval_control/    held-out synthetic arithmetic, report.md each
    accuracy.png     held-out accuracy of the models
    report.md        the summary a person opens first
    summary.json     the same numbers for scripts

The control answers "would the same minutes of more SFT have done as well as RL?": it continues SFT
from the SFT model on the same SFT data, at the learning rate SFT ended with (constant; another
noise seed), for as many steps as fit in the wall-clock seconds the RL stage took, and is evaluated
like the others.

The SFT data are an imperfect teacher's worked solutions (``data.teacher_error``: 30% of its boxed
sums slip, dirl/data/synthetic.py), so more SFT converges toward the teacher's accuracy while RL's
reward checks the sum; the control shows the difference.

``--seed S`` changes every seed of the run (the tiny model's initialisation, the SFT data, noise and
order, the RL prompts and samples; the evaluation problems stay the same), ``--speed-reward`` adds an
RL run with the speed reward (docs/GRADING.md, Rewards; ``rewards.weights``: accuracy 0, speed 1) from the
same SFT model, as many steps as the RL stage, evaluated like the others. ``--block-size B`` makes
the tiny model with another block size (default 4); SFT, RL and eval follow the checkpoint's.
``scripts/check_quickstart_gain.py`` runs several seeds and checks the claims of docs/QUICKSTART.md.

Options forward ``key=value`` overrides to one stage (``--sft train.max_steps=50``), so a reduced
pipeline (CI, a quick look) is the same code path as the full one.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

# The tiny model's shape; the SFT stage trains this model (see configs/sft_default.yaml).
TINY_SHAPE = ["hidden_size=128", "num_hidden_layers=3", "num_attention_heads=4", "num_key_value_heads=2",
              "head_dim=32", "intermediate_size=512", "max_position_embeddings=1024", "block_size=4", "seed=0"]


def tiny_shape(seed: int = 0, block_size: int = 4) -> list[str]:
    """The ``dirl make-tiny-model`` arguments of the run: :data:`TINY_SHAPE` with its seed and block
    size replaced (SFT, RL and eval read the block size from the checkpoint)."""
    new = {"seed": seed, "block_size": block_size}
    out = []
    for arg in TINY_SHAPE:
        key = arg.split("=", 1)[0]
        out.append(f"{key}={new[key]}" if key in new else arg)
    return out


class StageError(RuntimeError):
    pass


# Stages run as forks of this process once it has imported what they import (torch, transformers,
# accelerate, dirl's commands): each stage then starts in well under a second instead of the ~9 s
# of a fresh interpreter on 2 cores, and runs exactly as the command would (its own process, its own
# exit code). Only on Linux, and only while this process runs no other Python thread (a fork copies
# the locks such a thread may hold; the native pools of OpenBLAS and torch are fork-safe while
# unused, and this process never computes); otherwise, or with DIRL_QUICKSTART_SUBPROCESS=1, each
# stage is a fresh `python -m dirl.cli` process.
SUBPROCESS_ENV = "DIRL_QUICKSTART_SUBPROCESS"
_PRELOAD = ("torch", "transformers", "accelerate", "deepspeed", "dirl.model.tiny_cli", "dirl.train.sft",
            "dirl.train.rl.recipe", "dirl.eval.run")
_PR_SET_PDEATHSIG = 1
STAGE_MODES: list[str] = []  # how each stage of this process ran: "fork" or "subprocess"


def _stage_env() -> None:
    """The environment every stage runs in, set before anything is imported (the preloaded modules
    read some of it at import)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    # torch.cuda.is_available() (DeepSpeed's import asks it) through NVML, without initialising
    # CUDA in this process: a fork of a process with CUDA initialised cannot use CUDA
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")


def _fork_ok() -> bool:
    return sys.platform.startswith("linux") and os.environ.get(SUBPROCESS_ENV, "").strip() in ("", "0")


def _can_fork_now() -> bool:
    """No other Python thread (a fork copies the locks it may hold) and CUDA not initialised here."""
    if not (_fork_ok() and threading.active_count() == 1):
        return False
    torch = sys.modules.get("torch")
    return torch is None or not torch.cuda.is_initialized()


def _preload() -> None:
    """Import what the stages import, once, before the first fork (a no-op when not forking).
    A module that fails to import is left to the stage that needs it, which reports it."""
    if not _fork_ok():
        return
    import importlib

    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - deepspeed may raise more than ImportError on a bad install
            pass


def _stage_child(args: list[str], w: int, parent: int) -> None:
    """In the forked child: output to the pipe, stdin from /dev/null, die with the quick-start
    (SIGKILL when it ends; its servers die with this process in turn), run the command, exit with
    its code as ``python -m dirl.cli`` would. Never returns."""
    code = 1
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the quick-start died before the line above
            os._exit(1)
        os.dup2(w, 1)
        os.dup2(w, 2)
        os.close(w)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        # fresh streams on the pipe (the parent's may have been replaced by its caller)
        sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)
        from dirl import cli

        sys.argv = [cli.__file__, *args]
        try:
            cli.run(args)  # ends with sys.exit (or os._exit after a torch process group)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        cli.end_now(code)  # what the interpreter's exit would run first (the stage's servers stop)
    except BaseException:  # noqa: BLE001 - printed, as the interpreter would
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _run(stage: str, args: list[str], log: Path) -> float:
    """Run the command ``dirl ARGS`` with live output (also appended to ``log``); seconds taken.
    Ctrl-C reaches the stage too (one process group): its output is read to the end, so its last
    words and its clean-up are not cut off, then the interrupt goes on."""
    print(f"\n=== [{stage}] dirl {' '.join(shlex.quote(a) for a in args)}", flush=True)
    _stage_env()
    forked = _can_fork_now()
    STAGE_MODES.append("fork" if forked else "subprocess")
    t0 = time.time()
    interrupted = False
    with open(log, "a") as f:
        f.write(f"\n=== [{stage}] dirl {' '.join(args)}\n")
        f.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        if forked:
            r, w = os.pipe()
            me = os.getpid()
            pid = os.fork()
            if pid == 0:
                try:
                    os.close(r)
                    _stage_child(args, w, me)
                finally:
                    os._exit(1)  # never the quick-start's own code in the child
            os.close(w)
            stream = os.fdopen(r, "r", encoding="utf-8", errors="replace")
        else:
            proc = subprocess.Popen([sys.executable, "-m", "dirl.cli", *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, env=dict(os.environ), text=True, bufsize=1)
            stream = proc.stdout
        with stream:
            while True:
                try:
                    for line in stream:
                        sys.stdout.write(line)
                        f.write(line)
                    break
                except KeyboardInterrupt:
                    interrupted = True  # the stage got it too: read what it still says
        rc = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) if forked else proc.wait()
    if interrupted:
        raise KeyboardInterrupt
    if rc != 0:
        raise StageError(f"stage '{stage}' failed (exit code {rc}); its output is in {log}")
    return time.time() - t0


def _metrics(eval_dir: Path) -> dict:
    data = json.loads((eval_dir / "metrics.json").read_text())
    m = dict(data.get("benchmarks", {}).get("synthetic") or data.get("average") or {})
    m.update(error_breakdown(eval_dir / "responses.jsonl"))
    return m


def error_breakdown(responses: Path) -> dict:
    """Where the errors are: the fraction of responses that box exactly the teacher's slip of the true
    sum (``teacher_slip``), and of those wrong in any other way (``other_error``)."""
    from dirl.data.synthetic import slip_of

    rows = [json.loads(ln) for ln in responses.read_text().splitlines() if ln.strip()] if responses.is_file() else []
    if not rows:
        return {}
    slips = sum(1 for r in rows if not r["correct"] and str(r.get("gold", "")).isdigit()
                and r.get("answer") == str(slip_of(int(r["gold"]))))
    wrong = sum(1 for r in rows if not r["correct"])
    return {"teacher_slip": slips / len(rows), "other_error": (wrong - slips) / len(rows)}


def _accuracy_plot(rows: list[tuple[str, dict]], out: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return None
    names = [n for n, _ in rows]
    acc = [100 * (m.get("accuracy") or 0.0) for _, m in rows]
    passk = [100 * (m.get(_pass_key(m)) or 0.0) for _, m in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], acc, width=0.4, label="accuracy (avg over samples)")
    ax.bar([i + 0.2 for i in x], passk, width=0.4, label=_pass_key(rows[-1][1]) or "pass@k")
    for i, v in enumerate(acc):
        ax.text(i - 0.2, v + 1, f"{v:.1f}", ha="center", fontsize=8)
    ax.set_xticks(list(x), names)
    ax.set_ylim(0, 105)
    ax.set_ylabel("% of held-out problems")
    ax.set_title("Held-out synthetic arithmetic")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _pass_key(m: dict) -> str:
    ks = sorted((int(k.split("@")[1]) for k in m if k.startswith("pass@")), reverse=True)
    return f"pass@{ks[0]}" if ks else ""


def _fmt(x, pct=True) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}%" if pct else f"{x:.2f}"


CONTROL = "SFT + more SFT"
SPEED = "SFT + RL (speed reward)"


def write_report(out: Path, stages: dict, evals: list[tuple[str, dict]], sft: dict, rl: dict, times: dict,
                 control: Optional[dict] = None) -> Path:
    plot = _accuracy_plot(evals, out / "accuracy.png")
    pk = _pass_key(evals[-1][1])
    lines = [
        "# dirl quick-start report",
        "",
        "The embedded default, end to end: a tiny SDAR-architecture model, SFT with the random-masking "
        "blockwise NELBO, then RL with DiPO (GRPO on step-level log-probabilities) through the rollout "
        "server with in-place weight updates. Evaluation is on held-out addition problems never seen in "
        "training.",
        "",
        f"| model | accuracy | {pk or 'pass@k'} | the teacher's slip | other errors | tokens per step | mean length "
        "| problems × samples |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in evals:
        lines.append(
            f"| {name} | {_fmt(m.get('accuracy'))} | {_fmt(m.get(pk))} | {_fmt(m.get('teacher_slip'))} | "
            f"{_fmt(m.get('other_error'))} | {_fmt(m.get('tokens_per_step'), False)} | "
            f"{_fmt(m.get('mean_response_length'), False)} | {m.get('num_problems', '–')} × {m.get('samples_per_problem', '–')} |"
        )
    by = dict(evals)
    if "SFT" in by and "SFT + RL" in by:
        gain = 100 * ((by["SFT + RL"].get("accuracy") or 0) - (by["SFT"].get("accuracy") or 0))
        lines += ["", f"RL changed held-out accuracy by **{gain:+.1f} points** over the SFT model."]
        if CONTROL in by and control:
            def delta(name: str, key: str) -> float:
                return 100 * ((by[name].get(key) or 0) - (by["SFT"].get(key) or 0))

            line = (f"Control: the same {control['seconds']:.0f} s spent on more SFT instead ({control['steps']} steps "
                    f"at lr {control['lr']:.2g}, the rate SFT ended with) changed it by **{delta(CONTROL, 'accuracy'):+.1f} "
                    "points**")
            if pk:
                line += (f"; {pk} moved by {delta(CONTROL, pk):+.1f} points with more SFT and by "
                         f"{delta('SFT + RL', pk):+.1f} with RL")
            lines += ["", line + ". More SFT imitates worked solutions; RL learns from a 0/1 reward on its own "
                      "samples of prompts it has no solutions for (docs/QUICKSTART.md discusses the comparison)."]
    lines += ["", "The teacher's slip: a boxed sum whose last digit is one too high, the mistake of the teacher's "
              "slipped SFT solutions (data.teacher_error, dirl/data/synthetic.py); SFT learns it, RL's reward does "
              "not pay for it.", "", "## Curves", ""]
    if plot:
        lines += ["![held-out accuracy](accuracy.png)", ""]
    for title, rel in (("SFT loss", "sft/loss.png"), ("RL reward, accuracy and length per step", "rl/curves.png")):
        if (out / rel).is_file():
            lines += [f"**{title}**", "", f"![{title}]({rel})", ""]
    lines += ["## Stages", "", "| stage | seconds | output |", "|---|---:|---|"]
    for name, secs in times.items():
        lines.append(f"| {name} | {secs:.0f} | `{stages.get(name, '')}` |")
    if sft:
        lines += ["", f"SFT: loss {sft.get('loss_start', 0):.3f} → {sft.get('loss_end', 0):.3f} over "
                      f"{sft.get('steps')} steps."]
    if rl:
        keys = ("reward_first", "reward_last", "accuracy_first", "accuracy_last")
        if all(isinstance(rl.get(k), (int, float)) for k in keys):
            lines += [f"RL: training reward {rl['reward_first']:.3f} → {rl['reward_last']:.3f}, training "
                      f"accuracy {rl['accuracy_first']:.3f} → {rl['accuracy_last']:.3f} over {rl.get('steps')} steps."]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def control_settings(sft_dir: Path, sft: dict, sft_seconds: float, rl_seconds: float) -> dict:
    """Steps, learning rate and seed of the control: as many SFT steps as the RL stage's seconds buy
    at the SFT stage's pace (both measured as whole stages), at the learning rate SFT ended with, with
    the SFT run's ``train.seed`` + 1 (other noise draws; ``data.seed`` stays, so the data is the same)."""
    steps_done = max(1, int(sft.get("steps") or 1))
    steps = max(1, round(rl_seconds / (sft_seconds / steps_done)))
    lr = None
    metrics = sft_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row.get("lr"), (int, float)):
                lr = float(row["lr"])
    if lr is None:
        raise StageError(f"no learning rate found in {metrics}")
    import yaml

    run_cfg = yaml.safe_load((sft_dir / "config.yaml").read_text()) or {}
    seed = int((run_cfg.get("train") or {}).get("seed") or 0) + 1
    return {"steps": int(steps), "lr": lr, "seed": seed}


def cli_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="dirl quickstart",
        description="The embedded default end to end on CPU: tiny model, SFT, eval, RL, eval, report. "
        "Stage options are key=value overrides of that stage's config, e.g. --sft train.max_steps=50.",
    )
    p.add_argument("--out", default="", help="output folder (default runs/quickstart-<time>)")
    p.add_argument("--sft", nargs="*", default=[], metavar="K=V", help="overrides for dirl sft")
    p.add_argument("--rl", nargs="*", default=[], metavar="K=V", help="overrides for dirl rl")
    p.add_argument("--eval", nargs="*", default=[], metavar="K=V", help="overrides for every dirl eval")
    p.add_argument("--baseline-eval", nargs="*", default=["num_samples=1", "data.synthetic_size=50"], metavar="K=V",
                   help="extra overrides for evaluating the untrained model (default: 50 problems, one sample each)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the run: the tiny model's initialisation, the SFT data (which problems, the "
                   "teacher's slips, the order) and noise, the RL prompt order and sampling (default 0)")
    p.add_argument("--speed-reward", action="store_true",
                   help="also run RL with the speed reward (accuracy and tokens per step; docs/GRADING.md, Rewards) "
                   "from the SFT model, evaluated like the others")
    p.add_argument("--block-size", type=int, default=4,
                   help="the tiny model's block size B (default 4); SFT, RL and eval follow the model's")
    p.add_argument("--skip-rl", action="store_true", help="stop after SFT and its evaluation")
    p.add_argument("--no-control", action="store_true",
                   help="skip the control (SFT continued for as long as RL took, then evaluated)")
    args = p.parse_args(argv)
    if args.block_size < 1:
        p.error(f"--block-size: must be a positive integer, got {args.block_size}")

    out = Path(args.out or f"runs/quickstart-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "quickstart.log"
    t_all = time.time()
    _stage_env()
    _preload()  # counted in the run's wall time, not in any stage's
    stages: dict[str, str] = {}
    times: dict[str, float] = {}
    try:
        tiny = out / "tiny"
        shape = tiny_shape(args.seed, args.block_size)
        times["make tiny model"] = _run("make tiny model", ["make-tiny-model", "--out", str(tiny), *shape], log)
        stages["make tiny model"] = str(tiny)

        eval_cfg = Path(__file__).resolve().parents[1] / "configs" / "eval_default.yaml"
        eval_common = [str(eval_cfg)] if eval_cfg.is_file() else []

        def evaluate(name: str, model: Path, folder: str, extra: list[str]) -> dict:
            d = out / folder
            times[name] = _run(name, ["eval", *eval_common, f"model.path={model}", f"output_dir={d}",
                                      "resume=false", *args.eval, *extra], log)
            stages[name] = str(d / "report.md")
            return _metrics(d)

        evals = [("untrained", evaluate("eval untrained", tiny, "eval_untrained", args.baseline_eval))]

        seeds = [f"train.seed={args.seed}", f"data.seed={args.seed}"]
        sft_args = [*seeds, *args.sft]
        times["SFT"] = _run("SFT", ["sft", f"model.path={tiny}", f"output_dir={out}", "run_name=sft", *sft_args], log)
        sft = json.loads((out / "sft" / "summary.json").read_text())
        sft_model = Path(sft["final_model"])
        stages["SFT"] = str(sft_model)
        evals.append(("SFT", evaluate("eval SFT", sft_model, "eval_sft", [])))

        rl: dict = {}
        control: Optional[dict] = None
        if not args.skip_rl:
            # The SFT model answers most of these problems right, so most groups are flat (all correct):
            # DiRL's filter would need many refill rounds per step here; train on every group instead.
            # 60 steps: enough to unlearn most of the teacher's slip (docs/QUICKSTART.md) within 8 minutes.
            rl_args = ["eval.enabled=false", "train.filter_groups=false", "train.steps=60", *seeds, *args.rl]
            times["RL"] = _run("RL", ["rl", f"model.path={sft_model}", f"output_dir={out}", "run_name=rl", *rl_args], log)
            rl = json.loads((out / "rl" / "summary.json").read_text())
            rl_model = Path(rl["final_model"])
            stages["RL"] = str(rl_model)
            evals.append(("SFT + RL", evaluate("eval SFT + RL", rl_model, "eval_rl", [])))
            if not args.no_control:
                control = control_settings(out / "sft", sft, times["SFT"], times["RL"])
                times["control"] = _run("control", [
                    "sft", f"model.path={sft_model}", f"output_dir={out}", "run_name=sft_control", *sft_args,
                    f"train.max_steps={control['steps']}", f"optim.lr={control['lr']}", "optim.schedule=constant",
                    "optim.warmup_steps=0", "train.resume=never", f"train.seed={control['seed']}"], log)
                ctl = json.loads((out / "sft_control" / "summary.json").read_text())
                stages["control"] = str(ctl["final_model"])
                control["seconds"] = times["RL"]
                control["wall_s"] = round(times["control"], 1)
                evals.append((CONTROL, evaluate("eval control", Path(ctl["final_model"]), "eval_control", [])))
            if args.speed_reward:
                times["RL (speed)"] = _run("RL (speed)", [
                    "rl", f"model.path={sft_model}", f"output_dir={out}", "run_name=rl_speed", *rl_args,
                    "rewards.weights.accuracy=0", "rewards.weights.speed=1"], log)
                rl_speed = json.loads((out / "rl_speed" / "summary.json").read_text())
                stages["RL (speed)"] = str(rl_speed["final_model"])
                evals.append((SPEED, evaluate("eval SFT + RL (speed)", Path(rl_speed["final_model"]), "eval_rl_speed",
                                              [])))
    except StageError as e:
        print(f"dirl quickstart: {e}", file=sys.stderr)
        return 1

    report = write_report(out, stages, evals, sft, rl, times, control)
    summary = {
        "output_dir": str(out),
        "seed": args.seed,
        "seconds": round(time.time() - t_all, 1),
        "stages": stages,
        "stage_seconds": {k: round(v, 1) for k, v in times.items()},
        "stage_processes": "+".join(sorted(set(STAGE_MODES))),  # "fork" or "subprocess" (see _run)
        "eval": {name: m for name, m in evals},
        "sft": {k: sft.get(k) for k in ("loss_start", "loss_end", "steps", "train_time_s")},
        "rl": {k: rl.get(k) for k in ("reward_first", "reward_last", "accuracy_first", "accuracy_last", "steps")} if rl else {},
        "control": control or {},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n=== dirl quickstart: done in %.0f s" % summary["seconds"])
    for name, m in evals:
        print(f"  {name:<10} held-out accuracy {_fmt(m.get('accuracy'))}  ({m.get('num_problems')} problems × "
              f"{m.get('samples_per_problem')} samples)")
    print(f"  report: {report}")
    return 0
