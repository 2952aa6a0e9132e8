"""dirl's own calls raise no FutureWarning or DeprecationWarning from transformers, torch or accelerate.

A deprecation warning announces that the call stops working at a later release; the upper bounds in
pyproject.toml assume none is left. The check runs the main code paths on the tiny model (model
write and load, the cached engine and the naive decoder, trajectory scoring in both layouts, a
two-step SFT run through Accelerate, the rollout client against a real server on 127.0.0.1 with a
weight push) with every warning shown ("always"), and keeps each FutureWarning/DeprecationWarning
that comes from one of those libraries while a dirl frame is on the stack. Warnings raised while a
library imports its own modules are not dirl's calls and are left out, as are warnings from other
libraries (a deprecation inside, say, uvicorn is that library's business).

A failure lists each warning once with the dirl line that made the call and, in parentheses, the
nearest dirl caller in another file, e.g. ``FutureWarning from transformers/output_capturing.py:361
called at dirl/model/sdar.py:153 (from dirl/rollout/engine.py:339): `past_key_values` is
deprecated ...``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

import dirl

DIRL_DIR = str(Path(dirl.__file__).resolve().parent)
WATCHED = ("transformers", "torch", "accelerate")
KINDS = (FutureWarning, DeprecationWarning)


def _top(frame) -> str:
    return str(frame.f_globals.get("__name__") or "").split(".", 1)[0]


def _is_dirl(frame) -> bool:
    return _top(frame) == "dirl" or str(Path(frame.f_code.co_filename).resolve()).startswith(DIRL_DIR)


def _short(frame) -> str:
    path = Path(frame.f_code.co_filename).resolve()
    try:
        path = path.relative_to(Path(DIRL_DIR).parent)
    except ValueError:
        pass
    return f"{path}:{frame.f_lineno}"


class DeprecationRecorder:
    """Collect deprecation warnings raised from dirl's calls, with the calling dirl frame.

    ``warnings.showwarning`` is called synchronously inside ``warnings.warn``, so the stack at that
    moment is the stack of the call that warned. A frame's library is the top-level package of its
    module (``transformers.utils.output_capturing`` -> transformers).
    """

    def __init__(self) -> None:
        self.found: dict[tuple, str] = {}
        self._ctx = warnings.catch_warnings()

    def __enter__(self) -> "DeprecationRecorder":
        self._ctx.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self._show
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        if not issubclass(category, KINDS):
            return
        stack = []  # outermost first
        f = sys._getframe(1)
        while f is not None:
            stack.append(f)
            f = f.f_back
        stack.reverse()
        dirl_frames = [i for i, fr in enumerate(stack) if _is_dirl(fr)]
        if not dirl_frames:
            return
        caller = dirl_frames[-1]
        below = stack[caller + 1:]
        # the innermost dirl frame is an import statement that loads a library: library-internal
        if any(fr.f_code.co_filename.startswith("<frozen importlib") for fr in below):
            return
        origin = next((fr for fr in reversed(below) if fr.f_code.co_filename == filename), None)
        libs = [_top(origin)] if origin is not None else []
        libs += [_top(fr) for fr in below]
        lib = next((name for name in libs if name in WATCHED), None)
        if lib is None or (origin is not None and _top(origin) not in WATCHED):
            return  # raised by another library (uvicorn, datasets, ...), or by the standard library
        where = _short(stack[caller])
        outer = [i for i in dirl_frames if stack[i].f_code.co_filename != stack[caller].f_code.co_filename]
        if outer:  # the nearest dirl caller in another file, e.g. the engine calling the model wrapper
            where += f" (from {_short(stack[outer[-1]])})"
        origin_s = f"{lib}/{Path(filename).name}:{lineno}"
        first = str(message).strip().splitlines()[0] if str(message).strip() else ""
        key = (category.__name__, where, first)
        self.found.setdefault(key, f"{category.__name__} from {origin_s} called at {where}: {first}")

    def report(self) -> str:
        return "\n".join(sorted(self.found.values()))

    def check(self, path: str) -> None:
        if self.found:
            pytest.fail(f"deprecated calls on dirl's {path} path:\n{self.report()}", pytrace=False)


def _requests(model, n: int = 3, max_new: int = 12):
    from dirl.rollout.backend import GenerateRequest

    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(5, model.config.vocab_size, (3 + 2 * i,), generator=g).tolist()
        out.append(GenerateRequest(request_id=f"w{i}", input_ids=ids, max_new_tokens=max_new, temperature=1.0,
                                   top_k=0, top_p=1.0, do_sample=bool(i % 2), stop_token_ids=[], seed=i))
    return out


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_model_engine_and_scoring_raise_no_deprecation_warning(tmp_path, one_thread):
    from dirl.model.sdar import load_model, load_tokenizer
    from dirl.model.tiny import make_tiny_model
    from dirl.rollout.engine import Engine
    from dirl.rollout.naive import naive_generate
    from dirl.train.score import score_trajectories

    with DeprecationRecorder() as rec:
        path = make_tiny_model(tmp_path / "tiny")
        model = load_model(path, device="cpu", dtype="float32")
        model.eval()
        tok = load_tokenizer(path)
        reqs = _requests(model)
        with torch.no_grad():
            trajs = Engine(model, tok, denoising_steps=4).generate(reqs)
            naive_generate(model, reqs[:1], denoising_steps=4)
        for layout in ("packed", "rounds"):
            score_trajectories(model, trajs, layout=layout)
    rec.check("model/engine/scoring")


def test_sft_run_raises_no_deprecation_warning(tmp_path, one_thread):
    from dirl.train.sft import load_sft_config, train_sft

    small = ["model.tiny.hidden_size=32", "model.tiny.num_hidden_layers=1", "model.tiny.head_dim=16",
             "model.tiny.intermediate_size=64", "data.num_samples=16", "data.max_length=64",
             "logging.progress_bar=false", "logging.tensorboard=false", "train.max_steps=2",
             "train.global_batch_size=4", "train.micro_batch_size=2", "train.save_every=2",
             f"output_dir={tmp_path}", "run_name=warn"]
    with DeprecationRecorder() as rec:
        train_sft(load_sft_config(None, small))
    rec.check("SFT")


def test_rollout_client_and_server_raise_no_deprecation_warning(tmp_path, one_thread):
    from test_client import DECODING, ThreadServer

    from dirl.model.tiny import make_tiny_model
    from dirl.rollout.backend import ReferenceBackend
    from dirl.rollout.client import RolloutClient

    with DeprecationRecorder() as rec:
        path = make_tiny_model(tmp_path / "tiny")
        backend = ReferenceBackend(str(path), decoding=DECODING, device="cpu")
        server = ThreadServer(backend)
        try:
            client = RolloutClient([server.url], max_concurrency=2, batch_size=2)
            out = client.generate([{"prompt": "1+2=", "max_new_tokens": 6}, {"prompt": "3+4=", "max_new_tokens": 6,
                                                                            "do_sample": True, "seed": 1}])
            assert len(out) == 2
            client.info()
            client.push_weights(backend.model.hf.state_dict(), transport="inline", segment_bytes=256 << 10)
            assert client.generate([{"prompt": "1+2=", "max_new_tokens": 6}])[0]["token_ids"] == out[0]["token_ids"]
        finally:
            server.stop()
    rec.check("rollout client/server")


def _code_at(module: str, path: str, src: str) -> dict:
    """Functions whose frames belong to ``module`` at ``path`` (for the recorder's self-check)."""
    scope: dict = {"warnings": warnings, "__name__": module}
    exec(compile(src, path, "exec"), scope)
    return scope


def test_recorder_keeps_only_library_deprecations_under_a_dirl_frame():
    """The recorder itself: a FutureWarning raised inside a watched library's frame called from dirl
    is kept, and so is one the library attributes to dirl's line (stacklevel=2); one from an
    unwatched library, one with no dirl frame and a UserWarning are not."""
    lib = _code_at("torch._fake_for_test", str(Path(torch.__file__).parent / "_fake_for_test.py"),
                   "def old():\n    warnings.warn('old is deprecated', FutureWarning, stacklevel=1)\n"
                   "def note():\n    warnings.warn('just a note', UserWarning)\n"
                   "def blame_caller():\n    warnings.warn('arg is deprecated', DeprecationWarning, stacklevel=2)\n")
    other = _code_at("otherlib.mod", "/opt/torch/.venv/site-packages/otherlib/mod.py",
                     "def old():\n    warnings.warn('otherlib: deprecated', DeprecationWarning)\n")
    caller = _code_at("dirl._fake_caller", str(Path(DIRL_DIR) / "_fake_caller.py"),
                      "def call(f):\n    f()\n")
    with DeprecationRecorder() as rec:
        caller["call"](lib["old"])
        caller["call"](lib["note"])
        caller["call"](lib["blame_caller"])  # attributed to dirl's line, raised by torch
        caller["call"](other["old"])
        lib["old"]()  # no dirl frame
    assert sorted(rec.found) == [("DeprecationWarning", "dirl/_fake_caller.py:2", "arg is deprecated"),
                                 ("FutureWarning", "dirl/_fake_caller.py:2", "old is deprecated")], rec.report()
    assert "FutureWarning from torch/_fake_for_test.py:2 called at dirl/_fake_caller.py:2" in rec.report()
