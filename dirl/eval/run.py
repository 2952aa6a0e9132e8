"""``dirl eval [CONFIG] [key=value ...]``: evaluate a model on math benchmarks (SPEC section 9).

One run, in order:

1. resolve the model (``model.path`` empty: the newest embedded-default checkpoint under ``runs/``,
   else a freshly made tiny model) and the run folder, and check that a folder being resumed was
   made with the same model, decoding settings, sample count and seed;
2. load the benchmarks (Hub, a local folder or files) and list the (problem, sample) pairs that
   ``responses.jsonl`` does not hold yet;
3. start the reference rollout server on a free port (or use ``server.urls``), send the prompts
   (the benchmark's user turn, chat-templated by the server) in batches of problems, k requests
   per problem with distinct seeds, grade every response (last ``\\boxed{}`` vs the gold answer,
   math-verify in bounded worker processes) and append it to ``responses.jsonl`` as it comes;
4. compute the metrics of every benchmark and their average and write ``metrics.json`` and
   ``report.md``.

A re-run with the same settings skips what is done, so an interrupted evaluation resumes.

Run folder (``output_dir``; empty: ``runs/eval/<model>-<settings hash>``)::

    config.yaml      the resolved config
    eval_state.json  what a resumed run must agree with
    responses.jsonl  one line per response: benchmark, problem_id, sample, seed, question, gold,
                     text, answer, correct, finish_reason, response_length, tokens_per_step, ...
    metrics.json     per benchmark and average
    report.md        the same as a Markdown table
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from dirl.config import (
    ConfigError,
    DecodingConfig,
    ModelConfig,
    check_block_sizes,
    check_decoding,
    check_positive,
    check_seed,
    load_config,
    read_checkpoint_config,
    run_config_command,
    save_config,
    to_dict,
)
from dirl.data.benchmarks import canonical_name, load_benchmark, looks_like_file
from dirl.data.formats import DataError, read_jsonl_log
from dirl.eval.metrics import average_metrics, benchmark_metrics
from dirl.eval.report import markdown_table, write_report
from dirl.rewards import Grader, accuracy_verdicts, extract_answer, tokens_per_step
from dirl.rollout.launch import ModelFacts, ServerConfig, check_server_config, open_servers, stop_on_signals
from dirl.rollout.requests import request_seed, sampling_request
from dirl.train.ckpt_files import newest_checkpoint, resolve_model_dir


RESPONSES = "responses.jsonl"
STATE = "eval_state.json"

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class EvalDataConfig:
    # math500, gsm8k, aime2024, aime2025, olympiadbench, synthetic
    benchmarks: list[str] = field(default_factory=lambda: ["synthetic"])
    # A folder with local copies (math500.jsonl, gsm8k.jsonl, aime24.jsonl, aime25.jsonl,
    # olympiadbench.jsonl); empty or missing files: the Hugging Face Hub.
    data_dir: str = ""
    # Per benchmark: a file (.jsonl/.json/.parquet), a folder, or a Hub name "owner/name[:config][@split]".
    sources: dict[str, str] = field(default_factory=dict)
    limit: Optional[int] = None  # problems per benchmark (None: all)
    subset_seed: Optional[int] = None  # None: the first `limit`; an int: a seeded random subset
    synthetic_size: int = 200  # problems of the held-out synthetic split
    synthetic_seed: int = 0  # which held-out synthetic problems


@dataclass
class EvalConfig:
    # model.path empty: the newest embedded-default checkpoint under runs_dir, else a fresh tiny model
    model: ModelConfig = field(default_factory=ModelConfig)
    decoding: DecodingConfig = field(default_factory=lambda: DecodingConfig(max_new_tokens=48))
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    num_samples: int = 1  # k samples per problem
    seed: int = 0  # base of the per-request seeds
    pass_k: list[int] = field(default_factory=list)  # empty: 1, 2, 4, ..., k
    output_dir: str = ""  # empty: runs/eval/<model>-<settings hash>
    runs_dir: str = "runs"  # where an empty model.path looks for the newest embedded-default checkpoint
    resume: bool = True  # skip responses already in output_dir (False: start over)
    regrade: bool = False  # grade stored responses again (after a grader change)
    problems_per_batch: int = 32  # problems per generate call (x num_samples requests)
    batches_in_flight: int = 2  # generate calls running at once (the next is decoded while one is graded)
    save_token_ids: bool = False  # also store token_ids and step_map of every response
    grading_timeout: float = 5.0  # seconds before a comparison counts as wrong
    grading_workers: Optional[int] = None  # grading subprocesses (None: automatic)
    progress_bar: bool = True  # a tqdm bar over the problems
    # DiRL's eval-script settings (configs/eval_dirl_compat.yaml; docs/GRADING.md). Ours by default:
    # no minimum length, nothing banned, a truncated response is wrong.
    min_new_tokens: int = 0  # stop tokens cannot end a response before this many tokens
    banned_tokens: list[str] = field(default_factory=list)  # token texts never generated, e.g. "<|endoftext|>"
    truncated_is_wrong: bool = True  # False: grade a truncated (finish_reason "length") response like any other
    # empty: the user turn goes to the server as chat messages (the model's own chat template); else
    # the prompt text sent as it is, "{prompt}" replaced by the user turn (DiRL's script writes its
    # template by hand)
    prompt_text_template: str = ""

    def validate(self) -> None:
        check_decoding(self.decoding)
        check_positive("num_samples", self.num_samples)
        for key, seed in (("seed", self.seed), ("data.subset_seed", self.data.subset_seed),
                          ("data.synthetic_seed", self.data.synthetic_seed)):
            check_seed(key, seed)
        check_positive("problems_per_batch", self.problems_per_batch)
        check_positive("batches_in_flight", self.batches_in_flight)
        check_positive("grading_timeout", self.grading_timeout)
        check_positive("data.limit", self.data.limit, allow_zero=True)
        check_positive("data.synthetic_size", self.data.synthetic_size)
        check_server_config(self.server)
        check_positive("min_new_tokens", self.min_new_tokens, allow_zero=True)
        if self.min_new_tokens > self.decoding.max_new_tokens:
            raise ConfigError(f"config key 'min_new_tokens': {self.min_new_tokens} is over "
                              f"decoding.max_new_tokens={self.decoding.max_new_tokens}")
        if not all(isinstance(t, str) and t for t in self.banned_tokens):
            raise ConfigError(f"config key 'banned_tokens': must be a list of token texts, got {self.banned_tokens!r}")
        if self.prompt_text_template and "{prompt}" not in self.prompt_text_template:
            raise ConfigError("config key 'prompt_text_template': must contain {prompt} (where the user turn goes)")
        if self.banned_tokens and self.server.urls and not self.model.path:
            raise ConfigError("config key 'banned_tokens': needs model.path (its tokenizer turns the token texts "
                              "into ids) when the servers are given by URL")
        if self.grading_workers is not None:
            check_positive("grading_workers", self.grading_workers, allow_zero=True)
        for j in self.pass_k:
            if not 1 <= j <= self.num_samples:
                raise ConfigError(f"config key 'pass_k': {j} is not in [1, num_samples={self.num_samples}]")
        if not self.data.benchmarks:
            raise ConfigError("config key 'data.benchmarks': name at least one benchmark")
        names = []
        for b in self.data.benchmarks:
            try:
                names.append(canonical_name(b))
            except ValueError as e:
                raise ConfigError(f"config key 'data.benchmarks': {e}") from None
        if len(set(names)) != len(names):
            raise ConfigError("config key 'data.benchmarks': a benchmark is listed twice")
        for b, src in self.data.sources.items():
            try:
                canonical_name(b)
            except ValueError as e:
                raise ConfigError(f"config key 'data.sources.{b}': {e}") from None
            if src and looks_like_file(src) and not Path(src).expanduser().exists():
                raise ConfigError(f"config key 'data.sources.{b}': file '{src}' does not exist")
        if self.data.data_dir and not Path(self.data.data_dir).expanduser().is_dir():
            raise ConfigError(f"config key 'data.data_dir': folder '{self.data.data_dir}' does not exist")
        if self.model.path:
            model_dir = resolve_model_dir(self.model.path)
            read_checkpoint_config(model_dir, key="model.path")
            check_block_sizes(ModelConfig(path=str(model_dir), block_size=self.model.block_size), self.decoding)
        elif not self.server.urls:
            check_block_sizes(self.model, self.decoding)  # the embedded default's block size


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def _label(model_dir: Path) -> str:
    """A short name for a model folder: ``<run>-step_N`` for a training checkpoint."""
    if model_dir.name == "model" and model_dir.parent.name.startswith("step_"):
        return f"{model_dir.parent.parent.parent.name}-{model_dir.parent.name}"
    return model_dir.name or "model"


def _model_identity(model_dir: Path) -> dict:
    files = [model_dir / "config.json"] + [model_dir / w for w in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")]
    stamp = max((f.stat().st_mtime for f in files if f.is_file()), default=0.0)
    return {"path": str(model_dir.resolve()), "mtime": round(stamp, 3)}


# --------------------------------------------------------------------------------------------
# Run folder, resume
# --------------------------------------------------------------------------------------------


def problems_digest(problems: dict[str, list[dict]]) -> str:
    """A hash of the problems an evaluation asks: benchmark, id, question and gold of each."""
    h = hashlib.sha256()
    for name in sorted(problems):
        for p in problems[name]:
            h.update(json.dumps([name, p["id"], p["question"], p["answer"]]).encode())
    return h.hexdigest()[:16]


def _fingerprint(cfg: EvalConfig, model_id: dict, problems: dict[str, list[dict]]) -> dict:
    dec = to_dict(cfg.decoding)
    fp = {"model": model_id, "problems": problems_digest(problems), "decoding": dec, "seed": cfg.seed,
          "backend": cfg.server.backend if not cfg.server.urls else "external"}
    # DiRL-compatible settings, only when set: run folders made without them keep their fingerprint
    if cfg.min_new_tokens:
        fp["min_new_tokens"] = cfg.min_new_tokens
    if cfg.banned_tokens:
        fp["banned_tokens"] = list(cfg.banned_tokens)
    if not cfg.truncated_is_wrong:
        fp["truncated_is_wrong"] = False
    if cfg.prompt_text_template:
        fp["prompt_text_template"] = cfg.prompt_text_template
    return fp


def banned_token_ids(tokens: list[str], model_dir: Optional[Path]) -> list[int]:
    """Ids of ``banned_tokens`` in the model's tokenizer: each text must be one vocabulary entry."""
    if not tokens:
        return []
    from dirl.model.sdar import load_tokenizer

    if model_dir is None:
        raise ConfigError("config key 'banned_tokens': needs model.path (its tokenizer turns the token texts into ids)")
    vocab = load_tokenizer(model_dir).get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        raise ConfigError(f"config key 'banned_tokens': {missing[0]!r} is not a token of the model's tokenizer "
                          f"({model_dir})")
    return sorted({int(vocab[t]) for t in tokens})


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def _write_state(out: Path, state: dict) -> None:
    tmp = out / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / STATE)


