"""Answer extraction and math grading (SPEC section 7), bounded in time and safe anywhere.

A response is graded by the content of its last brace-matched ``\\boxed{...}`` (also
``\\boxed {...}``, ``\\fbox{...}``, ``\\framebox{...}`` and the brace-less ``\\boxed 5``). That
content is compared with the ground truth by math-verify, the gold parsed as ``\\boxed{gt}``, with a
normalised-string comparison as fallback: an answer is correct when either says so.

math-verify's own timeouts rely on ``signal.alarm``, which raises outside the main thread, and a
Python-level alarm cannot interrupt a long C-level computation (``9^{9^{9^9}}`` builds an integer
with more digits than there are atoms in the universe). So math-verify runs here with its timeouts
off, in persistent worker *subprocesses* (plain ``subprocess``, so a daemonic process may use them
too): a comparison that takes longer than the deadline gets its worker killed (and restarted on the
next use) and grades ``False``. Cheap decisions (no boxed answer, identical normalised strings, two
integers) never leave the calling process, and results are cached, so grading k samples of one
problem that agree costs one comparison.

Public API::

    is_correct(response, ground_truth) -> bool
    grade_many([(response, ground_truth), ...]) -> list[bool]
    extract_answer(response) -> str | None
    Grader(workers=..., timeout=...)   # an explicit pool; the functions above share a default one

Every entry point may be called from any thread and from any process (a fork gets its own pool).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import numbers
import os
import queue
import re
import select
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

logger = logging.getLogger(__name__)

GroundTruth = Union[str, int, float, Sequence[str]]

DEFAULT_TIMEOUT = 5.0  # seconds per comparison
MAX_ANSWER_CHARS = 2000  # longer boxed contents are compared as strings only
_START_TIMEOUT = 120.0  # seconds for a worker to import math-verify (slow on a loaded machine)

# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox|framebox)(?![A-Za-z])")


def _closing_braces(text: str) -> dict[int, int]:
    """For every ``{`` of ``text`` that is closed, the index just past its ``}`` (escaped braces
    ``\\{`` and ``\\}`` are literal, not grouping). One pass, so a response of many unclosed boxes
    costs linear time."""
    out: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            out[stack.pop()] = i + 1
        i += 1
    return out


def _box_content(text: str, pos: int, closing: dict[int, int]) -> Optional[str]:
    """Content of the box command whose name ends at ``pos``, or None when it is not closed."""
    n = len(text)
    i = pos
    while i < n and text[i] in " \t\n":
        i += 1
    if i < n and text[i] == "[":  # \framebox[width][pos]{...}
        while i < n and text[i] == "[":
            j = text.find("]", i)
            if j < 0:
                return None
            i = j + 1
        while i < n and text[i] in " \t\n":
            i += 1
    if i >= n:
        return None
    if text[i] == "{":
        end = closing.get(i)
        if end is None:
            return None
        return text[i + 1 : end - 1].strip()
    if i > pos:  # "\boxed 5": one space-delimited token
        m = re.match(r"[^\s$]+", text[i:])
        if m:
            return m.group(0).rstrip(".,;")
    return None


def extract_answer(response: str) -> Optional[str]:
    """The content of the last complete, non-empty ``\\boxed{...}`` of ``response`` (None when there
    is none). An unclosed box (a cut response) and an empty one (``\\boxed{}`` quoted from the
    instruction) are passed over for the one before."""
    if not response:
        return None
    starts = [m.end() for m in _BOX_RE.finditer(response)]
    if not starts:
        return None
    closing = _closing_braces(response)
    for pos in reversed(starts):
        content = _box_content(response, pos, closing)
        if content:
            return content
    return None


def gold_answer(ground_truth: GroundTruth) -> str:
    """The ground truth as one answer string.

    GSM8K's worked answers become the number after ``####`` (thousands separators dropped); a list
    (OlympiadBench's ``final_answer``) is joined with commas; ``$`` delimiters are removed.
    """
    if isinstance(ground_truth, (list, tuple)):
        if any(isinstance(g, (list, tuple)) for g in ground_truth):
            raise TypeError("a ground truth list must hold strings or numbers, not lists")
        parts = [gold_answer(g) for g in ground_truth]
        return ", ".join(p for p in parts if p)
    if isinstance(ground_truth, bool) or not isinstance(ground_truth, (str, numbers.Real)):
        raise TypeError("a ground truth must be a string, a number or a list of strings")
    if isinstance(ground_truth, numbers.Real):
        if not math.isfinite(ground_truth):
            raise ValueError("a ground truth number must be finite")
        return str(ground_truth)
    s = ground_truth
    if "####" in s:
        s = s.rsplit("####", 1)[1].strip().replace(",", "")
    s = s.strip()
    boxed = extract_answer(s) if "\\boxed" in s else None
    if boxed is not None:
        s = boxed
    return s.replace("\\$", "").replace("$", "").strip()


# --------------------------------------------------------------------------------------------
# Normalised-string comparison (the fallback and the cheap path)
# --------------------------------------------------------------------------------------------

_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_INT_RE = re.compile(r"^[+-]?\d+$")
_PAREN_NUM_RE = re.compile(r"^\((-?\d+(?:\.\d+)?)\)$")


def normalize_answer(s: str) -> str:
    """A conservative normal form of an answer string: delimiters, spacing commands, ``\\left`` /
    ``\\right``, ``\\dfrac``, ``\\text{}`` wrappers, degree signs, a trailing period and thousands
    separators are dropped; whitespace removed; lower case."""
    s = str(s).strip()
    for a, b in (("\\(", ""), ("\\)", ""), ("\\[", ""), ("\\]", ""), ("\\$", ""), ("$", "")):
        s = s.replace(a, b)
    for _ in range(3):  # nested \text{\textbf{..}}
        s2 = _TEXT_CMD_RE.sub(r"\1", s)
        if s2 == s:
            break
        s = s2
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for sp in ("\\!", "\\,", "\\;", "\\:", "\\ ", "~", "\\quad", "\\qquad"):
        s = s.replace(sp, "")
    for deg in ("^{\\circ}", "^\\circ", "°", "\\circ", "\\degree"):
        s = s.replace(deg, "")
    spaced_commas = re.search(r",\s", s) is not None  # "1, 234" is a list of two numbers, not 1234
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    if s.endswith("%") and len(s) > 1:  # "62.5\%" == "62.5" (math-verify reads it as 0.625, also accepted)
        s = s[:-2] if s.endswith("\\%") else s[:-1]
    m = _PAREN_NUM_RE.match(s)
    if m:  # "(073)" -> "073"
        s = m.group(1)
    if not spaced_commas and _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    if _INT_RE.match(s):
        s = str(int(s))  # "025" == "25", "+3" == "3"
    return s.lower()


def _cheap_decision(pred: Optional[str], gold: str) -> Optional[bool]:
    """A verdict that needs no math-verify, or None. Never contradicts what math-verify would say
    about the cases it decides."""
    if pred is None or not pred.strip():
        return False
    np_, ng = normalize_answer(pred), normalize_answer(gold)
    if np_ == ng and np_ != "":
        return True
    if _INT_RE.match(np_) and _INT_RE.match(ng) and "%" not in pred + gold:  # 900% is 9 to math-verify
        return int(np_) == int(ng)
    if len(pred) > MAX_ANSWER_CHARS:  # a runaway "answer": not worth a symbolic comparison
        return False
    return None


# --------------------------------------------------------------------------------------------
# math-verify (runs in the worker process, or in-process with workers=0)
# --------------------------------------------------------------------------------------------

_PARSE_CACHE: "OrderedDict[str, object]" = OrderedDict()
_PARSE_CACHE_SIZE = 4096


def _parse_boxed(content: str, cache: bool = False):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    if cache and content in _PARSE_CACHE:
        _PARSE_CACHE.move_to_end(content)
        return _PARSE_CACHE[content]
    out = parse(
        "\\boxed{" + content + "}",
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
        parsing_timeout=None,
    )
    if cache:
        _PARSE_CACHE[content] = out
        if len(_PARSE_CACHE) > _PARSE_CACHE_SIZE:
            _PARSE_CACHE.popitem(last=False)
    return out


def math_verify_equal(pred: str, gold: str) -> bool:
    """math-verify's verdict on two answer strings, with its timeouts off (no time bound: call it
    through a :class:`Grader` unless the inputs are trusted)."""
    from math_verify import verify

    try:
        g = _parse_boxed(gold, cache=True)
        p = _parse_boxed(pred)
        if not g or not p:
            return False
        return bool(verify(g, p, timeout_seconds=None))
    except Exception:  # noqa: BLE001 - a grader never raises on odd inputs
        return False


def _quiet_math_verify() -> None:
    for name in ("math_verify", "math_verify.grader", "math_verify.parser", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the parent goes, even in the middle of a C-level computation."""
    parent = os.environ.get("DIRL_GRADER_PARENT")
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except Exception:  # noqa: BLE001
            pass
    if parent and os.getppid() != int(parent):  # the parent died before prctl took effect
        os._exit(0)


