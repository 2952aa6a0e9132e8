#!/usr/bin/env python3
"""Convert a data set into the JSON Lines that dirl reads: SFT chat rows or RL / eval problems.

    python scripts/convert_data.py train.jsonl --to sft --out data/my_sft.jsonl
    python scripts/convert_data.py sharegpt.json --to sft --out data/chat_sft.jsonl --system-prompt "Be brief."
    python scripts/convert_data.py problems.csv --to rl --out data/my_rl.jsonl --question-field Problem
    python scripts/convert_data.py data/Light-MATH-RL --to rl --out data/rl.jsonl --limit 1000
    python scripts/convert_data.py openai/gsm8k --subset main --to rl --out data/gsm8k_rl.jsonl

--to sft writes {"messages": [..., {"role": "assistant", "content": <response>}]} a line (what
`dirl sft` reads as data.source); --to rl writes {"question": ..., "answer": <final answer>} a line
(what `dirl rl` reads as data.source, and `dirl eval` as data.sources.<benchmark>). An "id" field
is kept. DiRL's own rows are recognised: its SFT rows (a chat-templated "prompt" and a "response"
ending with <|im_end|><|endoftext|>) are written verbatim as {"prompt", "response"}, never templated
again; its RL rows ({"question", "ground_truth_answer"}) become {"question", "answer"}.

The input is a .jsonl, .json (an array, or an object with a "data"/"rows" array), .csv / .tsv or
.parquet file, a `datasets` folder (save_to_disk or a downloaded Hub snapshot) or a Hub dataset
name. Fields are found by name unless given:

    question   question, problem, prompt, instruction (+ input), input
    response   response, solution, output, completion, else an answer that holds reasoning
    messages   messages, conversations (role/content, or ShareGPT's from/value)
    answer     answer, final_answer, ground_truth_answer, ground_truth, gt_answer, else the last
               \\boxed{...} of the response / solution

A row that does not fit stops the conversion with one line naming its file and line (or data set
row) and the field, and exit status 2; --skip-bad skips such rows and counts them. The output is
written to a temporary file next to --out and renamed when complete, so an error leaves no file.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dirl.data.formats import (  # noqa: E402
    END_OF_TURN,
    TURN_START,
    DataError,
    _short,
    is_templated_prompt,
    iter_hf_dataset,
    iter_json_array,
    iter_jsonl,
    parse_sft_row,
    read_utf8,
)
from dirl.rewards.math import extract_answer, gold_answer  # noqa: E402

QUESTION_FIELDS = ("question", "problem", "prompt", "instruction", "input")
RESPONSE_FIELDS = ("response", "solution", "output", "completion")
MESSAGES_FIELDS = ("messages", "conversations")
ANSWER_FIELDS = ("answer", "final_answer", "ground_truth_answer", "ground_truth", "gt_answer")
KEEP_FIELDS = ("id",)

# ShareGPT speaker names (and a few other spellings) -> chat roles
ROLE_NAMES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "chatgpt": "assistant", "bot": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool",
}
MAX_SKIP_LINES = 10  # skipped rows reported one by one; the rest only counted


@dataclass
class Fields:
    """Field names given on the command line (None: found by name)."""

    question: Optional[str] = None
    answer: Optional[str] = None
    response: Optional[str] = None
    messages: Optional[str] = None


# --------------------------------------------------------------------------------------------
# Reading: (where, row) pairs
# --------------------------------------------------------------------------------------------


def iter_rows(source: str, split: str = "train", subset: Optional[str] = None) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` for every row of a file, a `datasets` folder or a Hub dataset."""
    p = Path(source)
    suffix = p.suffix.lower()
    if p.is_file():
        if suffix == ".jsonl":
            return iter_jsonl(p)
        if suffix == ".json":
            return _iter_json(p)
        if suffix in (".csv", ".tsv"):
            return iter_csv(p, delimiter="\t" if suffix == ".tsv" else ",")
        if suffix == ".parquet":
            return iter_parquet(p)
        raise DataError(f"{p}: unsupported file type '{suffix}' (expected .jsonl, .json, .csv, .tsv or .parquet)")
    if suffix in (".jsonl", ".json", ".csv", ".tsv", ".parquet"):
        raise DataError(f"{p}: no such file")
    if importlib.util.find_spec("datasets") is None:
        raise DataError(f"{source}: not a file, and reading a `datasets` folder or Hub name needs the "
                        "datasets package (pip install datasets)")
    return iter_hf_dataset(source, split=split, subset=subset)


