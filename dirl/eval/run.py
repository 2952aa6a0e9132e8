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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from dirl.config import (
    ConfigError,
    DecodingConfig,
    ModelConfig,
    check_block_sizes,
    check_decoding,
    check_positive,
    load_config,
    save_config,
    to_dict,
)
from dirl.data.formats import read_jsonl_log

logger = logging.getLogger("dirl.eval")

UNTRAINED_MARKER = "UNTRAINED"  # written next to a freshly made tiny model: never picked as "newest"
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
    synthetic_seed: int = 0


@dataclass
class EvalServerConfig:
    urls: list[str] = field(default_factory=list)  # empty: start a local server for the run
    backend: Literal["reference", "lmdeploy"] = "reference"
    host: str = "127.0.0.1"
    port: Optional[int] = None  # None: a free port
    device: str = "auto"  # auto: cuda when available, else cpu
    api_key: str = ""
    max_batch_size: int = 64  # sequences a local reference server decodes together
    # torch CPU threads of a local server. None: 1 on a CPU device (tiny forwards run fastest on one
    # thread), torch's own choice on CUDA; 0: torch's own choice everywhere
    threads: Optional[int] = None
    # the backend's own options (dirl serve --backend-option), e.g. {cache_max_entry_count: 0.3} for lmdeploy
    backend_options: dict[str, Any] = field(default_factory=dict)
    startup_timeout: float = 600.0  # seconds for a local server to load the model
    max_concurrency: int = 8  # HTTP calls in flight per server
    request_batch_size: int = 16  # requests per HTTP call
    retries: int = 3
    timeout: float = 3600.0  # seconds per HTTP call


@dataclass
class EvalConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    decoding: DecodingConfig = field(default_factory=lambda: DecodingConfig(max_new_tokens=48))
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    server: EvalServerConfig = field(default_factory=EvalServerConfig)
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
    progress_bar: bool = True

    def validate(self) -> None:
        check_decoding(self.decoding)
        check_positive("num_samples", self.num_samples)
        check_positive("problems_per_batch", self.problems_per_batch)
        check_positive("batches_in_flight", self.batches_in_flight)
        check_positive("grading_timeout", self.grading_timeout)
        check_positive("data.limit", self.data.limit, allow_zero=True)
        check_positive("data.synthetic_size", self.data.synthetic_size)
        check_positive("server.max_concurrency", self.server.max_concurrency)
        check_positive("server.request_batch_size", self.server.request_batch_size)
        check_positive("server.max_batch_size", self.server.max_batch_size)
        check_positive("server.threads", self.server.threads, allow_zero=True)
        check_positive("server.timeout", self.server.timeout)
        if self.grading_workers is not None:
            check_positive("grading_workers", self.grading_workers, allow_zero=True)
        for j in self.pass_k:
            if not 1 <= j <= self.num_samples:
                raise ConfigError(f"config key 'pass_k': {j} is not in [1, num_samples={self.num_samples}]")
        if not self.data.benchmarks:
            raise ConfigError("config key 'data.benchmarks': name at least one benchmark")
        from dirl.data.benchmarks import canonical_name

        names = []
        for b in self.data.benchmarks:
            try:
                names.append(canonical_name(b))
            except ValueError as e:
                raise ConfigError(f"config key 'data.benchmarks': {e}") from None
        if len(set(names)) != len(names):
            raise ConfigError("config key 'data.benchmarks': a benchmark is listed twice")
        for b in self.data.sources:
            try:
                canonical_name(b)
            except ValueError as e:
                raise ConfigError(f"config key 'data.sources.{b}': {e}") from None
        if self.data.data_dir and not Path(self.data.data_dir).expanduser().is_dir():
            raise ConfigError(f"config key 'data.data_dir': folder '{self.data.data_dir}' does not exist")
        if self.model.path:
            model_dir = resolve_model_dir(self.model.path)
            from dirl.model.sdar import read_checkpoint_config

            read_checkpoint_config(model_dir, key="model.path")
            check_block_sizes(ModelConfig(path=str(model_dir), block_size=self.model.block_size), self.decoding)
        elif not self.server.urls:
            check_block_sizes(self.model, self.decoding)  # the embedded default's block size


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A checkpoint folder (with ``config.json``), or the model of a training checkpoint
    (``step_N/model``), or of a run folder's newest complete checkpoint."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"config key 'model.path': '{p}' does not exist")
    if (p / "config.json").is_file():
        return p
    if (p / "model" / "config.json").is_file():
        return p / "model"
    ckroot = p / "checkpoints"
    if ckroot.is_dir():
        done = sorted(d for d in ckroot.iterdir() if d.is_dir() and (d / "COMPLETE").is_file() and (d / "model" / "config.json").is_file())
        if done:
            return done[-1] / "model"
    raise ConfigError(f"config key 'model.path': '{p}' is neither a model folder nor a run folder with a complete checkpoint")