def _worker_main() -> None:
    """Grading worker: JSON lines on stdin -> JSON lines on the original stdout."""
    _die_with_parent()
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed by libraries goes to stderr, never into the protocol
    try:
        _quiet_math_verify()
        math_verify_equal("1", "1")  # load the LaTeX grammar now, not during the first deadline
    except Exception as e:  # noqa: BLE001
        proto.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        return
    proto.write(json.dumps({"ready": os.getpid()}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        req: dict = {}
        try:
            req = json.loads(line)
            r = math_verify_equal(req["p"], req["g"])
        except Exception:  # noqa: BLE001
            r = False
            req = req if isinstance(req, dict) else {}
        proto.write(json.dumps({"i": req.get("i"), "r": r}) + "\n")


# --------------------------------------------------------------------------------------------
# Worker processes
# --------------------------------------------------------------------------------------------


class GraderError(RuntimeError):
    """The grading workers cannot start (math-verify missing or broken)."""


_spawner: Optional[ThreadPoolExecutor] = None
_spawner_pid = -1
_spawner_lock = threading.Lock()


def _spawn(args: list[str], **kwargs) -> subprocess.Popen:
    """Start a worker from one long-lived thread of this process.

    A worker asks for SIGKILL when its parent goes (so a stuck comparison never outlives the
    program); Linux sends that signal when the *thread* that started the worker exits, so workers
    are never started from short-lived caller threads."""
    global _spawner, _spawner_pid
    with _spawner_lock:
        if _spawner is None or _spawner_pid != os.getpid():
            _spawner = ThreadPoolExecutor(1, thread_name_prefix="dirl-grader-spawn")
            _spawner_pid = os.getpid()
        ex = _spawner
    return ex.submit(subprocess.Popen, args, **kwargs).result()


class _Worker:
    """One grading subprocess, used by one thread at a time."""

    def __init__(self, start_timeout: float):
        self.proc: Optional[subprocess.Popen] = None
        self.buf = b""
        self.start_timeout = start_timeout
        self.serial = 0

    def _spawn(self) -> None:
        pkg_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = "1"
        env["DIRL_GRADER_PARENT"] = str(os.getpid())
        self.proc = _spawn(
            [sys.executable, "-c", "from dirl.rewards.math import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
            env=env,
            close_fds=True,
        )
        self.buf = b""
        msg = self._read(self.start_timeout)
        if msg is None or "ready" not in msg:
            self.kill()
            why = msg.get("error") if isinstance(msg, dict) else "no answer"
            raise GraderError(f"math grading worker failed to start: {why}")

    def _read(self, timeout: float) -> Optional[dict]:
        """One JSON line from the worker within ``timeout`` seconds; None on timeout or exit."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:  # the worker exited
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError:
            return None

    def kill(self) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        try:
            p.kill()
            p.wait(timeout=10)
        except Exception:  # noqa: BLE001
            pass
        for f in (p.stdin, p.stdout):
            try:
                if f is not None:
                    f.close()
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        """Stop the worker (it holds no state worth a graceful exit)."""
        self.kill()

    def compare(self, pred: str, gold: str, timeout: float) -> bool:
        """math-verify's verdict, or False when it takes longer than ``timeout`` seconds."""
        for attempt in range(2):
            if self.proc is None or self.proc.poll() is not None:
                self.kill()
                self._spawn()
            self.serial += 1
            req = json.dumps({"i": self.serial, "p": pred, "g": gold}) + "\n"
            try:
                assert self.proc is not None and self.proc.stdin is not None
                data = memoryview(req.encode())
                while data:
                    n = self.proc.stdin.write(data)
                    data = data[n or 0 :]
            except (BrokenPipeError, OSError):
                self.kill()
                continue
            msg = self._read(timeout)
            if msg is not None and msg.get("i") == self.serial:
                return bool(msg.get("r"))
            alive = self.proc is not None and self.proc.poll() is None
            self.kill()
            if alive:  # still computing: the deadline passed
                logger.warning("grading timed out after %.1fs; counted wrong: pred=%.80r gold=%.80r", timeout, pred, gold)
                return False
            # the worker died on this input; try once more with a fresh one, then give up
        logger.warning("grading worker crashed twice; counted wrong: pred=%.80r gold=%.80r", pred, gold)
        return False


# --------------------------------------------------------------------------------------------
# The pool
# --------------------------------------------------------------------------------------------


def _default_workers() -> int:
    env = os.environ.get("DIRL_GRADER_WORKERS")
    if env:
        return max(0, int(env))
    return max(1, min(4, os.cpu_count() or 1))


class Grader:
    """A pool of grading workers with a per-comparison deadline and a result cache.

    ``workers=0`` grades in the calling process with no time bound (math-verify's own alarm-based
    timeouts are used when called from the main thread); any other value is a pool of that many
    subprocesses, started on first use. Thread-safe; a copy inherited through ``fork`` starts its
    own workers.
    """

    def __init__(
        self,
        workers: Optional[int] = None,
        timeout: float = DEFAULT_TIMEOUT,
        start_timeout: float = _START_TIMEOUT,
        cache_size: int = 200_000,
        fast_path: bool = True,
        string_fallback: bool = True,
    ):
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.num_workers = _default_workers() if workers is None else int(workers)
        if self.num_workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.timeout = float(timeout)
        self.start_timeout = float(start_timeout)
        self.cache_size = int(cache_size)
        # False: every pair with an answer goes to math-verify (the string fallback still applies)
        self.fast_path = bool(fast_path)
        # False: math-verify alone decides (no cheap path, no normalised-string fallback)
        self.string_fallback = bool(string_fallback)
        self._setup()

    def _setup(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._cache: "OrderedDict[tuple[str, str], bool]" = OrderedDict()
        self._idle: "queue.Queue[_Worker]" = queue.Queue()
        self._workers = [_Worker(self.start_timeout) for _ in range(self.num_workers)]
        for w in self._workers:
            self._idle.put(w)
        self._executor: Optional[ThreadPoolExecutor] = None
        self._closed = False

    def _check_process(self) -> None:
        if os.getpid() != self._pid:  # inherited through fork: the workers belong to the parent
            for w in self._workers:
                w.proc = None  # not ours to kill; the parent still uses it
            self._setup()

    # -- cache --
    def _cache_get(self, key: tuple[str, str]) -> Optional[bool]:
        with self._lock:
            v = self._cache.get(key)
            if v is not None:
                self._cache.move_to_end(key)
            return v

    def _cache_put(self, key: tuple[str, str], value: bool) -> None:
        with self._lock:
            self._cache[key] = value
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    # -- grading --
    def _run_chunk(self, items: list[tuple[str, str]], timeout: float) -> list[bool]:
        worker = self._idle.get()
        try:
            return [worker.compare(p, g, timeout) for p, g in items]
        finally:
            self._idle.put(worker)

    def _inline(self, pred: str, gold: str, timeout: float) -> bool:
        if threading.current_thread() is threading.main_thread():
            from math_verify.errors import TimeoutException
            from math_verify.utils import timeout as mv_timeout

            try:
                return bool(mv_timeout(max(1, int(round(timeout))))(math_verify_equal)(pred, gold))
            except TimeoutException:
                return False
        return math_verify_equal(pred, gold)

    def compare_answers(
        self, pairs: Sequence[tuple[Optional[str], GroundTruth]], timeout: Optional[float] = None
    ) -> list[bool]:
        """Verdicts for (extracted answer, ground truth) pairs; an answer of None is wrong."""
        self._check_process()
        if self._closed:
            raise RuntimeError("this Grader is closed")
        timeout = self.timeout if timeout is None else float(timeout)
        out: list[Optional[bool]] = [None] * len(pairs)
        todo: dict[tuple[str, str], list[int]] = {}
        for i, (pred, gt) in enumerate(pairs):
            gold = gold_answer(gt)
            if self.fast_path and self.string_fallback:
                cheap = _cheap_decision(pred, gold)
            else:
                cheap = False if pred is None or not pred.strip() else None
            if cheap is not None:
                out[i] = cheap
                continue
            key = (str(pred), gold)
            hit = self._cache_get(key)
            if hit is not None:
                out[i] = hit
                continue
            todo.setdefault(key, []).append(i)
        if todo:
            keys = list(todo)
            if self.num_workers == 0:
                verdicts = [self._inline(p, g, timeout) for p, g in keys]
            else:
                n = min(self.num_workers, len(keys))
                chunks = [keys[j::n] for j in range(n)]
                if n == 1:
                    results = [self._run_chunk(chunks[0], timeout)]
                else:
                    with self._lock:
                        if self._executor is None:
                            self._executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix="dirl-grade")
                        ex = self._executor
                    futs = [ex.submit(self._run_chunk, c, timeout) for c in chunks]
                    results = [f.result() for f in futs]
                verdicts = [None] * len(keys)
                for j, res in enumerate(results):
                    for k, v in zip(range(j, len(keys), n), res):
                        verdicts[k] = v
            if not self.fast_path and self.string_fallback:  # the normalised-string fallback
                verdicts = [v or _cheap_decision(p, g) is True for (p, g), v in zip(keys, verdicts)]
            for key, v in zip(keys, verdicts):
                self._cache_put(key, bool(v))
                for i in todo[key]:
                    out[i] = bool(v)
        return [bool(v) for v in out]

    def grade_many(self, pairs: Iterable[tuple[str, GroundTruth]], timeout: Optional[float] = None) -> list[bool]:
        """Verdicts for (response, ground truth) pairs: the last boxed answer of each response."""
        pairs = list(pairs)
        return self.compare_answers([(extract_answer(r), gt) for r, gt in pairs], timeout=timeout)

    def is_correct(self, response: str, ground_truth: GroundTruth, timeout: Optional[float] = None) -> bool:
        return self.grade_many([(response, ground_truth)], timeout=timeout)[0]

    def warm_up(self) -> None:
        """Start every worker now (otherwise they start on first use)."""
        self._check_process()
        ws = [self._idle.get() for _ in range(self.num_workers)]
        try:
            for w in ws:
                if w.proc is None or w.proc.poll() is not None:
                    w.kill()
                    w._spawn()
        finally:
            for w in ws:
                self._idle.put(w)

    def close(self) -> None:
        """Stop the workers (a later call raises)."""
        if os.getpid() != self._pid:
            return
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        for w in self._workers:
            w.close()

    def __enter__(self) -> "Grader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# The default pool and the functional API
# --------------------------------------------------------------------------------------------

_default: Optional[Grader] = None
_default_lock = threading.Lock()


def get_grader() -> Grader:
    """The process-wide grader (created on first use; one per process)."""
    global _default
    g = _default
    if g is None or g._pid != os.getpid() or g._closed:
        with _default_lock:
            g = _default
            if g is None or g._pid != os.getpid() or g._closed:
                g = _default = Grader()
    return g


def configure_grader(workers: Optional[int] = None, timeout: float = DEFAULT_TIMEOUT) -> Grader:
    """Replace the process-wide grader (e.g. a different worker count or deadline)."""
    global _default
    with _default_lock:
        old, _default = _default, Grader(workers=workers, timeout=timeout)
    if old is not None and old._pid == os.getpid():
        old.close()
    return _default


def _close_default() -> None:
    g = _default
    if g is not None and g._pid == os.getpid():
        g.close()


atexit.register(_close_default)


def is_correct(response: str, ground_truth: GroundTruth, timeout: Optional[float] = None) -> bool:
    """Whether the last ``\\boxed{...}`` of ``response`` equals ``ground_truth``.

    math-verify decides (gold parsed as ``\\boxed{ground_truth}``), with a normalised-string
    fallback; no boxed answer is wrong; a comparison running past ``timeout`` seconds (default 5)
    is wrong. ``ground_truth`` may be a GSM8K worked answer (``... #### 42``) or a list of strings.
    Safe from any thread or process.
    """
    return get_grader().is_correct(response, ground_truth, timeout=timeout)


def grade_many(pairs: Iterable[tuple[str, GroundTruth]], timeout: Optional[float] = None) -> list[bool]:
    """:func:`is_correct` for many (response, ground truth) pairs, spread over the worker pool."""
    return get_grader().grade_many(pairs, timeout=timeout)
