"""Evaluation: metrics, benchmark loading, report files, resume, and a tiny end-to-end run through a
real rollout server."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dirl.config import ConfigError, load_config
from dirl.data.benchmarks import (
    BENCHMARKS,
    DIRL_TEMPLATE,
    _parse_hub,
    canonical_name,
    format_prompt,
    load_benchmark,
    read_rows,
    resolve_source,
)
from dirl.eval.metrics import average_metrics, benchmark_metrics, default_pass_ks, pass_at_k
from dirl.eval.report import markdown_table, write_report
from dirl.eval.run import EvalConfig, _open_for_append, read_responses, run_eval
from dirl.rollout.requests import request_seed
from dirl.train.checkpoint import newest_checkpoint, resolve_model_dir, write_tiny_model

# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)
    assert pass_at_k(5, 2, 4) == 1.0  # fewer than 4 wrong samples
    assert pass_at_k(16, 1, 8) == pytest.approx(0.5)
    assert pass_at_k(16, 0, 16) == 0.0
    assert pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_default_pass_ks():
    assert default_pass_ks(1) == [1]
    assert default_pass_ks(16) == [1, 2, 4, 8, 16]
    assert default_pass_ks(6) == [1, 2, 4, 6]


def _rec(pid, sample, correct, n=10, tps=2.0, finish="stop"):
    return {"problem_id": pid, "sample": sample, "correct": correct, "response_length": n, "tokens_per_step": tps,
            "num_steps": n / tps if tps else 0, "finish_reason": finish, "has_answer": True}


def test_benchmark_metrics_hand_made():
    recs = [
        _rec("a", 0, True, n=10, tps=2.0), _rec("a", 1, False, n=20, tps=4.0),
        _rec("b", 0, False, n=30, tps=1.0, finish="length"), _rec("b", 1, False, n=40, tps=1.0),
    ]
    m = benchmark_metrics(recs)
    assert m["num_problems"] == 2 and m["num_responses"] == 4 and m["samples_per_problem"] == 2
    assert m["accuracy"] == pytest.approx(0.25)
    assert m["pass@1"] == pytest.approx(0.25)
    assert m["pass@2"] == pytest.approx(0.5)
    assert m["tokens_per_step"] == pytest.approx(2.0)
    assert m["steps_per_response"] == pytest.approx((5 + 5 + 30 + 40) / 4)
    assert m["mean_response_length"] == pytest.approx(25.0)
    assert m["truncation_rate"] == pytest.approx(0.25)
    assert m["answer_rate"] == 1.0
    # sample rounds: round 0 = 0.5, round 1 = 0.0
    assert m["accuracy_std_over_samples"] == pytest.approx(0.25)
    # a missing step map (backend without one) leaves tokens/step out
    m2 = benchmark_metrics([dict(r, tokens_per_step=None) for r in recs], pass_ks=[1])
    assert m2["tokens_per_step"] is None and "pass@2" not in m2
    m3 = benchmark_metrics([dict(r, num_steps=None) for r in recs] + [_rec("c", 0, True, n=0, tps=0.0)])
    assert m3["steps_per_response"] is None  # no step map, and an empty response has no steps
    avg = average_metrics({"x": m, "y": dict(m, accuracy=0.75)})
    assert avg["accuracy"] == pytest.approx(0.5) and avg["num_benchmarks"] == 2
    assert avg["pass@2"] == pytest.approx(0.5)


def test_report_files(tmp_path):
    recs = [_rec("a", 0, True), _rec("a", 1, False)]
    per = {"synthetic": benchmark_metrics(recs), "gsm8k": benchmark_metrics([_rec("q", 0, True), _rec("q", 1, True)])}
    avg = average_metrics(per)
    table = markdown_table(per, avg)
    lines = table.strip().splitlines()
    assert lines[0].startswith("| benchmark | problems | k | accuracy (avg@k) % | pass@1 % | pass@2 %")
    assert lines[0].endswith("| tokens/step | steps/response | mean length | truncated % | boxed % |")
    assert lines[2].startswith("| synthetic | 1 | 2 | 50.0 | 50.0 | 100.0 | 2.00 | 5.0 | 10.0 | 0.0 | 100.0 |")
    assert lines[-1].startswith("| **average** |  |  | 75.0 |")
    jpath, mpath = write_report(tmp_path, per, avg, {"model": "m"})
    data = json.loads(jpath.read_text())
    assert data["benchmarks"]["gsm8k"]["accuracy"] == 1.0 and data["average"]["accuracy"] == 0.75
    assert "| synthetic |" in mpath.read_text() and "**model**: m" in mpath.read_text()


# --------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------


def test_prompt_template():
    assert format_prompt("What is 1+1?") == (
        "What is 1+1?\nPlease reason step by step, and put your final answer within $\\boxed{}$."
    )
    assert DIRL_TEMPLATE.format(question="Q").endswith("within $\\boxed{}$.")


def test_names_and_sources(tmp_path):
    assert canonical_name("AIME24") == "aime2024" and canonical_name("math") == "math500"
    with pytest.raises(ValueError):
        canonical_name("nope")
    assert resolve_source("gsm8k") == "openai/gsm8k"
    assert _parse_hub("openai/gsm8k", BENCHMARKS["gsm8k"]) == ("openai/gsm8k", "main", "test")
    assert _parse_hub("Hothan/OlympiadBench", BENCHMARKS["olympiadbench"]) == (
        "Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train")
    assert _parse_hub("me/aime:cfg@validation", BENCHMARKS["aime2025"]) == ("me/aime", "cfg", "validation")
    (tmp_path / "aime25.jsonl").write_text('{"problem": "p", "answer": "7"}\n')
    assert resolve_source("aime2025", data_dir=str(tmp_path)) == str(tmp_path / "aime25.jsonl")
    assert resolve_source("aime2025", source=str(tmp_path)) == str(tmp_path / "aime25.jsonl")
    # a file that is not there is named as such (not tried as a Hub name), by the key that gave it
    with pytest.raises(FileNotFoundError, match="file '.*my_test.jsonl' does not exist"):
        resolve_source("math500", source=str(tmp_path / "nope" / "my_test.jsonl"))
    assert resolve_source("math500", source="me/my-math") == "me/my-math"  # a Hub name stays one
    with pytest.raises(ConfigError, match=r"^config key 'data.sources.math500': file '.*my_test.jsonl' does not exist"):
        load_config(EvalConfig, None, ["data.benchmarks=[math500]",
                                       f"data.sources.math500={tmp_path / 'nope' / 'my_test.jsonl'}"])


def test_bad_problem_rows_name_their_line(tmp_path):
    """eval's and RL's problem files: a bad row is one DataError naming file:line (the line of the
    file, blank lines counted), never a traceback; JSON Lines break at \\n only."""
    from dirl.data.formats import DataError
    from dirl.train.rl.config import RLDataConfig
    from dirl.train.rl.prompts import load_problems

    def loaders(path):
        return (lambda: load_benchmark("math500", source=str(path)),
                lambda: load_problems(RLDataConfig(source=str(path))))

    # U+2028 and U+0085 inside a string are text (str.splitlines would break the line there)
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"question": "a\u2028b\u0085c", "answer": "5"}, ensure_ascii=False) + "\n",
                  encoding="utf-8")
    for load in loaders(ok):
        (p,) = load()
        assert p["question"] == "a\u2028b\u0085c" and p["answer"] == "5"
    good = json.dumps({"question": "q", "answer": "1"})
    cases = {
        "missing.jsonl": (good + "\n\n" + json.dumps({"question": "q"}) + "\n", ":3: no answer field"),
        "list.jsonl": (good + "\n[1, 2]\n", ":2: expected"),
        "string.jsonl": ('"just a string"\n', ":1: expected"),
        "bool.jsonl": (json.dumps({"question": "q", "answer": True}) + "\n", ":1: unusable answer True"),
        "dict.jsonl": (json.dumps({"question": "q", "answer": {"value": 5}}) + "\n", ":1: unusable answer"),
        "empty.jsonl": (json.dumps({"question": "q", "answer": ""}) + "\n", ":1: empty gold answer"),
        "question.jsonl": (json.dumps({"question": ["q"], "answer": "1"}) + "\n", ":1: the question must be"),
        "array.json": ("[" + good + ",\n 3]", ":2: expected a JSON object, got int"),
        "notjson.jsonl": (good + "\n{oops\n", ":2: invalid JSON"),
    }
    for name, (text, msg) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        for load in loaders(path):
            with pytest.raises(DataError) as e:
                load()
            assert str(e.value).startswith(str(path)) and msg in str(e.value), (name, str(e.value))


def test_local_formats(tmp_path):
    rows = [{"question": "Q1", "final_answer": ["$\\frac{1}{2}$"]}, {"question": "Q2", "final_answer": ["$3$,$4$"]}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps({"data": rows}))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    for f in ("a.jsonl", "a.json", "a.parquet"):
        assert read_rows(tmp_path / f) == rows, f
        ps = load_benchmark("olympiadbench", source=str(tmp_path / f))
        assert [p["answer"] for p in ps] == ["\\frac{1}{2}", "3,4"]
        assert ps[0]["prompt"] == format_prompt("Q1") and ps[1]["id"] == "1"


def test_json_object_files_name_their_rows(tmp_path):
    """A JSON object file: its rows are under a known key (data, rows, ...) or in its only list;
    several unnamed lists are an error, not a guess. A null id is the row's index, not "None"."""
    from dirl.data.formats import DataError
    from dirl.train.rl.config import RLDataConfig
    from dirl.train.rl.prompts import load_problems

    rows = [{"question": "Q1", "answer": "1", "id": None}, {"question": "Q2", "answer": "2"}]
    meta = [{"author": "x"}]
    (tmp_path / "named.json").write_text(json.dumps({"meta": meta, "data": rows}))
    (tmp_path / "only.json").write_text(json.dumps({"version": 1, "items": rows}))
    (tmp_path / "two.json").write_text(json.dumps({"meta": meta, "items": rows}))
    for name in ("named.json", "only.json"):
        assert [r["question"] for r in read_rows(tmp_path / name)] == ["Q1", "Q2"], name
        assert [p["id"] for p in load_problems(RLDataConfig(source=str(tmp_path / name)))] == ["0", "1"]
    with pytest.raises(DataError, match=r"two.json:1: several lists of objects \('meta', 'items'\)"):
        read_rows(tmp_path / "two.json")