def _is_tiny_checkpoint(d: Path) -> bool:
    try:
        raw = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if raw.get("model_type") not in ("sdar", "qwen3") or int(raw.get("vocab_size", 1 << 30)) > 4096:
        return False
    if (d / UNTRAINED_MARKER).exists():
        return False
    if d.name == "model" and d.parent.name.startswith("step_") and not (d.parent / "COMPLETE").is_file():
        return False
    return any((d / w).is_file() for w in ("model.safetensors", "pytorch_model.bin"))


def newest_default_checkpoint(runs_dir: str | os.PathLike = "runs", max_depth: int = 6) -> Optional[Path]:
    """The most recently written embedded-default (tiny-vocabulary) checkpoint under ``runs_dir``."""
    root = Path(runs_dir)
    if not root.is_dir():
        return None
    best: tuple[float, Optional[Path]] = (-1.0, None)
    base = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = [n for n in dirnames if not n.startswith(".") and len(d.parts) - base < max_depth]
        if "config.json" in filenames and _is_tiny_checkpoint(d):
            t = (d / "config.json").stat().st_mtime
            if t > best[0]:
                best = (t, d)
    return best[1]


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


def _fingerprint(cfg: EvalConfig, model_id: dict) -> dict:
    dec = to_dict(cfg.decoding)
    return {"model": model_id, "decoding": dec, "seed": cfg.seed,
            "backend": cfg.server.backend if not cfg.server.urls else "external"}


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


def request_seed(base_seed: int, benchmark: str, index: int, sample: int) -> int:
    """The seed of sample ``sample`` of problem ``index``: stable across runs and independent of the
    sample count (so raising ``num_samples`` later only adds samples); the samples of one problem
    have distinct seeds."""
    off = int(hashlib.sha256(f"{base_seed}:{benchmark}:{index}".encode()).hexdigest()[:8], 16)
    return (off + sample) % (2**31 - 1)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _device(name: str) -> str:
    if name != "auto":
        return name
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        return "cpu"


def server_threads(threads: Optional[int], device: str) -> Optional[int]:
    """``server.threads`` resolved for a device: unset is 1 on CPU, torch's choice (None) elsewhere."""
    if threads is None:
        return 1 if str(device).startswith("cpu") else None
    return threads or None


class _Servers:
    """The rollout servers of a run: given URLs, or a local one started (and stopped) here."""

    def __init__(self, cfg: EvalConfig, model_dir: Optional[Path], log_path: Optional[Path] = None):
        self.cfg, self.model_dir, self.log_path, self.handle = cfg, model_dir, log_path, None

    def __enter__(self) -> list[str]:
        sc = self.cfg.server
        if sc.urls:
            return list(sc.urls)
        from dirl.rollout.server import start_server

        assert self.model_dir is not None
        device = _device(sc.device)
        self.handle = start_server(
            str(self.model_dir),
            backend=sc.backend,
            host=sc.host,
            port=sc.port,
            decoding=self.cfg.decoding,
            api_key=sc.api_key or None,
            device=device,
            dtype=self.cfg.model.dtype,
            max_batch_size=sc.max_batch_size,
            threads=server_threads(sc.threads, device),
            startup_timeout=sc.startup_timeout,
            log_path=self.log_path,
            backend_options=dict(sc.backend_options) or None,
        )
        return [self.handle.url]

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.stop()
            self.handle = None


def _make_client(cfg: EvalConfig, urls: list[str]):
    from dirl.rollout.client import RolloutClient

    sc = cfg.server
    return RolloutClient(urls, api_key=sc.api_key or None, max_concurrency=sc.max_concurrency, retries=sc.retries,
                         timeout=sc.timeout, batch_size=sc.request_batch_size)


def _check_server_info(cfg: EvalConfig, info: Any) -> dict:
    """The engine-wide settings the server reports; a block size that disagrees is an error."""
    infos = info if isinstance(info, list) else [info]
    first = infos[0] if infos and isinstance(infos[0], dict) else {}
    for i in infos:
        if not isinstance(i, dict):
            continue
        bs = i.get("block_size")
        if cfg.decoding.block_size is not None and bs is not None and bs != cfg.decoding.block_size:
            raise ConfigError(f"config key 'decoding.block_size': {cfg.decoding.block_size} disagrees with the "
                              f"server's block size {bs} ({i.get('model', '')})")
        for key in ("denoising_steps", "unmasking_strategy", "confidence_threshold"):
            if key in i and i[key] != getattr(cfg.decoding, key):
                logger.warning("the server decodes with %s=%r, not the config's %r (engine-wide setting)",
                               key, i[key], getattr(cfg.decoding, key))
    keep = ("engine", "version", "backend", "block_size", "denoising_steps", "unmasking_strategy",
            "confidence_threshold", "dtype", "device")
    return {k: first[k] for k in keep if k in first}