def _iter_json(p: Path) -> Iterator[tuple[str, Any]]:
    """A .json file: an array (or {"data": [...]}), or JSON Lines under a .json name."""
    text = read_utf8(p)  # a byte that is not UTF-8: an error naming its line
    if text.lstrip().startswith("{"):
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # one object a line
                return iter_jsonl(p)
    return iter_json_array(p)


def iter_csv(p: Path, delimiter: str = ",") -> Iterator[tuple[str, dict]]:
    """``(file:line, row)`` for every record of a CSV file with a header line (the line a record starts on)."""
    text = read_utf8(p)  # whole, so that a byte that is not UTF-8 is named by its line
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # a long worked solution is one field
    with io.StringIO(text, newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{p}:1: invalid CSV ({e})") from None
        end = reader.line_num
        while True:
            start = end + 1
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise DataError(f"{p}:{start}: invalid CSV ({e})") from None
            end = reader.line_num
            if not values:  # blank line
                continue
            if len(values) != len(header):
                raise DataError(f"{p}:{start}: {len(values)} fields, the header has {len(header)}")
            yield f"{p}:{start}", dict(zip(header, values))


def iter_parquet(p: Path) -> Iterator[tuple[str, dict]]:
    """``(file row i, row)`` for every row of a parquet file, read in batches (pyarrow comes with
    ``datasets``, a dependency of dirl)."""
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(p).iter_batches(batch_size=1024)
    except Exception as e:  # noqa: BLE001 - not parquet, truncated, ... as one line
        raise DataError(f"{p}: cannot read parquet ({type(e).__name__}: {e})") from None
    i = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield f"{p} row {i}", row
            i += 1


# --------------------------------------------------------------------------------------------
# Converting one row
# --------------------------------------------------------------------------------------------


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, str) and not v.strip())


def _keys(row: dict) -> str:
    return ", ".join(sorted(map(str, row))) or "none"


def _find(row: dict, given: Optional[str], names: tuple[str, ...]) -> Optional[str]:
    """The field to use: ``given`` when it is set (it must exist), else the first present of ``names``."""
    if given:
        return given if given in row else None
    return next((n for n in names if n in row and _present(row[n])), None)


def _missing(where: str, what: str, given: Optional[str], option: str, names: tuple[str, ...], row: dict) -> DataError:
    if given:
        return DataError(f"{where}: no '{given}' field ({option}); the row has {_keys(row)}")
    return DataError(f"{where}: no {what} field (looked for {', '.join(names)}; set {option}); "
                     f"the row has {_keys(row)}")


def _text(v: Any, where: str, field: str) -> str:
    """A field's value as text: strings as they are, numbers printed, a list of text parts joined."""
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    if isinstance(v, list) and v and all(isinstance(x, dict) and x.get("type") == "text" for x in v):
        return "".join(str(x.get("text", "")) for x in v)  # OpenAI content parts
    raise DataError(f"{where}: '{field}' must be a string, got {_short(v)}")


def to_messages(v: Any, where: str, field: str) -> list[dict]:
    """Chat messages from role/content or ShareGPT from/value objects (a JSON string is parsed first)."""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            raise DataError(f"{where}: '{field}' is a string that is not a JSON list of messages") from None
    if not isinstance(v, (list, tuple)) or not v:
        raise DataError(f"{where}: '{field}' must be a non-empty list of messages, got {_short(v)}")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise DataError(f"{where}: {field}[{i}] must be an object, got {_short(m)}")
        speaker = m.get("role", m.get("from"))
        role = ROLE_NAMES.get(str(speaker).lower()) if speaker is not None else None
        if role is None:
            raise DataError(f"{where}: {field}[{i}]: unknown speaker {_short(speaker)} "
                            f"(expected role or from: {', '.join(ROLE_NAMES)})")
        content = m["content"] if "content" in m else m.get("value")
        out.append({"role": role, "content": _text(content, where, f"{field}[{i}].content")})
    return out


