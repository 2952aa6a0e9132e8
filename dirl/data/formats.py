"""Row schemas of supervised (SFT) data, and readers that say where a bad row is.

An SFT row is one of two shapes:

* chat: ``{"messages": [{"role": "user", "content": ...}, ..., {"role": "assistant", "content": ...}]}``.
  The last message must be the assistant's; it is the response. Everything before it (system turns,
  earlier user/assistant turns) is the prompt and takes no loss.
* pair: ``{"prompt": ..., "response": ...}``. ``prompt`` is the user turn (a string) or a list of
  messages; ``response`` is the assistant's text.
* templated pair (DiRL's own SFT rows): ``prompt`` is chat-templated text,
  ``"<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n"``, and ``response`` already ends with
  the end-of-turn / end-of-text tokens (``"...<|im_end|><|endoftext|>"``). Both are used verbatim:
  the prompt is never templated again and the response gets no second ``<|im_end|>``.

The style of a row is set by its prompt: a prompt holding ``<|im_start|>`` is templated text, and its
response must then end with ``<|im_end|>`` (optionally ``\n``) or ``<|endoftext|>``; a plain prompt
(a string or messages) takes a plain response, closed by the trainer. A row that mixes the two (a
templated prompt with an open response, a plain prompt with a closed response, chat-template tokens
inside a message) is a :class:`DataError`: tokenising it either way would corrupt the sample.

Rows come from JSON Lines (one object a line), JSON (an array of objects, or an object whose
``"data"``/``"rows"`` key holds that array), a Hugging Face ``datasets`` name (local folder or Hub),
or the built-in synthetic arithmetic generator. Every problem is reported as :class:`DataError`
naming the file and line (or dataset and row index) and the field at fault.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

ROLES = ("system", "user", "assistant", "tool")
TURN_START = "<|im_start|>"
END_OF_TURN = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
CLOSINGS = (END_OF_TURN, END_OF_TURN + "\n", END_OF_TEXT)  # how a closed (templated) response ends


class DataError(ValueError):
    """A malformed data row; the message starts with ``file:line`` (or ``dataset[split] row i``)."""


@dataclass
class SFTExample:
    """One supervised sample: the prompt as chat messages and the assistant's response text."""

    prompt: list[dict]
    response: str
    where: str = ""  # file:line or dataset row, for error messages
    meta: dict = field(default_factory=dict)
    # set for a templated row (DiRL's format): the prompt text used verbatim (``prompt`` is then
    # empty), and ``response`` is used verbatim too (it already ends with <|im_end|> / <|endoftext|>)
    prompt_text: Optional[str] = None

    @property
    def templated(self) -> bool:
        return self.prompt_text is not None


@dataclass
class FieldNames:
    """Which keys of a row hold the messages, the prompt and the response."""

    messages: str = "messages"
    prompt: str = "prompt"
    response: str = "response"