def _build_request(cfg: EvalConfig, problem: dict, sample: int) -> dict:
    d = cfg.decoding
    return {
        "request_id": f"{problem['benchmark']}/{problem['id']}/{sample}",
        "messages": [{"role": "user", "content": problem["prompt"]}],
        "max_new_tokens": d.max_new_tokens,
        "temperature": d.temperature,
        "top_k": d.top_k,
        "top_p": d.top_p,
        "do_sample": d.do_sample,
        "seed": request_seed(cfg.seed, problem["benchmark"], problem["index"], sample),
    }


def _record(cfg: EvalConfig, problem: dict, sample: int, req: dict, traj: dict, correct: bool) -> dict:
    from dirl.rewards import extract_answer, tokens_per_step

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
    """Accuracy verdicts (SPEC section 7) for (problem, trajectory) pairs."""
    from dirl.rewards import accuracy_verdicts

    return accuracy_verdicts([t for _, t in items], [p["answer"] for p, _ in items], grader=grader,
                             timeout=cfg.grading_timeout)


def _rollouts(cfg: EvalConfig, client, grader, todo: list[tuple[dict, list[int]]], resp_path: Path,
              records: list[dict], bar) -> None:
    """Generate, grade and append to ``responses.jsonl``, batch by batch; the next batches are
    already being decoded while one is graded and written."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    def requests_of(batch):
        reqs, owners = [], []
        for p, samples in batch:
            for j in samples:
                reqs.append(_build_request(cfg, p, j))
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


def _progress(total: int, initial: int, enabled: bool, desc: str):
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, initial=initial, desc=desc, unit="problem", dynamic_ncols=True,
                        disable=None)
        except ImportError:  # pragma: no cover
            pass

    class _Null:
        def update(self, n: int = 1) -> None: ...
        def set_postfix_str(self, s: str) -> None: ...
        def close(self) -> None: ...

    return _Null()


def run_eval(cfg: EvalConfig) -> dict:
    """Evaluate as configured; returns ``{"benchmarks": {...}, "average": {...}, "output_dir": ...}``."""
    from dirl.data.benchmarks import canonical_name, load_benchmark
    from dirl.eval.metrics import average_metrics, benchmark_metrics
    from dirl.eval.report import markdown_table, write_report
    from dirl.rewards import Grader

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
        found = newest_default_checkpoint(cfg.runs_dir)
        if found is not None:
            model_dir = found
            model_id = _model_identity(found)
            label = _label(found)
            print(f"dirl eval: model.path is empty; using the newest embedded-default checkpoint {found}", flush=True)
        else:
            model_id = {"tiny": to_dict(cfg.model.tiny)}
            label = "tiny-untrained"
    fp = _fingerprint(cfg, model_id)
    out = Path(cfg.output_dir) if cfg.output_dir else Path(cfg.runs_dir) / "eval" / f"{label}-{_hash(fp)}"
    state = _check_state(out, fp, cfg.resume)
    save_config(cfg, out / "config.yaml")

    # 2. problems and what is left to do
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
        except (RuntimeError, OSError, KeyError, ValueError) as e:
            raise ConfigError(f"config key 'data.benchmarks': cannot load '{name}': {e}") from None
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
            from dirl.model.tiny import make_tiny_model

            make_tiny_model(model_dir, cfg.model.tiny)
            (model_dir / UNTRAINED_MARKER).write_text("a randomly initialised embedded-default model\n")
            print(f"dirl eval: no trained embedded-default checkpoint under '{cfg.runs_dir}'; "
                  f"evaluating a freshly made (untrained) tiny model", flush=True)

    grader = Grader(workers=cfg.grading_workers, timeout=cfg.grading_timeout)
    server_info: dict = state.get("server") or {}
    try:
        if cfg.regrade and records:
            pairs = [(r["text"], r["gold"]) for r in records]
            verdicts = grader.grade_many(pairs)
            for r, v in zip(records, verdicts):
                r["correct"] = bool(v) and r.get("finish_reason") != "length"
            tmp = resp_path.with_suffix(".tmp")
            with tmp.open("w", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
            os.replace(tmp, resp_path)

        # 3. rollouts
        if todo:
            with _Servers(cfg, model_dir, out / "server.log") as urls:
                client = _make_client(cfg, urls)
                server_info = _check_server_info(cfg, client.info())
                state["server"] = server_info
                _write_state(out, state)
                bar = _progress(total, total - len(todo), cfg.progress_bar, "eval")
                t_gen = time.time()
                try:
                    _rollouts(cfg, client, grader, todo, resp_path, records, bar)
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
                     + (f" (τ {d.confidence_threshold})" if d.unmasking_strategy == "low_confidence_dynamic" else "")),
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
    from dirl.cli import run_config_command

    path, overrides = run_config_command(
        argv, "dirl eval",
        "Evaluate a model on math benchmarks (avg@k accuracy, pass@k, tokens per step, length, truncation). "
        "With no config: the newest embedded-default checkpoint under runs/ (or a fresh tiny model) on the "
        "synthetic task, on CPU.")
    cfg = load_eval_config(path, overrides)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    run_eval(cfg)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli_main(sys.argv[1:]))
