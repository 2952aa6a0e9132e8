"""Shared fixtures: a tiny SDAR model (a few hundred thousand parameters) made once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n N` runs N workers side by side: one thread each (and for the processes they start),
    # or the workers' OpenMP pools fight over the cores
    if not os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() or int(os.environ["OMP_NUM_THREADS"]) < 1:
        os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# The local benchmark copies: ../shared next to the checkout, or $DIRL_SHARED_DIR.
SHARED = Path(os.environ.get("DIRL_SHARED_DIR") or Path(__file__).resolve().parents[1].parent / "shared")
BENCHMARKS = SHARED / "data" / "benchmarks"
_SHARED_SKIP = "the ../shared folder is absent"
_NOTE = pytest.StashKey[tuple]()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from dirl.model.tiny import make_tiny_model

    out = tmp_path_factory.mktemp("tiny") / "model"
    make_tiny_model(out)
    return out


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(model, tokenizer) loaded from the tiny checkpoint, fp32 on CPU, eval mode."""
    from dirl.model.sdar import load_model, load_tokenizer

    model = load_model(tiny_dir, device="cpu", dtype="float32")
    model.eval()
    return model, load_tokenizer(tiny_dir)


@pytest.fixture
def benchmarks_dir() -> Path:
    if not BENCHMARKS.is_dir():
        pytest.skip(f"local benchmark copies not found at {BENCHMARKS} ({_SHARED_SKIP})")
    return BENCHMARKS


@pytest.fixture
def one_thread():
    """Tiny forwards are fastest on one torch thread, and far slower with two on a busy 2-core
    machine; modules of many small forwards use it (``pytestmark = pytest.mark.usefixtures(...)``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """The tests marked ``first`` (the longest) go first, in their order; the rest keep theirs. Under
    ``pytest -n`` a worker starts on each at once and the others fill in beside them, instead of
    one worker finishing the longest test alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("first") is None)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Names the tests skipped for want of ../shared (printed as the run's last line, below pytest's
    counts, by pytest_unconfigure), so a green run without the benchmark copies cannot pass for a
    full one."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if _SHARED_SKIP in str(r.longrepr)]
    if not skipped:
        return
    names = sorted({r.nodeid.split("[")[0] for r in skipped})
    config.stash[_NOTE] = (terminalreporter, (
        f"NOTE: {len(skipped)} tests skipped because {BENCHMARKS} is absent (the ../shared folder with "
        f"the benchmark copies; set DIRL_SHARED_DIR to its path): {', '.join(names)}"))


def pytest_unconfigure(config):
    note = config.stash.get(_NOTE, None)
    if note is not None:
        reporter, line = note
        reporter.write_line(line, yellow=True, bold=True)