def _question_text(row: dict, where: str, fields: Fields) -> tuple[str, Any]:
    """(field, value) of the question; instruction + input (Alpaca) are joined."""
    key = _find(row, fields.question, QUESTION_FIELDS)
    if key is None:
        raise _missing(where, "question", fields.question, "--question-field", QUESTION_FIELDS, row)
    value = row[key]
    if not _present(value):
        raise DataError(f"{where}: '{key}' is empty")
    if not fields.question and key == "instruction" and _present(row.get("input")):
        value = f"{_text(value, where, key)}\n\n{_text(row['input'], where, 'input')}"
    return key, value


def _response_key(row: dict, fields: Fields) -> Optional[str]:
    """The field holding the response text; an answer counts when it holds reasoning, not just a result."""
    key = _find(row, fields.response, RESPONSE_FIELDS)
    if key is None and not fields.response and _is_reasoning(row.get("answer")):
        key = "answer"
    return key


def _is_reasoning(v: Any) -> bool:
    """Whether an answer field holds worked text (several lines, or words around a boxed / #### result)."""
    if not isinstance(v, str) or not v.strip():
        return False
    text = v.strip()
    if "\n" in text:
        return True
    return ("\\boxed" in text or "####" in text) and len(text) - len(gold_answer(text)) > 20


def _messages_key(row: dict, fields: Fields) -> Optional[str]:
    if fields.messages:
        return fields.messages
    if fields.question or fields.response:
        return None
    return _find(row, None, MESSAGES_FIELDS)


