"""The prompts of an RL run: problems from a data source, in a seeded order that a resumed run
continues exactly (:class:`PromptSampler`), tokenised and length-checked as they are drawn
(:class:`PromptSource`)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional

from dirl.config import ConfigError
from dirl.data.benchmarks import problem_gold, problem_question, read_located_rows
from dirl.data.chat import prompt_ids
from dirl.data.formats import DataError, iter_hf_dataset
from dirl.data.synthetic import synthetic_problems
from dirl.train.rl.config import RLDataConfig

_QUESTION_KEYS = ("question", "problem", "prompt")
_ANSWER_KEYS = ("ground_truth_answer", "answer", "final_answer", "gt_answer", "solution")


def _pick(row: dict, key: str, fallbacks: tuple[str, ...], what: str, where: str):
    keys = (key,) if key else fallbacks
    for k in keys:
        if k in row and row[k] is not None:
            return k, row[k]
    raise DataError(f"{where}: no {what} field (looked for {', '.join(keys)}; "
                    f"set data.{what}_key); the row has {', '.join(sorted(map(str, row)))}")


def load_problems(data: RLDataConfig) -> list[dict]:
    """Problems as ``{"id", "index", "question", "answer", "messages"}`` (answer: the gold string)."""
    if data.source == "synthetic":
        rows = synthetic_problems(data.split, n=data.limit, seed=0, digits=data.digits)  # type: ignore[arg-type]
        located = [(f"synthetic[{data.split}] row {i}", r) for i, r in enumerate(rows)]
    else:
        p = Path(data.source)
        located = read_located_rows(p) if p.is_file() else list(iter_hf_dataset(data.source, data.split,
                                                                                   data.subset or None))
        if data.limit is not None:
            located = located[:data.limit]
    out = []
    for i, (loc, row) in enumerate(located):
        if not isinstance(row, dict):
            raise DataError(f"{loc}: expected an object with a question and an answer, got {type(row).__name__}")
        q = problem_question(_pick(row, data.question_key, _QUESTION_KEYS, "question", loc)[1], loc)
        answer_field, raw_answer = _pick(row, data.answer_key, _ANSWER_KEYS, "answer", loc)
        gold = problem_gold(raw_answer, loc, field=answer_field, hint="set data.answer_key to a field with the final answer")
        msgs = [{"role": "system", "content": data.system_prompt}] if data.system_prompt else []
        msgs.append({"role": "user", "content": data.prompt_template.replace("{question}", q)})
        rid = row.get("id")
        out.append({"id": str(i if rid is None else rid), "index": i, "question": q, "answer": gold, "messages": msgs})
    if not out:
        raise ConfigError(f"config key 'data.source': '{data.source}' has no rows")
    return out


class PromptSampler:
    """A seeded order over ``n`` problems, a fresh permutation every epoch; the state is one cursor
    (how many prompts were drawn), so a resumed run draws exactly the prompts it would have drawn."""

    def __init__(self, n: int, seed: int = 0, cursor: int = 0):
        if n <= 0:
            raise ValueError("PromptSampler needs at least one problem")
        self.n, self.seed, self.cursor = int(n), int(seed), int(cursor)
        self._epoch, self._order = -1, []

    def _order_of(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            order = list(range(self.n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._epoch, self._order = epoch, order
        return self._order

    def peek(self, k: int, start: Optional[int] = None) -> list[int]:
        c = self.cursor if start is None else start
        return [self._order_of((c + i) // self.n)[(c + i) % self.n] for i in range(k)]

    def draw(self, k: int) -> list[int]:
        idx = self.peek(k)
        self.cursor += k
        return idx

    @property
    def epoch(self) -> int:
        return self.cursor // self.n

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "n": self.n, "seed": self.seed}

    def load_state_dict(self, st: dict) -> None:
        if int(st.get("n", self.n)) != self.n:
            raise ConfigError(f"the checkpoint's data cursor is over {st.get('n')} problems but the data has {self.n} "
                              "(data settings changed since the checkpoint)")
        self.cursor = int(st["cursor"])


class PromptSource:
    """Draws ``(problem, prompt_ids)`` pairs in the sampler's order; a prompt longer than
    ``max_prompt_tokens`` (> 0) is skipped and counted in :attr:`skipped` (its draw still advances
    the cursor)."""

    def __init__(self, problems: list[dict], tokenizer: Any, seed: int = 0, max_prompt_tokens: int = 0):
        self.problems, self.tokenizer, self.max_prompt_tokens = problems, tokenizer, int(max_prompt_tokens)
        self.sampler = PromptSampler(len(problems), seed=seed)
        self.skipped = 0

    def draw(self, n: int) -> list[tuple[dict, list[int]]]:
        out = []
        for i in self.sampler.draw(n):
            p = self.problems[i]
            ids = prompt_ids(self.tokenizer, p["messages"])
            if self.max_prompt_tokens and len(ids) > self.max_prompt_tokens:
                self.skipped += 1
                continue
            out.append((p, ids))
        return out
