"""The ``dirl`` command: one entry point, one subcommand per job.

Each subcommand lives in its own module as ``cli_main(argv) -> int`` and is imported only when
called, so ``dirl serve`` never imports the trainer and CPU installs never import GPU packages.
Bad input of any kind (a config key, a data row, a checkpoint, a full disk: see :func:`one_line`) is
printed as one line, ``dirl: error: ...``, exit code 2; the traceback too only with ``dirl --debug``
or ``DIRL_DEBUG=1``. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
import traceback
from typing import Optional

from dirl import __version__
from dirl.config import ConfigError

# name -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("dirl.quickstart", "the embedded default end to end: tiny model, SFT, eval, RL, eval"),
    "make-tiny-model": ("dirl.model.tiny_cli", "write the embedded default model (or another tiny shape) and its tokenizer, SDAR layout"),
    "sft": ("dirl.train.sft", "supervised fine-tuning (random-masking blockwise NELBO): dirl sft CONFIG [k=v ...]"),
    "rl": ("dirl.train.rl.recipe", "reinforcement learning (DiPO/GRPO, DAPO): dirl rl CONFIG [k=v ...]"),
    "eval": ("dirl.eval.run", "evaluate on math benchmarks: dirl eval CONFIG [k=v ...]"),
    "serve": ("dirl.rollout.server", "start a rollout server (reference engine or LMDeploy)"),
    "rollout": ("dirl.rollout.cli", "decode prompts from a JSONL file into trajectories"),
    "score": ("dirl.train.score", "trainer log-probs of recorded trajectories (packed or rounds layout)"),
}


DEBUG_ENV = "DIRL_DEBUG"


def _input_error_classes() -> tuple[type, ...]:
    """dirl's own error classes for bad input (each message already names the file:line, key or path)."""
    from dirl.config import ConfigError
    from dirl.data.formats import DataError

    classes: list[type] = [ConfigError, DataError]
    for mod, name in (("dirl.train.layouts", "TrajectoryError"), ("dirl.rollout.weights", "PayloadError"),
                      ("dirl.rollout.client", "RolloutError"), ("dirl.quickstart", "StageError"),
                      ("dirl.rollout.lmdeploy_patch", "PatchError"), ("dirl.rewards.shaping", "RewardError")):
        m = sys.modules.get(mod)  # only what the command imported can have been raised
        if m is not None and hasattr(m, name):
            classes.append(getattr(m, name))
    return tuple(classes)


def one_line(e: BaseException) -> Optional[str]:
    """The one-line message of an error caused by input, or ``None`` for a bug."""
    msg: Optional[str] = None
    if isinstance(e, _input_error_classes()):
        msg = str(e)
    elif isinstance(e, OSError) and e.errno == errno.ENOSPC:
        where = e.filename or getattr(e, "filename2", None)
        msg = "no space left on device" + (f" (writing '{where}')" if where else "")
    elif isinstance(e, OSError) and e.errno is not None and (e.filename or e.strerror):
        msg = f"'{e.filename}': {e.strerror}" if e.filename else str(e.strerror)
    elif type(e).__name__ == "SafetensorError":
        msg = f"not a readable safetensors file ({e})"
    if msg is None:
        return None
    return " ".join(msg.split("\n")).strip() or type(e).__name__


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: dirl COMMAND [ARGS ...]", "", "commands:"]
    lines += [f"  {n:<{width}}  {h}" for n, (_, h) in COMMANDS.items()]
    lines += ["", "Run 'dirl COMMAND --help' for the options of one command; 'dirl --debug COMMAND ...' "
                  f"(or {DEBUG_ENV}=1) shows the traceback of an error."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"dirl {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dirl: error: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and not e.name.startswith("dirl"):  # an optional dependency of the command
            print(f"dirl: error: 'dirl {name}' needs the package '{e.name}', which is not installed", file=sys.stderr)
            return 2
        raise
    try:
        return int(module.cli_main(rest) or 0)
    except KeyboardInterrupt:
        print("dirl: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - input errors become one line, bugs keep their traceback
        msg = one_line(e)
        if msg is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"dirl: error: {msg}", file=sys.stderr)
        return 2


def exit_process(code: int) -> None:
    """End this process with ``code``. A process that ran a torch process group ends with
    ``os._exit`` once its output is flushed and its atexit handlers have run, without the
    interpreter's finalisation: gloo's worker threads outlive ``destroy_process_group`` and may
    still drop the last reference to a tensor of a finished collective; if the main thread is
    finalising by then, that thread cannot take the GIL, Python ends it with ``pthread_exit``, the
    unwind meets a ``noexcept`` frame and the rank aborts ("terminate called without an active
    exception", exit -6) after its work was done. A group still open is closed first (after a
    success only: a failed rank must not wait in a barrier for ranks that are still working).
    Everything else exits as usual."""
    common = sys.modules.get("dirl.train.common")  # imported by every command that can open a group
    if common is None or not common.process_group_was_used():
        sys.exit(code)
    if code == 0:
        common.close_distributed()  # a no-op once the command closed its group itself
    end_now(code)


def end_now(code: int) -> None:
    """Run what an interpreter's exit runs first (atexit handlers: rollout servers, pools;
    logging), flush the output and end the process with ``os._exit(code)``, skipping finalisation."""
    import atexit
    import logging

    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def run(argv: Optional[list[str]] = None) -> None:
    """The process entry point (the ``dirl`` script and ``python -m dirl.cli``; ``argv`` defaults to
    the command line): :func:`main`, then :func:`exit_process`. A bug's traceback is printed before it."""
    try:
        code = main() if argv is None else main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:  # Ctrl-C before the command runs (importing it takes seconds)
        print("dirl: interrupted", file=sys.stderr)
        code = 130
    except BaseException:  # noqa: BLE001 - printed here, as the interpreter would
        traceback.print_exc()
        code = 1
    exit_process(code)


if __name__ == "__main__":  # pragma: no cover
    run()