def convert_sft(row: Any, where: str, fields: Fields, system_prompt: str = "") -> dict:
    """One input row as ``{"messages": [...]}`` (checked by dirl's own SFT parser)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object, got {_short(row)}")
    mkey = _messages_key(row, fields)
    if mkey is not None:
        if mkey not in row:
            raise _missing(where, "messages", mkey, "--messages-field", MESSAGES_FIELDS, row)
        msgs = to_messages(row[mkey], where, mkey)
    else:
        qkey, q = _question_text(row, where, fields)
        rkey = _response_key(row, fields)
        if isinstance(q, str) and is_templated_prompt(q) and rkey is not None:
            # DiRL's own SFT rows: chat-templated prompt text and a response that already ends with
            # <|im_end|><|endoftext|>; kept verbatim as a {prompt, response} pair (never templated again)
            if system_prompt:
                raise DataError(f"{where}: '{qkey}' is already chat-templated text; --system-prompt cannot "
                                "add a turn to it (put the system turn in the data)")
            out = {"prompt": q, "response": _text(row[rkey], where, rkey)}
            out.update(_kept(row))
            parse_sft_row(out, where)  # a templated prompt with an open response is an error here
            return out
        if rkey is None:
            if fields.response or not any(k in row for k in ANSWER_FIELDS):
                raise _missing(where, "response", fields.response, "--response-field", RESPONSE_FIELDS, row)
            raise DataError(f"{where}: no response field (looked for {', '.join(RESPONSE_FIELDS)}): a question "
                            f"and a final answer give no response text to train on (use --to rl for such "
                            f"data, or set --response-field); the row has {_keys(row)}")
        if isinstance(q, list):  # a prompt given as messages
            prompt = to_messages(q, where, qkey)
        else:
            prompt = [{"role": "user", "content": _text(q, where, qkey)}]
        msgs = prompt + [{"role": "assistant", "content": _text(row[rkey], where, rkey)}]
        if not msgs[-1]["content"].strip():
            raise DataError(f"{where}: '{rkey}' is empty")
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    out: dict = {"messages": msgs}
    out.update(_kept(row))
    parse_sft_row(out, where)
    return out


def _user_turn_of_templated(text: str, where: str, key: str) -> str:
    """The content of the last user turn of chat-templated text (RL rows hold the plain question:
    the trainer templates it)."""
    head = TURN_START + "user\n"
    start = text.rfind(head)
    end = text.find(END_OF_TURN, start + len(head)) if start >= 0 else -1
    if end < 0:
        raise DataError(f"{where}: '{key}' is chat-templated text without a complete user turn to take the "
                        "question from")
    return text[start + len(head):end]


def convert_rl(row: Any, where: str, fields: Fields) -> dict:
    """One input row as ``{"question": ..., "answer": <final answer>}``."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object, got {_short(row)}")
    mkey = _messages_key(row, fields)
    solution, skey = None, None
    if mkey is not None and (fields.messages or _find(row, None, QUESTION_FIELDS) is None):
        if mkey not in row:
            raise _missing(where, "messages", mkey, "--messages-field", MESSAGES_FIELDS, row)
        msgs = to_messages(row[mkey], where, mkey)
        users = [m["content"] for m in msgs if m["role"] == "user"]
        if not users:
            raise DataError(f"{where}: '{mkey}' has no user turn to take the question from")
        last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        question = users[-1]
        replies = [m["content"] for m in msgs[last_user + 1:] if m["role"] == "assistant"]
        if replies:
            solution, skey = replies[-1], f"{mkey} (assistant turn)"
    else:
        qkey, q = _question_text(row, where, fields)
        if isinstance(q, list):  # a prompt given as messages: its last user turn
            users = [m["content"] for m in to_messages(q, where, qkey) if m["role"] == "user"]
            if not users:
                raise DataError(f"{where}: '{qkey}' has no user turn")
            q = users[-1]
        question = _text(q, where, qkey)
        if is_templated_prompt(question):  # DiRL's templated SFT prompt: its last user turn, untemplated
            question = _user_turn_of_templated(question, where, qkey)
    if not question.strip():
        raise DataError(f"{where}: the question is empty")

    akey = _find(row, fields.answer, ANSWER_FIELDS)
    if akey is not None:
        answer = _gold(row[akey], where, akey)
    elif fields.answer:
        raise _missing(where, "answer", fields.answer, "--answer-field", ANSWER_FIELDS, row)
    else:
        rkey = _find(row, fields.response, RESPONSE_FIELDS)
        if rkey is None and fields.response:
            raise _missing(where, "response", fields.response, "--response-field", RESPONSE_FIELDS, row)
        if rkey is not None:
            solution, skey = _text(row[rkey], where, rkey), rkey
        if solution is None:
            raise DataError(f"{where}: no answer field (looked for {', '.join(ANSWER_FIELDS)}, or a "
                            f"\\boxed{{}} answer in {', '.join(RESPONSE_FIELDS)}; set --answer-field); "
                            f"the row has {_keys(row)}")
        boxed = extract_answer(solution)
        if boxed is None:
            raise DataError(f"{where}: no answer field and no \\boxed{{...}} answer in '{skey}'")
        answer = _gold(boxed, where, skey)
    out = {"question": question, "answer": answer}
    out.update(_kept(row))
    return out


def _gold(v: Any, where: str, field: str) -> str:
    """The final answer string (GSM8K's ``#### 42`` and a ``\\boxed{}`` are reduced; lists joined)."""
    if not _present(v):
        raise DataError(f"{where}: '{field}' is empty")
    try:
        s = gold_answer(v)
    except (TypeError, ValueError):
        raise DataError(f"{where}: '{field}' must be a string, a number or a list, got {_short(v)}") from None
    if not s:
        raise DataError(f"{where}: '{field}' gives an empty answer")
    return s


def _kept(row: dict) -> dict:
    out = {}
    for k in KEEP_FIELDS:
        if k in row and row[k] is not None:
            v = row[k]
            try:
                json.dumps(v)
            except TypeError:
                v = str(v)
            out[k] = v
    return out


# --------------------------------------------------------------------------------------------
# The conversion
# --------------------------------------------------------------------------------------------