def _check_messages(msgs: Any, where: str, key: str, closed_end_ok: bool = False) -> list[dict]:
    """The messages of a row, checked; ``closed_end_ok``: a last assistant turn ending with
    ``<|endoftext|>`` is left for the caller to refuse with a more precise message."""
    if not isinstance(msgs, (list, tuple)) or not msgs:
        raise DataError(f"{where}: '{key}' must be a non-empty list of {{role, content}} messages, got {_short(msgs)}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"{where}: {key}[{i}] must be an object with 'role' and 'content', got {_short(m)}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: {key}[{i}].role must be one of {', '.join(ROLES)}, got {_short(role)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: {key}[{i}].content must be a string, got {_short(content)}")
        body = content
        if closed_end_ok and i == len(msgs) - 1 and role == "assistant" and content.endswith(END_OF_TEXT):
            body = content[:-len(END_OF_TEXT)]  # a closed response: parse_sft_row says so, more precisely
        tok = next((t for t in (TURN_START, END_OF_TURN, END_OF_TEXT) if t in body), None)
        if tok is not None:
            raise DataError(f"{where}: {key}[{i}].content holds the chat-template token {tok}: it would be "
                            "templated twice (give already templated text as a {prompt, response} pair, "
                            "used verbatim)")
        out.append({"role": role, "content": content})
    return out


def is_templated_prompt(text: str) -> bool:
    """Whether a prompt string is already chat-templated text (it holds ``<|im_start|>``)."""
    return TURN_START in text


def is_closed_response(text: str) -> bool:
    """Whether a response already ends its turn (``<|im_end|>``, ``<|im_end|>\\n`` or ``<|endoftext|>``)."""
    return text.endswith(CLOSINGS)


def _check_templated_prompt(prompt: str, where: str, key: str) -> None:
    last = prompt.rfind(TURN_START)
    tail = prompt[last + len(TURN_START):]
    if not tail.startswith("assistant\n") or END_OF_TURN in tail:
        raise DataError(f"{where}: '{key}' is chat-templated text but does not end with the assistant header "
                        f"{TURN_START}assistant\\n (its last turn is {_short(prompt[last:], 40)})")


def _short(v: Any, n: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def parse_sft_row(row: Any, where: str, names: FieldNames | None = None) -> SFTExample:
    """Validate one row and turn it into an :class:`SFTExample`; :class:`DataError` otherwise."""
    names = names or FieldNames()
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {_short(row)}")
    meta = {k: row[k] for k in ("id", "answer", "question") if k in row}
    if names.messages in row and row[names.messages] is not None:
        msgs = _check_messages(row[names.messages], where, names.messages, closed_end_ok=True)
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last of '{names.messages}' must be the assistant's response, "
                            f"got role {msgs[-1]['role']!r}")
        if len(msgs) < 2:
            raise DataError(f"{where}: '{names.messages}' needs a prompt turn before the assistant's response")
        if not msgs[-1]["content"].strip():
            raise DataError(f"{where}: the assistant's response in '{names.messages}' is empty")
        if not any(m["content"].strip() for m in msgs[:-1]):
            raise DataError(f"{where}: the prompt turns of '{names.messages}' are all empty")
        if is_closed_response(msgs[-1]["content"]):
            raise DataError(f"{where}: the assistant's response in '{names.messages}' already ends its turn "
                            f"({_short(msgs[-1]['content'][-24:])}); chat messages get the template and "
                            f"{END_OF_TURN} here, so give plain text (or the whole row as templated "
                            "{prompt, response} text, used verbatim)")
        return SFTExample(prompt=msgs[:-1], response=msgs[-1]["content"], where=where, meta=meta)
    if names.prompt in row or names.response in row:
        if names.prompt not in row:
            raise DataError(f"{where}: missing field '{names.prompt}'")
        if names.response not in row:
            raise DataError(f"{where}: missing field '{names.response}'")
        prompt, response = row[names.prompt], row[names.response]
        if not isinstance(response, str):
            raise DataError(f"{where}: '{names.response}' must be a string, got {_short(response)}")
        if not response.strip():
            raise DataError(f"{where}: '{names.response}' is empty")
        if isinstance(prompt, str) and not prompt.strip():
            raise DataError(f"{where}: '{names.prompt}' is empty")
        closed = is_closed_response(response)
        if isinstance(prompt, str) and is_templated_prompt(prompt):
            _check_templated_prompt(prompt, where, names.prompt)
            if not closed:
                raise DataError(f"{where}: '{names.prompt}' is chat-templated text (DiRL's format) but "
                                f"'{names.response}' does not end with {END_OF_TURN} or {END_OF_TEXT}; a row "
                                "is either templated text in both fields or plain text in both")
            return SFTExample(prompt=[], response=response, where=where, meta=meta, prompt_text=prompt)
        if isinstance(prompt, str):
            if END_OF_TURN in prompt:
                raise DataError(f"{where}: '{names.prompt}' holds the chat-template token {END_OF_TURN} but no "
                                f"{TURN_START}: it would be templated with a turn ended inside it")
            prompt_msgs = [{"role": "user", "content": prompt}]
        else:
            prompt_msgs = _check_messages(prompt, where, names.prompt)
            if not any(m["content"].strip() for m in prompt_msgs):
                raise DataError(f"{where}: the turns of '{names.prompt}' are all empty")
        if closed:
            end = END_OF_TEXT if response.endswith(END_OF_TEXT) else END_OF_TURN
            raise DataError(f"{where}: '{names.response}' ends with {end} but '{names.prompt}' is plain text, "
                            f"which gets the chat template (and the response its {END_OF_TURN}); a row is "
                            "either templated text in both fields (used verbatim) or plain text in both")
        tok = next((t for t in (TURN_START, END_OF_TURN, END_OF_TEXT) if t in response), None)
        if tok is not None:  # the model would learn to end (or start) a turn in the middle of its answer
            raise DataError(f"{where}: '{names.response}' holds the chat-template token {tok}")
        return SFTExample(prompt=prompt_msgs, response=response, where=where, meta=meta)
    keys = ", ".join(sorted(map(str, row))) or "none"
    raise DataError(f"{where}: expected '{names.messages}' or '{names.prompt}'/'{names.response}' fields, "
                    f"found {keys}")


# --------------------------------------------------------------------------------------------
# Readers: (where, row) pairs
# --------------------------------------------------------------------------------------------


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """``(file:line, object)`` for every non-blank line; invalid JSON is a :class:`DataError`."""
    p = Path(path)
    with p.open("rb") as f:
        for i, raw in enumerate(f, start=1):
            line = decode_line(raw[3:] if i == 1 and raw.startswith(BOM) else raw, f"{p}:{i}")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{i}: invalid JSON ({e.msg} at column {e.colno})") from None
            yield f"{p}:{i}", obj


def iter_json_objects(path: str | os.PathLike) -> Iterator[tuple[str, int, dict]]:
    """``(file:line, line number, object)`` for every non-blank line of a JSON Lines file whose
    lines must be JSON objects; anything else is a :class:`DataError` naming the line."""
    for where, obj in iter_jsonl(path):
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield where, int(where.rsplit(":", 1)[1]), obj


def read_jsonl_log(path: str | os.PathLike) -> list[dict]:
    """The records of a log a run appends to (``metrics.jsonl``, ``samples.jsonl``,
    ``responses.jsonl``), as resume reads them: a torn last line (no newline: the process was killed
    or the disk filled while writing it) is dropped, and so is any line that is not a complete JSON
    object (bytes a crash left in the middle). A missing file has no records."""
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    with p.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # the torn last line
            try:
                rec = json.loads(raw)
            except ValueError:  # invalid JSON or UTF-8
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def truncate_jsonl_log(path: str | os.PathLike, last_step: int) -> None:
    """Keep the records of a log whose ``step`` is at most ``last_step`` (a resumed run redoes the
    steps after its checkpoint), torn or broken lines dropped; rewritten atomically."""
    p = Path(path)
    if not p.exists():
        return
    kept = [r for r in read_jsonl_log(p) if _step_of(r) <= last_step]
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, p)


def _step_of(rec: dict) -> float:
    s = rec.get("step", 0)
    return s if isinstance(s, (int, float)) and not isinstance(s, bool) else float("inf")


def decode_line(raw: bytes, where: str) -> str:
    """UTF-8 text of one line; bytes that are not UTF-8 are a :class:`DataError` naming the line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None


BOM = b"\xef\xbb\xbf"  # some editors start a UTF-8 file with it; skipped


def read_utf8(path: str | os.PathLike) -> str:
    """A whole text file (a leading byte-order mark skipped); bytes that are not UTF-8 are a
    :class:`DataError` naming file and line."""
    p = Path(path)
    data = p.read_bytes()
    if data.startswith(BOM):
        data = data[len(BOM):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{p}:{line}: not UTF-8 (byte 0x{data[e.start]:02x})") from None


def iter_json_array(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """``(file:line, object)`` for each element of a JSON array (the line where the element starts)."""
    p = Path(path)
    text = read_utf8(p)
    dec = json.JSONDecoder()

    def line_of(idx: int) -> int:
        return text.count("\n", 0, idx) + 1

    i = _skip_ws(text, 0)
    if i < len(text) and text[i] == "{":  # {"data": [...]} or {"rows": [...]}
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None
        for key in ("data", "rows", "train"):
            if isinstance(obj.get(key), list):
                # line numbers are not recoverable cheaply here; give the element index
                for j, row in enumerate(obj[key]):
                    yield f"{p}:{key}[{j}]", row
                return
        raise DataError(f"{p}:1: expected a JSON array of rows (or an object with a 'data' array)")
    if i >= len(text) or text[i] != "[":
        raise DataError(f"{p}:{line_of(i)}: expected a JSON array of rows")
    i = _skip_ws(text, i + 1)
    if i < len(text) and text[i] == "]":
        _check_end(p, text, i + 1, line_of)
        return
    while True:
        start = i
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        yield f"{p}:{line_of(start)}", obj
        i = _skip_ws(text, i)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
            continue
        if i < len(text) and text[i] == "]":
            break
        raise DataError(f"{p}:{line_of(i)}: expected ',' or ']' between rows")
    _check_end(p, text, i + 1, line_of)


def _check_end(p: Path, text: str, i: int, line_of) -> None:
    """Only white space may follow the array: a second array (or anything else) would be dropped."""
    j = _skip_ws(text, i)
    if j < len(text):
        raise DataError(f"{p}:{line_of(j)}: more data after the JSON array's closing ']' (one array of rows "
                        "per file; JSON Lines files end in .jsonl)")


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def iter_hf_dataset(name: str, split: str = "train", subset: Optional[str] = None) -> Iterator[tuple[str, Any]]:
    """Rows of a Hugging Face dataset (a local folder saved with ``save_to_disk`` or a Hub name)."""
    import datasets  # imported lazily: heavy

    p = Path(name)
    try:
        if p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, subset, split=split)
    except Exception as e:  # noqa: BLE001 - network, missing split, ... as one line
        raise DataError(f"dataset '{name}' (split '{split}'): cannot load it: {type(e).__name__}: {e}") from None
    for i, row in enumerate(ds):
        yield f"{name}[{split}] row {i}", row


def is_local_file(source: str) -> bool:
    return source.endswith((".json", ".jsonl", ".jsonl.gz")) or Path(source).is_file()


def read_sft_examples(
    source: str,
    split: str = "train",
    names: FieldNames | None = None,
    limit: Optional[int] = None,
    subset: Optional[str] = None,
) -> list[SFTExample]:
    """Read and validate every row of ``source`` (file path or dataset name) into :class:`SFTExample`."""
    p = Path(source)
    if source.endswith((".json", ".jsonl")) and not p.is_file():
        raise DataError(f"data file '{source}' does not exist")
    if p.is_file():
        if p.suffix == ".jsonl":
            rows: Iterator[tuple[str, Any]] = iter_jsonl(p)
        elif p.suffix == ".json":
            rows = iter_json_array(p)
        else:
            raise DataError(f"data file '{source}': unsupported extension (expected .json or .jsonl)")
    else:
        rows = iter_hf_dataset(source, split=split, subset=subset)
    out = []
    for where, row in rows:
        out.append(parse_sft_row(row, where, names))
        if limit is not None and len(out) >= limit:
            break
    return out


def synthetic_sft_examples(split: str = "train", n: Optional[int] = None, seed: int = 0, digits: int = 2,
                           teacher_error: float = 0.0, teacher_swap: float = 0.0, teacher_echo: float = 0.0,
                           teacher_carry: float = 0.0, teacher_echo_at: str = "start") -> list[SFTExample]:
    """The built-in arithmetic task as SFT examples (held-out pairs never appear in ``train``), worked
    by the imperfect teacher (slips, swapped digits, restatements, carries of 0: dirl.data.synthetic)."""
    from dirl.data.synthetic import synthetic_problems

    rows = synthetic_problems(split, n=n, seed=seed, digits=digits,  # type: ignore[arg-type]
                              teacher_error=teacher_error, teacher_swap=teacher_swap, teacher_echo=teacher_echo,
                              teacher_carry=teacher_carry, teacher_echo_at=teacher_echo_at)
    return [parse_sft_row(r, f"synthetic[{split}] row {i}") for i, r in enumerate(rows)]


def examples_from_rows(rows: Sequence[Any], where_prefix: str = "rows", names: FieldNames | None = None) -> list[SFTExample]:
    """Validate in-memory rows (e.g. made by a script)."""
    return [parse_sft_row(r, f"{where_prefix}[{i}]", names) for i, r in enumerate(rows)]
