"""Evaluation benchmarks: the five math test sets of DiRL plus the synthetic task.

Each benchmark loads from the Hugging Face Hub by default, or from a local file (JSONL, JSON or
parquet) or a folder holding ``<file name>`` (e.g. ``shared/data/benchmarks``). Every problem comes
out as the same dict::

    {"benchmark": "math500", "id": "17", "index": 17, "question": ..., "answer": <gold string>,
     "prompt": <user turn>, "meta": {...}}

``id`` is the problem's position in the full set, so it is stable under ``limit`` / ``subset_seed``
(and resuming an evaluation relies on it). ``answer`` is the gold answer ready for grading: the
number after ``####`` for GSM8K, OlympiadBench's ``final_answer`` list joined with commas and
without ``$``. ``prompt`` is the user turn: the DiRL template for the math sets, the bare question
(``What is 43+75?``, exactly what the SFT data uses) for ``synthetic``; the model's chat template
is applied later (by the rollout server or :func:`dirl.data.chat.render_prompt`).

A source string is a path (file or folder) or a Hub dataset ``owner/name``, optionally with a
config and a split: ``owner/name:config@split``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from dirl.data.formats import END_OF_TEXT, END_OF_TURN, TURN_START, DataError, iter_json_array, iter_jsonl, read_utf8
from dirl.rewards.math import gold_answer

DIRL_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within $\\boxed{{}}$."


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    hub: str  # default Hub dataset
    hub_config: Optional[str]
    split: str
    file: str  # file name inside a local data folder
    question_fields: tuple[str, ...]
    answer_fields: tuple[str, ...]
    template: str = DIRL_TEMPLATE
    meta_fields: tuple[str, ...] = ()
    aliases: tuple[str, ...] = field(default=())


BENCHMARKS: dict[str, BenchmarkSpec] = {
    s.name: s
    for s in [
        BenchmarkSpec(
            "math500", "HuggingFaceH4/MATH-500", None, "test", "math500.jsonl",
            ("problem",), ("answer",), meta_fields=("subject", "level", "unique_id"), aliases=("math", "math-500"),
        ),
        BenchmarkSpec(
            "gsm8k", "openai/gsm8k", "main", "test", "gsm8k.jsonl", ("question",), ("answer",),
        ),
        BenchmarkSpec(
            "aime2024", "HuggingFaceH4/aime_2024", None, "train", "aime24.jsonl", ("problem",), ("answer",),
            meta_fields=("id", "url"), aliases=("aime24",),
        ),
        BenchmarkSpec(
            "aime2025", "math-ai/aime25", None, "test", "aime25.jsonl", ("problem",), ("answer",),
            meta_fields=("id",), aliases=("aime25",),
        ),
        BenchmarkSpec(
            "olympiadbench", "Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train", "olympiadbench.jsonl",
            ("question",), ("final_answer",), meta_fields=("id", "answer_type", "is_multiple_answer", "unit"),
            aliases=("olympiad", "olympiad_bench"),
        ),
        BenchmarkSpec(
            "synthetic", "", None, "test", "", ("prompt", "question"), ("answer",), template="{question}",
            aliases=("add", "arithmetic"),
        ),
    ]
}
MATH_BENCHMARKS = ("math500", "gsm8k", "aime2024", "aime2025", "olympiadbench")

# Fallback field names for files of other schemas.
_QUESTION_FALLBACK = ("problem", "question", "prompt", "input", "query")
_ANSWER_FALLBACK = ("answer", "final_answer", "ground_truth", "gold", "target", "solution")
# fields that hold a worked solution: the gold answer is its \boxed{} (or GSM8K's ####) result
WORKED_FIELDS = ("solution",)
ROW_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
ROW_LIST_KEYS = ("data", "rows", "train", "test", "problems")  # the list of rows in a JSON object file


def looks_like_file(source: str) -> bool:
    """Whether a data source string names a local file (a row-file suffix, or a path that starts
    with ``/``, ``.`` or ``~``) rather than a Hub dataset ``owner/name``."""
    return Path(source).suffix.lower() in ROW_FILE_SUFFIXES or source.startswith(("/", ".", "~"))


def canonical_name(name: str) -> str:
    key = name.strip().lower()
    for spec in BENCHMARKS.values():
        if key == spec.name or key in spec.aliases:
            return spec.name
    raise ValueError(f"unknown benchmark '{name}' (known: {', '.join(BENCHMARKS)})")


def format_prompt(question: str, template: str = DIRL_TEMPLATE) -> str:
    """The user turn for ``question`` (DiRL's template by default)."""
    return template.format(question=question)


# --------------------------------------------------------------------------------------------
# Reading rows
# --------------------------------------------------------------------------------------------


def read_located_rows(path: str | Path) -> list[tuple[str, dict]]:
    """``(where, row)`` for the rows of a local JSONL, JSON (a list, or an object holding one: under
    ``data``, ``rows``, ``train``, ``test`` or ``problems``, else its only list of objects) or parquet
    file; ``where`` is ``file:line`` (JSON Lines, a JSON array), ``file:key[i]`` or ``file row i``
    (parquet, from 0). A row that is not a JSON object, or a line that is not JSON, is a
    :class:`DataError` naming its line. JSON Lines split at ``\\n`` only: a U+2028 inside a string is
    text, not a line break."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in ROW_FILE_SUFFIXES:
        raise DataError(f"{p}: unsupported file type {suffix or '(no suffix)'!r} (expected {', '.join(ROW_FILE_SUFFIXES)}; "
                        "scripts/convert_data.py converts CSV and other shapes)")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p)
        except Exception as e:  # noqa: BLE001 - pyarrow's errors (ArrowInvalid, OSError ...) as one line
            raise DataError(f"{p}: not a readable parquet file ({type(e).__name__}: {e})") from None
        located: list[tuple[str, Any]] = [(f"{p} row {i}", r) for i, r in enumerate(table.to_pylist())]
    elif suffix == ".json":
        text = read_utf8(p)
        if text.lstrip().startswith("{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None
            lists = [k for k, v in data.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
            named = [k for k in ROW_LIST_KEYS if k in lists]
            if not lists:
                raise DataError(f"{p}:1: a JSON object without a list of rows")
            if not named and len(lists) > 1:  # which one holds the problems is a guess: not made
                raise DataError(f"{p}:1: several lists of objects ({', '.join(map(repr, lists[:5]))}) and none named "
                                f"{', '.join(ROW_LIST_KEYS)}: put the rows under 'data'")
            key = named[0] if named else lists[0]
            located = [(f"{p}:{key}[{j}]", r) for j, r in enumerate(data[key])]
        else:
            located = list(iter_json_array(p))
    else:
        located = list(iter_jsonl(p))
    for where, row in located:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return located


def read_rows(path: str | Path) -> list[dict]:
    """The rows of :func:`read_located_rows` without their locations."""
    return [r for _, r in read_located_rows(path)]


def problem_question(raw: Any, where: str) -> str:
    """A problem row's question text; anything but a non-empty string is a :class:`DataError`, and so
    is chat-templated text (the question goes into a user turn, which gets the model's template)."""
    if not isinstance(raw, str) or not raw.strip():
        raise DataError(f"{where}: the question must be a non-empty string, got {raw!r:.80}")
    tok = next((t for t in (TURN_START, END_OF_TURN, END_OF_TEXT) if t in raw), None)
    if tok is not None:
        raise DataError(f"{where}: the question holds the chat-template token {tok}: it would be templated twice "
                        "(give the plain question; the user turn and the template are added here)")
    return raw


def problem_gold(raw: Any, where: str, field: str = "", hint: str = "") -> str:
    """The gold answer string of a problem row's answer field ``field``; an empty or unusable value
    is a :class:`DataError` naming the row, and so is a worked solution (a ``solution`` of several
    lines) with no ``\\boxed{}`` or ``####`` result: the whole text would be the gold and nothing would
    match it. A one-line ``solution`` is a final answer (TRL's convention: ``\\frac{1}{3}``).
    ``hint``: what the message suggests (the config key that names the answer field)."""
    if field in WORKED_FIELDS and isinstance(raw, str) and "\n" in raw.strip() and "\\boxed" not in raw \
            and "####" not in raw:
        raise DataError(f"{where}: the answer is taken from '{field}', a worked solution with no \\boxed{{}} or "
                        f"#### result to grade against{' (' + hint + ')' if hint else ''}")
    try:
        gold = gold_answer(raw)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: unusable answer {raw!r} ({e})") from None
    if not gold:
        raise DataError(f"{where}: empty gold answer")
    return gold


def _parse_hub(source: str, spec: BenchmarkSpec) -> tuple[str, Optional[str], str]:
    split, config = spec.split, None
    if "@" in source:
        source, split = source.rsplit("@", 1)
    if ":" in source:
        source, config = source.split(":", 1)
    if config is None and source == spec.hub:
        config = spec.hub_config
    return source, config, split


def _load_hub(source: str, spec: BenchmarkSpec) -> list[tuple[str, dict]]:
    name, config, split = _parse_hub(source, spec)
    try:
        import datasets
    except ImportError as e:  # pragma: no cover
        raise RuntimeError("loading benchmarks from the Hub needs the 'datasets' package") from e
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - offline, gated, renamed ...
        raise RuntimeError(
            f"could not load benchmark '{spec.name}' from the Hub ({name}"
            f"{':' + config if config else ''}@{split}): {type(e).__name__}: {e}. "
            f"Point eval's data.data_dir at a folder with {spec.file or 'the file'} or set data.sources.{spec.name}"
        ) from None
    return [(f"{name}[{split}] row {i}", dict(r)) for i, r in enumerate(ds)]


def resolve_source(name: str, source: Optional[str] = None, data_dir: Optional[str] = None) -> str:
    """Where benchmark ``name`` is read from: ``source`` if given (a file, a folder or a Hub name),
    else ``data_dir/<file>`` when it exists, else the default Hub dataset."""
    spec = BENCHMARKS[canonical_name(name)]
    if source:
        p = Path(source).expanduser()
        if p.is_dir():
            if not spec.file or not (p / spec.file).is_file():
                raise FileNotFoundError(f"benchmark '{spec.name}': {p} has no {spec.file or 'data file'}")
            return str(p / spec.file)
        if p.exists():
            return str(p)
        if looks_like_file(source):
            raise FileNotFoundError(f"benchmark '{spec.name}': file '{source}' does not exist")
        return source
    if data_dir and spec.file:
        p = Path(data_dir).expanduser() / spec.file
        if p.is_file():
            return str(p)
    return spec.hub


def _pick(row: dict, names: Iterable[str], fallback: Iterable[str], what: str, where: str) -> tuple[str, Any]:
    for n in list(names) + [f for f in fallback if f not in names]:
        if n in row and row[n] is not None:
            return n, row[n]
    raise DataError(f"{where}: no {what} field (looked for {', '.join(names)}; row keys: {', '.join(map(str, row))})")


def _subset(items: list, limit: Optional[int], seed: Optional[int]) -> list:
    if limit is None or limit >= len(items):
        if seed is None:
            return items
        limit = len(items)
    if seed is None:
        return items[:limit]
    return random.Random(seed).sample(items, limit)


def load_benchmark(
    name: str,
    source: Optional[str] = None,
    data_dir: Optional[str] = None,
    limit: Optional[int] = None,
    subset_seed: Optional[int] = None,
    synthetic_size: int = 200,
    synthetic_seed: int = 0,
) -> list[dict]:
    """The problems of one benchmark (see the module docstring for the row format).

    ``limit``: keep N problems (the first N, or a seeded random N with ``subset_seed``). For
    ``synthetic`` the held-out test split of :mod:`dirl.data.synthetic` is drawn
    (``synthetic_size`` problems, ``synthetic_seed`` order) unless ``source`` names a file.
    """
    spec = BENCHMARKS[canonical_name(name)]
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if spec.name == "synthetic" and not source:
        from dirl.data.synthetic import synthetic_problems

        rows = synthetic_problems("test", n=synthetic_size, seed=synthetic_seed)
        located = [(f"synthetic test split row {i}", r) for i, r in enumerate(rows)]
    else:
        where = resolve_source(spec.name, source, data_dir)
        p = Path(where)
        located = read_located_rows(p) if p.is_file() else _load_hub(where, spec)
    problems = []
    for i, (loc, row) in enumerate(located):
        question = problem_question(_pick(row, spec.question_fields, _QUESTION_FALLBACK, "question", loc)[1], loc)
        answer_field, raw_answer = _pick(row, spec.answer_fields, _ANSWER_FALLBACK, "answer", loc)
        gold = problem_gold(raw_answer, loc, field=answer_field)
        meta = {k: row[k] for k in spec.meta_fields if k in row}
        if "id" in row and "id" not in meta:
            meta["id"] = row["id"]
        problems.append(
            {
                "benchmark": spec.name,
                "id": str(i),
                "index": i,
                "question": question,
                "answer": gold,
                "prompt": format_prompt(question, spec.template),
                "meta": _jsonable(meta),
            }
        )
    return _subset(problems, limit, subset_seed)


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            out[k] = str(v)
    return out