@dataclass
class Counts:
    read: int = 0
    written: int = 0
    skipped: int = 0


def convert(
    source: str,
    out: str | os.PathLike,
    to: str,
    fields: Fields | None = None,
    system_prompt: str = "",
    split: str = "train",
    subset: Optional[str] = None,
    limit: Optional[int] = None,
    skip_bad: bool = False,
    log=None,
) -> Counts:
    """Convert ``source`` into ``out`` (written atomically); :class:`DataError` on a bad row unless
    ``skip_bad``, in which case bad rows are counted (and the first few reported through ``log``)."""
    fields = fields or Fields()
    out = Path(out)
    counts = Counts()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for where, row in iter_rows(source, split=split, subset=subset):
                counts.read += 1
                try:
                    if to == "sft":
                        rec = convert_sft(row, where, fields, system_prompt)
                    else:
                        rec = convert_rl(row, where, fields)
                except DataError as e:
                    if not skip_bad:
                        raise
                    counts.skipped += 1
                    if log is not None and counts.skipped <= MAX_SKIP_LINES:
                        log(f"skipped {e}")
                    continue
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                counts.written += 1
                if limit is not None and counts.written >= limit:
                    break
            if counts.written == 0:
                raise DataError(f"{source}: no rows to write ({counts.read} read, {counts.skipped} skipped)")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="convert_data.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("source", help="a .jsonl/.json/.csv/.tsv/.parquet file, a `datasets` folder or a Hub dataset name")
    p.add_argument("--to", required=True, choices=["sft", "rl"],
                   help="sft: chat rows with a response to train on; rl: question/answer problems (RL and eval)")
    p.add_argument("--out", required=True, help="the output .jsonl file (replaced only when the conversion succeeds)")
    p.add_argument("--question-field",
                   help=f"field holding the question (default: first of {', '.join(QUESTION_FIELDS)})")
    p.add_argument("--answer-field", help=f"--to rl: field holding the final answer (default: first of "
                                          f"{', '.join(ANSWER_FIELDS)}, else the last \\boxed{{}} of the solution)")
    p.add_argument("--response-field", help=f"field holding the response / solution text (default: first of "
                                            f"{', '.join(RESPONSE_FIELDS)})")
    p.add_argument("--messages-field", help=f"field holding a chat (default: first of {', '.join(MESSAGES_FIELDS)})")
    p.add_argument("--system-prompt", default="", help="--to sft: a system turn added to rows that have none")
    p.add_argument("--split", default="train", help="`datasets` split (default: train)")
    p.add_argument("--subset", default=None, help="`datasets` configuration name")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="write at most N rows")
    p.add_argument("--skip-bad", action="store_true", help="skip rows that do not fit (counted) instead of stopping")
    a = p.parse_args(argv)
    if not a.out.endswith(".jsonl"):
        p.error("--out must end with .jsonl (dirl reads JSON Lines by that name)")
    if a.limit is not None and a.limit < 1:
        p.error("--limit must be at least 1")
    if a.to == "rl" and a.system_prompt:
        p.error("--system-prompt is for --to sft; for RL set data.system_prompt in the RL config")
    if a.to == "sft" and a.answer_field:
        p.error("--answer-field is for --to rl; for SFT name the response text with --response-field")
    fields = Fields(question=a.question_field, answer=a.answer_field, response=a.response_field,
                    messages=a.messages_field)
    try:
        counts = convert(a.source, a.out, a.to, fields, system_prompt=a.system_prompt, split=a.split,
                         subset=a.subset, limit=a.limit, skip_bad=a.skip_bad,
                         log=lambda m: print(m, file=sys.stderr))
    except DataError as e:
        print(e, file=sys.stderr)
        return 2
    except UnicodeDecodeError as e:
        print(f"{a.source}: not UTF-8 text ({e.reason} at byte {e.start})", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"convert_data: {e}", file=sys.stderr)
        return 2
    rows = "row" if counts.read == 1 else "rows"
    print(f"read {counts.read} {rows}, wrote {counts.written}, skipped {counts.skipped} -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
