"""The ``dirl`` command: one entry point, one subcommand per job.

Each subcommand lives in its own module as ``cli_main(argv) -> int`` and is imported only when
called, so ``dirl serve`` never imports the trainer and CPU installs never import GPU packages.
Configuration problems (:class:`dirl.config.ConfigError`) are printed as one line, exit code 2.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional

from dirl import __version__
from dirl.config import ConfigError

# name -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("dirl.quickstart", "the embedded default end to end: tiny model, SFT, eval, RL, eval"),
    "make-tiny-model": ("dirl.model.tiny_cli", "write the embedded default model and tokenizer (SDAR layout)"),
    "sft": ("dirl.train.sft", "supervised fine-tuning (random-masking blockwise NELBO): dirl sft CONFIG [k=v ...]"),
    "rl": ("dirl.train.rl.recipe", "reinforcement learning (DiPO/GRPO, DAPO): dirl rl CONFIG [k=v ...]"),
    "eval": ("dirl.eval.run", "evaluate on math benchmarks: dirl eval CONFIG [k=v ...]"),
    "serve": ("dirl.rollout.server", "start a rollout server (reference engine or LMDeploy)"),
    "rollout": ("dirl.rollout.cli", "decode prompts from a JSONL file into trajectories"),
    "score": ("dirl.train.score", "trainer log-probs of recorded trajectories (packed or rounds layout)"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: dirl COMMAND [ARGS ...]", "", "commands:"]
    lines += [f"  {n:<{width}}  {h}" for n, (_, h) in COMMANDS.items()]
    lines += ["", "Run 'dirl COMMAND --help' for the options of one command."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
    except ConfigError as e:
        print(f"dirl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dirl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
