#!/usr/bin/env python3
"""Write docs/CONFIG_KEYS.md: every config key of every command, with its type, its default and
what it means, read from the config dataclasses themselves (their field comments and section
docstrings), so the reference cannot drift from the code.

    python scripts/config_reference.py           # rewrite docs/CONFIG_KEYS.md
    python scripts/config_reference.py --check   # exit 1 when the file is not what the code says
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import sys
import textwrap
import tokenize
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "docs" / "CONFIG_KEYS.md"


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment: the comment lines right above the field plus the comment at the
    end of its line."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = src.splitlines()
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    for i, line in enumerate(lines, start=1):
        head = line[4:] if line.startswith("    ") and not line.startswith("     ") else ""
        name = head.split(":", 1)[0].strip() if ":" in head else ""
        if name not in names or name in out:
            continue
        above = []
        j = i - 1
        while j >= 1 and lines[j - 1].strip().startswith("#"):
            above.insert(0, comments.get(j, ""))
            j -= 1
        inline = comments.get(i, "") if not line.strip().startswith("#") else ""
        out[name] = " ".join(x for x in [*above, inline] if x)
    return out


def type_name(tp: typing.Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) if isinstance(a, str) else str(a) for a in args)
    if origin is typing.Union:
        rest = [a for a in args if a is not type(None)]
        inner = " \\| ".join(type_name(a) for a in rest)
        return f"{inner} or null" if len(rest) < len(args) else inner
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join('...' if a is Ellipsis else type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def value_text(v: typing.Any) -> str:
    if dataclasses.is_dataclass(v):
        v = dataclasses.asdict(v)
    if isinstance(v, tuple):
        v = list(v)
    text = json.dumps(v) if not isinstance(v, str) else (json.dumps(v) if v == "" else v)
    return f"`{text}`"


def first_paragraph(cls: type) -> str:
    """The first paragraph of a section class's own docstring (not the signature a dataclass makes
    up when it has none), reST literals as Markdown ones."""
    doc = cls.__dict__.get("__doc__")
    if not doc or doc.startswith(cls.__name__ + "("):
        return ""
    para = inspect.cleandoc(doc).split("\n\n", 1)[0]
    return " ".join(para.split()).replace("``", "`")


def rows(obj: typing.Any, prefix: str = "") -> list[tuple[str, str, str, str, str]]:
    """(section, key, type, default, meaning) of every leaf field of a config instance."""
    cls = type(obj)
    hints = typing.get_type_hints(cls)
    notes = field_comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        v = getattr(obj, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(v):
            out += rows(v, key + ".")
        else:
            out.append((prefix.rstrip("."), key, type_name(hints[f.name]), value_text(v),
                        notes.get(f.name, "").replace("|", "\\|") or "(undocumented)"))
    return out


def sections(obj: typing.Any, prefix: str = "") -> dict[str, str]:
    """Section key -> the first paragraph of its class's docstring."""
    out = {prefix.rstrip("."): first_paragraph(type(obj))}
    for f in dataclasses.fields(type(obj)):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out.update(sections(v, prefix + f.name + "."))
    return out


def commands() -> list[tuple[str, str, typing.Any]]:
    from dirl.config import embedded_tiny_shape
    from dirl.eval.run import EvalConfig
    from dirl.train.rl.config import RLConfig
    from dirl.train.sft import SFTConfig

    return [
        ("dirl sft", "configs/sft_default.yaml", SFTConfig()),
        ("dirl rl", "", RLConfig()),
        ("dirl eval", "configs/eval_default.yaml (the quick-start's; `dirl eval` with no config differs "
                      "where that file says)", EvalConfig()),
        ("dirl make-tiny-model", "", embedded_tiny_shape()),
    ]


def render() -> str:
    parts = [
        "# Config keys",
        "",
        "Every key of every command, its type, its default (the embedded default: what the command does with "
        "no config file) and its meaning. Generated from the config dataclasses by "
        "`python scripts/config_reference.py`; `tests/test_config.py` fails when this file and the code "
        "disagree. A YAML file sets any of these keys (`train:\\n  max_steps: 100`), and so does "
        "`key=value` on the command line (`train.max_steps=100`); docs/CONFIG.md maps the names onto "
        "TRL's, verl's and DiRL's.",
        "",
    ]
    for name, written, cfg in commands():
        parts += [f"## `{name}`", ""]
        if written:
            path, _, note = written.partition(" ")
            parts += [f"Written out: `{path}`{' ' + note if note else ''}.", ""]
        heads = sections(cfg)
        grouped: dict[str, list[str]] = {}  # section -> its rows, sections in order of first appearance
        for section, key, tp, default, meaning in rows(cfg):
            grouped.setdefault(section, []).append(f"| `{key}` | {tp} | {default} | {meaning} |")
        for section, lines in grouped.items():
            parts += [f"### {f'`{section}`' if section else 'top level'}", ""]
            if heads.get(section):
                parts += [heads[section], ""]
            parts += ["| key | type | default | meaning |", "|---|---|---|---|", *lines, ""]
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 when the file differs from what the code says")
    a = p.parse_args(argv)
    text = render()
    if a.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is out of date: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"written: {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