def _check_state(out: Path, fp: dict, resume: bool) -> dict:
    """Check (or start) the run folder's state; returns the state to keep updating."""
    state_file = out / STATE
    state: dict = {}
    if resume and state_file.is_file():
        try:
            state = json.loads(state_file.read_text())
        except ValueError:
            state = {}
        old = state.get("fingerprint")
        has_responses = (out / RESPONSES).is_file() and (out / RESPONSES).stat().st_size > 0
        if old is not None and old != fp and not has_responses:
            state = {}  # nothing was generated with the old settings: start afresh
        elif old is not None and old != fp:
            diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
            raise ConfigError(
                f"config key 'output_dir': '{out}' holds an evaluation made with other settings ({', '.join(diff)} "
                "differ); pick another output_dir, or set resume=false to start over"
            )
    out.mkdir(parents=True, exist_ok=True)
    if not resume and (out / RESPONSES).exists():
        (out / RESPONSES).unlink()
    state["fingerprint"] = fp
    _write_state(out, state)
    return state


def read_responses(path: Path) -> list[dict]:
    """The records of ``responses.jsonl`` (a torn last line, from a killed run, is dropped)."""
    return read_jsonl_log(path)


def _open_for_append(path: Path):
    """Append mode, after cutting a torn last line."""
    if path.is_file():
        with path.open("rb+") as f:
            data_end = f.seek(0, os.SEEK_END)
            if data_end:
                f.seek(max(0, data_end - 1))
                if f.read(1) != b"\n":
                    f.seek(0)
                    data = f.read()
                    f.seek(0)
                    f.truncate(data.rfind(b"\n") + 1)
    return path.open("a", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _model_facts(cfg: EvalConfig, model_dir: Optional[Path]) -> ModelFacts:
    """What the servers must agree with: the model's block size and mask id (from its config.json;
    unknown for servers given by URL without model.path), the decoding settings and the dtype."""
    bs, mask = cfg.model.block_size, cfg.model.mask_token_id
    if model_dir is not None:
        ck = read_checkpoint_config(model_dir)
        bs = bs if bs is not None else ck.block_size
        mask = mask if mask is not None else ck.mask_token_id
    return ModelFacts(bs, mask, cfg.decoding, cfg.model.dtype)


def _server_summary(info: dict) -> dict:
    """The engine-wide settings a server reports, for the report."""
    keep = ("engine", "version", "backend", "block_size", "denoising_steps", "unmasking_strategy",
            "confidence_threshold", "dtype", "device")
    return {k: info[k] for k in keep if k in info}


def _build_request(cfg: EvalConfig, problem: dict, sample: int, banned_ids: Sequence[int] = ()) -> dict:
    """Sample ``sample`` of a problem; its seed does not depend on the sample count, so raising
    ``num_samples`` later only adds samples. With ``prompt_text_template`` the prompt is sent as
    text (DiRL's hand-written prompt); ``min_new_tokens`` / ``banned_ids`` only when set."""
    req = sampling_request(f"{problem['benchmark']}/{problem['id']}/{sample}", cfg.decoding,
                           request_seed(cfg.seed, f"{problem['benchmark']}:{problem['index']}", sample),
                           messages=[{"role": "user", "content": problem["prompt"]}])
    if cfg.prompt_text_template:
        del req["messages"]
        req["prompt"] = cfg.prompt_text_template.replace("{prompt}", problem["prompt"])
    if cfg.min_new_tokens:
        req["min_new_tokens"] = cfg.min_new_tokens
    if banned_ids:
        req["banned_token_ids"] = list(banned_ids)
    return req


def _record(cfg: EvalConfig, problem: dict, sample: int, req: dict, traj: dict, correct: bool) -> dict:
    n = int(traj.get("response_length", len(traj.get("token_ids") or [])))
    steps = traj.get("step_map")
    text = traj.get("text") or ""
    answer = extract_answer(text)
    rec = {
        "benchmark": problem["benchmark"],
        "problem_id": problem["id"],
        "sample": sample,
        "request_id": req["request_id"],
        "seed": req["seed"],
        "question": problem["question"],
        "gold": problem["answer"],
        "text": text,
        "answer": answer,
        "has_answer": answer is not None,
        "correct": bool(correct),
        "finish_reason": traj.get("finish_reason"),
        "response_length": n,
        "num_steps": len(set(steps[:n])) if steps else None,
        "tokens_per_step": tokens_per_step(steps, n) if steps else None,
        "prompt_length": len(traj.get("prompt_ids") or []),
    }
    if cfg.save_token_ids:
        rec["token_ids"] = traj.get("token_ids")
        rec["step_map"] = steps
    return rec


def _grade(cfg: EvalConfig, grader, items: list[tuple[dict, dict]]) -> list[bool]:
    """Accuracy verdicts (SPEC section 7) for (problem, trajectory) pairs; with
    ``truncated_is_wrong=False`` (DiRL's script) a truncated response is graded like any other."""

    if not cfg.truncated_is_wrong:
        return grader.grade_many([(t.get("text") or "", p["answer"]) for p, t in items], timeout=cfg.grading_timeout)
    return accuracy_verdicts([t for _, t in items], [p["answer"] for p, _ in items], grader=grader,
                             timeout=cfg.grading_timeout)


def _rollouts(cfg: EvalConfig, client, grader, todo: list[tuple[dict, list[int]]], resp_path: Path,
              records: list[dict], bar, banned_ids: Sequence[int] = ()) -> None:
    """Generate, grade and append to ``responses.jsonl``, batch by batch; the next batches are
    already being decoded while one is graded and written."""
    def requests_of(batch):
        reqs, owners = [], []
        for p, samples in batch:
            for j in samples:
                reqs.append(_build_request(cfg, p, j, banned_ids))
                owners.append((p, j))
        return reqs, owners

    batches = iter([todo[i : i + cfg.problems_per_batch] for i in range(0, len(todo), cfg.problems_per_batch)])
    n_ok = n_done = 0
    ex = ThreadPoolExecutor(cfg.batches_in_flight, thread_name_prefix="dirl-eval-generate")
    pending: deque = deque()

    def submit() -> None:
        batch = next(batches, None)
        if batch is not None:
            reqs, owners = requests_of(batch)
            pending.append((batch, reqs, owners, ex.submit(client.generate, reqs)))

    try:
        for _ in range(cfg.batches_in_flight):
            submit()
        with _open_for_append(resp_path) as f:
            while pending:
                batch, reqs, owners, fut = pending.popleft()
                trajs = fut.result()
                submit()
                by_id = {t.get("request_id"): t for t in trajs}
                missing = [r["request_id"] for r in reqs if r["request_id"] not in by_id]
                if missing:
                    raise RuntimeError(f"the rollout client returned no result for {missing[0]!r}")
                items = [(p, by_id[r["request_id"]]) for (p, _), r in zip(owners, reqs)]
                verdicts = _grade(cfg, grader, items)
                for (p, j), r, (_, traj), v in zip(owners, reqs, items, verdicts):
                    rec = _record(cfg, p, j, r, traj, v)
                    records.append(rec)
                    f.write(json.dumps(rec) + "\n")
                    n_ok += int(v)
                    n_done += 1
                f.flush()
                bar.update(len(batch))
                bar.set_postfix_str(f"acc {100.0 * n_ok / max(1, n_done):.1f}%")
    finally:
        ex.shutdown(wait=False, cancel_futures=True)


def run_eval(cfg: EvalConfig) -> dict:
    """Evaluate as configured; returns ``{"benchmarks": {...}, "average": {...}, "output_dir": ...}``."""
    t0 = time.time()
    # 1. model and run folder
    model_dir: Optional[Path] = None
    label = "external"
    if cfg.model.path:
        model_dir = resolve_model_dir(cfg.model.path)
        model_id = _model_identity(model_dir)
        label = _label(model_dir)
    elif cfg.server.urls:
        model_id = {"servers": sorted(cfg.server.urls)}
    else:
        found = newest_checkpoint(cfg.runs_dir)  # a trained checkpoint of any command, never an untrained model
        if found is not None:
            model_dir = found
            model_id = _model_identity(found)
            label = _label(found)
            print(f"dirl eval: model.path is empty; using the newest embedded-default checkpoint {found}", flush=True)
        else:
            model_id = {"tiny": to_dict(cfg.model.tiny)}
            label = "tiny-untrained"
    # 2. the problems (their texts and golds are part of the run's identity: responses stored for
    # other problems are never counted as this run's)
    k = cfg.num_samples
    problems: dict[str, list[dict]] = {}
    for b in cfg.data.benchmarks:
        name = canonical_name(b)
        src = cfg.data.sources.get(b) or cfg.data.sources.get(name)
        try:
            problems[name] = load_benchmark(name, source=src, data_dir=cfg.data.data_dir or None,
                                            limit=cfg.data.limit, subset_seed=cfg.data.subset_seed,
                                            synthetic_size=cfg.data.synthetic_size,
                                            synthetic_seed=cfg.data.synthetic_seed)
        except DataError:
            raise  # a bad row: the message names its file and line
        except (RuntimeError, OSError, KeyError, ValueError) as e:
            key = f"data.sources.{b if b in cfg.data.sources else name}" if src else "data.benchmarks"
            raise ConfigError(f"config key '{key}': cannot load '{name}': {e}") from None
    fp = _fingerprint(cfg, model_id, problems)
    out = Path(cfg.output_dir) if cfg.output_dir else Path(cfg.runs_dir) / "eval" / f"{label}-{_hash(fp)}"
    state = _check_state(out, fp, cfg.resume)
    save_config(cfg, out / "config.yaml")

    # what is left to do
    resp_path = out / RESPONSES
    records = read_responses(resp_path)
    have = {(r["benchmark"], str(r["problem_id"]), int(r["sample"])) for r in records}
    todo: list[tuple[dict, list[int]]] = []
    for name, ps in problems.items():
        for p in ps:
            missing = [j for j in range(k) if (name, p["id"], j) not in have]
            if missing:
                todo.append((p, missing))
    total = sum(len(ps) for ps in problems.values())
    if model_dir is None and not cfg.server.urls:
        model_dir = out / "tiny-model"
        if todo and not (model_dir / "config.json").is_file():
            from dirl.train.checkpoint import write_tiny_model  # torch: imported once the config is known good

            write_tiny_model(model_dir, cfg.model.tiny)
            print(f"dirl eval: no trained embedded-default checkpoint under '{cfg.runs_dir}'; "
                  f"evaluating a freshly made (untrained) tiny model", flush=True)

    grader = Grader(workers=cfg.grading_workers, timeout=cfg.grading_timeout)
    server_info: dict = state.get("server") or {}
    try:
        if cfg.regrade and records:
            pairs = [(r["text"], r["gold"]) for r in records]
            verdicts = grader.grade_many(pairs)
            for r, v in zip(records, verdicts):
                r["correct"] = bool(v) and (not cfg.truncated_is_wrong or r.get("finish_reason") != "length")
                r["answer"] = extract_answer(r["text"])  # the extraction may have changed too
                r["has_answer"] = r["answer"] is not None
            tmp = resp_path.with_suffix(".tmp")
            with tmp.open("w", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
            os.replace(tmp, resp_path)

        # 3. rollouts
        if todo:
            banned_ids = banned_token_ids(cfg.banned_tokens, model_dir)
            facts = _model_facts(cfg, model_dir)
            with open_servers(cfg.server, model_dir, facts, log_path=out / "server.log") as servers:
                server_info = _server_summary(servers.infos[0])
                state["server"] = server_info
                _write_state(out, state)
                from dirl.train.common import progress_bar

                bar = progress_bar(total, initial=total - len(todo), desc="eval", enabled=cfg.progress_bar, unit="problem")
                t_gen = time.time()
                try:
                    _rollouts(cfg, servers.client, grader, todo, resp_path, records, bar, banned_ids)
                finally:
                    bar.close()
                    gen_s = time.time() - t_gen
                    state["rollout_seconds"] = round(float(state.get("rollout_seconds", 0.0)) + gen_s, 1)
                    _write_state(out, state)
    finally:
        grader.close()

    # 4. metrics and report
    per_benchmark: dict[str, dict] = {}
    for name, ps in problems.items():
        ids = {p["id"] for p in ps}
        recs = [r for r in records if r["benchmark"] == name and str(r["problem_id"]) in ids and int(r["sample"]) < k]
        # one record per (problem, sample): a re-run after a crash may have written a duplicate
        uniq = {(str(r["problem_id"]), int(r["sample"])): r for r in recs}
        per_benchmark[name] = benchmark_metrics(uniq.values(), cfg.pass_k or None)
    average = average_metrics(per_benchmark)
    d = cfg.decoding
    info = {
        "model": str(model_dir) if model_dir else ", ".join(cfg.server.urls),
        "samples per problem": k,
        "decoding": (f"T {d.temperature}, top-k {d.top_k}, top-p {d.top_p}, max {d.max_new_tokens} tokens, "
                     f"{d.denoising_steps} steps, {d.unmasking_strategy}"
                     + (f" (τ {d.confidence_threshold})" if d.unmasking_strategy == "low_confidence_dynamic" else "")
                     + (f", at least {cfg.min_new_tokens} new tokens" if cfg.min_new_tokens else "")
                     + (f", banned {', '.join(cfg.banned_tokens)}" if cfg.banned_tokens else "")),
        "grading": None if cfg.truncated_is_wrong else "truncated responses graded like any other (DiRL's eval script)",
        "prompt text": json.dumps(cfg.prompt_text_template) if cfg.prompt_text_template else None,
        "server": server_info or None,
        "seed": cfg.seed,
        "rollout + grading time (s, all runs)": state.get("rollout_seconds"),
        "wall time of this run (s)": round(time.time() - t0, 1),
    }
    info = {k2: v for k2, v in info.items() if v is not None}
    write_report(out, per_benchmark, average, info)
    print(markdown_table(per_benchmark, average), end="", flush=True)
    print(f"dirl eval: report in {out / 'report.md'}, responses in {resp_path}", flush=True)
    return {"benchmarks": per_benchmark, "average": average, "output_dir": str(out)}


def load_eval_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> EvalConfig:
    return load_config(EvalConfig, path, overrides)


def cli_main(argv: list[str]) -> int:
    path, overrides = run_config_command(
        argv, "dirl eval",
        "Evaluate a model on math benchmarks (avg@k accuracy, pass@k, tokens per step, length, truncation). "
        "With no config: the newest embedded-default checkpoint under runs/ (or a fresh tiny model) on the "
        "synthetic task, on CPU.")
    cfg = load_eval_config(path, overrides)
    stop_on_signals()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    run_eval(cfg)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli_main(sys.argv[1:]))