def test_gsm8k_from_other_schema(tmp_path):
    (tmp_path / "g.jsonl").write_text(json.dumps({"question": "Q", "answer": "work\n#### 1,234"}) + "\n")
    assert load_benchmark("gsm8k", source=str(tmp_path / "g.jsonl"))[0]["answer"] == "1234"


def test_real_benchmarks_field_mapping(benchmarks_dir):
    sizes = {"math500": 500, "gsm8k": 1319, "aime2024": 30, "aime2025": 30, "olympiadbench": 675}
    for name, n in sizes.items():
        ps = load_benchmark(name, data_dir=str(benchmarks_dir))
        assert len(ps) == n
        assert all(p["answer"] and "####" not in p["answer"] and "$" not in p["answer"].replace("\\$", "") for p in ps)
        assert all(p["prompt"].endswith("put your final answer within $\\boxed{}$.") for p in ps)
    g = load_benchmark("gsm8k", data_dir=str(benchmarks_dir), limit=1)[0]
    assert g["answer"] == "18" and g["question"].startswith("Janet")
    m = load_benchmark("math500", data_dir=str(benchmarks_dir), limit=1)[0]
    assert m["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)" and m["meta"]["level"] == 2
    sub = load_benchmark("math500", data_dir=str(benchmarks_dir), limit=5, subset_seed=3)
    assert len(sub) == 5 and sub == load_benchmark("math500", data_dir=str(benchmarks_dir), limit=5, subset_seed=3)
    assert [p["id"] for p in sub] != ["0", "1", "2", "3", "4"]


def test_synthetic_benchmark_matches_sft_prompt():
    from dirl.data.synthetic import synthetic_problems

    ps = load_benchmark("synthetic", synthetic_size=20, limit=5)
    rows = synthetic_problems("test", n=20, seed=0)[:5]
    assert [p["prompt"] for p in ps] == [r["prompt"] for r in rows]
    assert ps[0]["prompt"].startswith("What is ") and ps[0]["answer"] == rows[0]["answer"]


# --------------------------------------------------------------------------------------------
# Config, seeds, resume plumbing
# --------------------------------------------------------------------------------------------


def test_eval_configs_load():
    for f in ("configs/eval_default.yaml", "configs/eval_sdar8b.yaml", "configs/eval_sdar8b_static.yaml"):
        cfg = load_config(EvalConfig, f)
        assert cfg.num_samples >= 1
    c8 = load_config(EvalConfig, "configs/eval_sdar8b.yaml")
    d = c8.decoding
    assert (c8.num_samples, d.temperature, d.top_k, d.top_p, d.max_new_tokens) == (16, 1.0, 50, 1.0, 8192)
    assert (d.block_size, d.denoising_steps, d.confidence_threshold, d.unmasking_strategy) == (
        4, 4, 0.9, "low_confidence_dynamic")
    assert load_config(EvalConfig, "configs/eval_sdar8b_static.yaml").decoding.unmasking_strategy == "low_confidence_static"
    assert len(c8.data.benchmarks) == 5


def test_eval_config_errors():
    with pytest.raises(ConfigError, match="data.benchmarks"):
        load_config(EvalConfig, None, ["data.benchmarks=[mathh]"])
    with pytest.raises(ConfigError, match="pass_k"):
        load_config(EvalConfig, None, ["num_samples=2", "pass_k=[4]"])
    with pytest.raises(ConfigError, match="model.path"):
        load_config(EvalConfig, None, ["model.path=/does/not/exist"])


def test_local_server_threads_and_backend_options(tmp_path, tiny_dir):
    """A local server gets 1 torch thread on CPU unless told otherwise, torch's choice on CUDA, and
    the config's backend options."""
    from dirl.rollout.launch import ModelFacts, server_start_args, server_threads

    assert server_threads(None, "cpu") == 1 and server_threads(None, "cuda:1") is None
    assert server_threads(0, "cpu") is None and server_threads(4, "cpu") == 4 and server_threads(2, "cuda") == 2
    for extra, threads, options in (([], 1, None), (["server.threads=3"], 3, None), (["server.threads=0"], None, None),
                                    (["server.backend_options.max_batch_size=8"], 1, {"max_batch_size": 8})):
        cfg = _tiny_eval_cfg(tiny_dir, tmp_path, *extra)
        args = server_start_args(cfg.server, tiny_dir, ModelFacts(None, None, cfg.decoding, cfg.model.dtype))
        assert (args["device"], args["threads"], args["backend_options"]) == ("cpu", threads, options)
    with pytest.raises(ConfigError, match="server.threads"):
        _tiny_eval_cfg(tiny_dir, tmp_path, "server.threads=-1")


def test_request_seeds_distinct_and_stable():
    seeds = [request_seed(0, "math500:7", j) for j in range(16)]
    assert len(set(seeds)) == 16
    assert seeds[:4] == [request_seed(0, "math500:7", j) for j in range(4)]
    assert request_seed(1, "math500:7", 0) != seeds[0]


def test_responses_file_survives_a_torn_line(tmp_path):
    p = tmp_path / "responses.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b"')
    assert read_responses(p) == [{"a": 1}, {"a": 2}]
    with _open_for_append(p) as f:
        f.write('{"a": 4}\n')
    assert read_responses(p) == [{"a": 1}, {"a": 2}, {"a": 4}]


def test_model_resolution(tmp_path, tiny_dir):
    import shutil

    run = tmp_path / "runs" / "sft-x"
    ck = run / "checkpoints" / "step_00000010"
    shutil.copytree(tiny_dir, ck / "model")
    assert newest_checkpoint(tmp_path / "runs") is None  # not COMPLETE yet
    (ck / "COMPLETE").write_text("")
    assert newest_checkpoint(tmp_path / "runs") == ck / "model"
    assert resolve_model_dir(run) == ck / "model"
    assert resolve_model_dir(ck) == ck / "model"
    assert resolve_model_dir(tiny_dir) == tiny_dir


def test_default_model_is_never_an_untrained_folder_of_another_command(tmp_path, tiny_dir):
    """Eval's default model: the newest complete training checkpoint, never an RL run's untrained
    initial_model (even when it is the newest folder), nor eval's own tiny-model."""
    import shutil

    runs = tmp_path / "runs"
    write_tiny_model(runs / "rl-x" / "initial_model")
    shutil.copytree(tiny_dir, runs / "rl-y" / "initial_model")  # an unmarked copy: still not a checkpoint
    write_tiny_model(runs / "eval" / "tiny-untrained-abc" / "tiny-model")
    assert newest_checkpoint(runs) is None
    ck = runs / "sft-a" / "checkpoints" / "step_00000004"
    shutil.copytree(tiny_dir, ck / "model")
    (ck / "trainer_state.json").write_text('{"step": 4, "kind": "sft"}')
    (ck / "COMPLETE").write_text("")
    write_tiny_model(runs / "rl-z" / "initial_model")  # newer than the checkpoint
    assert newest_checkpoint(runs) == ck / "model"
    assert newest_checkpoint(runs, kinds=("sft",)) == ck / "model" and newest_checkpoint(runs, kinds=("rl",)) is None


# --------------------------------------------------------------------------------------------
# End to end through a real server
# --------------------------------------------------------------------------------------------


def _tiny_eval_cfg(tiny_dir, out, *extra):
    return load_config(EvalConfig, None, [
        f"model.path={tiny_dir}", f"output_dir={out}", "data.benchmarks=[synthetic]", "data.synthetic_size=6",
        "num_samples=2", "decoding.max_new_tokens=8", "server.device=cpu", "progress_bar=false",
        "problems_per_batch=4", "grading_workers=1", *extra,
    ])


def test_end_to_end_tiny_eval(tmp_path, tiny_dir, monkeypatch):
    pytest.importorskip("dirl.rollout.server")
    out = tmp_path / "eval"
    res = run_eval(_tiny_eval_cfg(tiny_dir, out))
    for f in ("config.yaml", "eval_state.json", "responses.jsonl", "metrics.json", "report.md"):
        assert (out / f).is_file(), f
    recs = read_responses(out / "responses.jsonl")
    assert len(recs) == 12
    assert {(r["problem_id"], r["sample"]) for r in recs} == {(str(i), j) for i in range(6) for j in range(2)}
    for r in recs:
        assert r["finish_reason"] in ("stop", "length") and r["question"].startswith("What is ")
        assert 0 <= r["response_length"] <= 8 + 3
        assert r["tokens_per_step"] is None or 1.0 <= r["tokens_per_step"] <= 4.0
        assert r["correct"] is False or r["finish_reason"] == "stop"
    # the two samples of a problem were drawn with different seeds
    assert len({r["seed"] for r in recs}) == 12
    m = json.loads((out / "metrics.json").read_text())
    syn = m["benchmarks"]["synthetic"]
    assert syn["num_problems"] == 6 and syn["num_responses"] == 12 and "pass@2" in syn
    assert syn == res["benchmarks"]["synthetic"]
    assert m["info"]["server"]["block_size"] == 4
    assert "| synthetic | 6 | 2 |" in (out / "report.md").read_text()

    # a re-run finds everything done: no server is started, nothing is appended
    import dirl.eval.run as run_mod

    def no_server(*a, **k):
        raise AssertionError("a finished evaluation must not start a server")

    monkeypatch.setattr(run_mod, "open_servers", no_server)
    res2 = run_eval(_tiny_eval_cfg(tiny_dir, out))
    assert len(read_responses(out / "responses.jsonl")) == 12
    assert res2["benchmarks"] == res["benchmarks"]
    # other decoding settings in the same folder are refused
    with pytest.raises(ConfigError, match="other settings"):
        run_eval(_tiny_eval_cfg(tiny_dir, out, "decoding.temperature=0.5"))


@pytest.mark.slow
def test_resume_and_external_server(tmp_path, tiny_dir):
    """An interrupted evaluation (half the responses on disk, a torn line) resumes against a server
    given by URL and ends with exactly the missing responses; more samples extend it."""
    from dirl.rollout.launch import start_server

    out = tmp_path / "eval"
    with start_server(tiny_dir, device="cpu") as srv:
        cfg = _tiny_eval_cfg(tiny_dir, out, f"server.urls=[{srv.url}]")
        run_eval(cfg)
        recs = read_responses(out / "responses.jsonl")
        keep = [r for r in recs if int(r["problem_id"]) < 3]
        with (out / "responses.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
            f.write('{"benchmark": "synthetic", "problem_')
        run_eval(cfg)
        again = read_responses(out / "responses.jsonl")
        assert len(again) == 12
        assert {(r["problem_id"], r["sample"]): r["seed"] for r in again} == {
            (r["problem_id"], r["sample"]): r["seed"] for r in recs}
        res = run_eval(_tiny_eval_cfg(tiny_dir, out, f"server.urls=[{srv.url}]", "num_samples=3"))
        assert len(read_responses(out / "responses.jsonl")) == 18
        assert res["benchmarks"]["synthetic"]["samples_per_problem"] == 3
        # Other problems under the same ids never count as done: the folder refuses them...
        other = tmp_path / "other.jsonl"
        other.write_text("".join(json.dumps({"question": f"What is {a}+{a}?", "answer": str(2 * a)}) + "\n"
                                 for a in (50, 60, 70)))
        for extra in ("data.synthetic_seed=1", f"data.sources.synthetic={other}"):
            with pytest.raises(ConfigError, match="problems"):
                run_eval(_tiny_eval_cfg(tiny_dir, out, f"server.urls=[{srv.url}]", "num_samples=3", extra))
        # ... and the default folder of each data set is its own, holding its own questions.
        runs = tmp_path / "runs"
        for source in (None, other):
            cfg = _tiny_eval_cfg(tiny_dir, out, "output_dir=''", f"server.urls=[{srv.url}]", f"runs_dir={runs}",
                                 *([f"data.sources.synthetic={source}"] if source else []))
            res = run_eval(cfg)
            rows = read_responses(Path(res["output_dir"]) / "responses.jsonl")
            want = {p["question"] for p in load_benchmark("synthetic", source=str(source) if source else None,
                                                          synthetic_size=6)}
            assert {r["question"] for r in rows} == want and len(rows) == 2 * len(want)
        assert len(list((runs / "eval").iterdir())) == 2


def test_every_command_takes_a_run_or_step_folder_as_its_model(tmp_path, tiny_dir):
    """``model.path`` (SFT, RL, eval) and ``--model`` (serve, rollout) take a model folder, a
    training checkpoint or a run folder alike; the config checks (which run before torch is
    imported) resolve them as the commands do."""
    import shutil

    from dirl.config import ConfigError, model_folder
    from dirl.rollout.cli import cli_main as rollout_main
    from dirl.train.rl.config import load_rl_config
    import torch

    from dirl.eval.run import load_eval_config
    from dirl.train.sft import build_model, load_sft_config

    run = tmp_path / "sft-x"
    ck = run / "checkpoints" / "step_00000010"
    shutil.copytree(tiny_dir, ck / "model")
    (ck / "COMPLETE").write_text("")
    for given in (run, ck, ck / "model"):
        assert model_folder(str(given)) == ck / "model"
        sft = load_sft_config(None, [f"model.path={given}"])
        model, _ = build_model(sft, torch.device("cpu"))
        assert model.block_size == 4
        load_rl_config(None, [f"model.path={given}", "eval.enabled=false"])
        load_eval_config(None, [f"model.path={given}"])
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "7+8=", "max_new_tokens": 4}\n')
    assert rollout_main(["--model", str(run), "--input", str(prompts), "--output", str(tmp_path / "o.jsonl"),
                         "--no-progress"]) == 0
    assert json.loads((tmp_path / "o.jsonl").read_text())["model"] == str(ck / "model")
    empty = tmp_path / "empty-run"
    empty.mkdir()
    for make in (lambda: load_sft_config(None, [f"model.path={empty}"]),
                 lambda: load_rl_config(None, [f"model.path={empty}"])):
        with pytest.raises(ConfigError, match="config key 'model.path': .* has no config.json: it is neither a model folder nor"):
            make()
    with pytest.raises(ConfigError, match="^--model: .* is neither a model folder"):
        rollout_main(["--model", str(empty), "--input", str(prompts), "--output", str(tmp_path / "o2.jsonl")])
