"""scripts/convert_data.py: every input kind to SFT / RL JSONL that dirl's own readers accept,
field detection, boxed-answer extraction, one-line errors with file:line, --skip-bad, atomic output."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dirl.data.benchmarks import load_benchmark, read_rows
from dirl.data.formats import DataError, read_sft_examples

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "convert_data.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("convert_data", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


cd = _load_script()


def run(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=60)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# SFT
# --------------------------------------------------------------------------------------------


def test_jsonl_pairs_to_sft(tmp_path):
    src = write_jsonl(tmp_path / "pairs.jsonl", [
        {"id": "a", "prompt": "1+1?", "response": "2"},
        {"instruction": "Add.", "input": "2+2", "output": "4"},  # Alpaca: instruction and input joined
        {"problem": "3+3?", "solution": "3+3=6, so \\boxed{6}"},
        {"question": "4+4?", "answer": "4+4 is\n8\n#### 8"},  # a worked answer (GSM8K) is a response
    ])
    out = tmp_path / "out" / "sft.jsonl"  # the folder is made
    r = run(src, "--to", "sft", "--out", out, "--system-prompt", "Be brief.")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"read 4 rows, wrote 4, skipped 0 -> {out}"
    rows = read_jsonl(out)
    assert rows[0] == {"messages": [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "1+1?"},
                                    {"role": "assistant", "content": "2"}], "id": "a"}
    assert rows[1]["messages"][1:] == [{"role": "user", "content": "Add.\n\n2+2"},
                                       {"role": "assistant", "content": "4"}]
    # dirl's own SFT reader takes the file as it is
    ex = read_sft_examples(str(out))
    assert [e.response for e in ex] == ["2", "4", "3+3=6, so \\boxed{6}", "4+4 is\n8\n#### 8"]
    assert ex[2].prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+3?"}]
    assert ex[0].meta == {"id": "a"}


def test_sharegpt_to_sft(tmp_path):
    src = tmp_path / "chat.json"
    src.write_text(json.dumps([
        {"conversations": [{"from": "system", "value": "You add."},
                           {"from": "human", "value": "1+2?"},
                           {"from": "gpt", "value": "3"},
                           {"from": "human", "value": "and +1?"},
                           {"from": "gpt", "value": "4"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
                      {"role": "assistant", "content": "hello"}]},
    ], indent=1))
    out = tmp_path / "sft.jsonl"
    r = run(src, "--to", "sft", "--out", out, "--system-prompt", "S")
    assert r.returncode == 0, r.stderr
    rows = read_jsonl(out)
    assert [m["role"] for m in rows[0]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert rows[0]["messages"][0]["content"] == "You add."
    assert rows[1]["messages"][:2] == [{"role": "system", "content": "S"}, {"role": "user", "content": "hi there"}]
    ex = read_sft_examples(str(out))
    assert ex[0].response == "4" and len(ex[0].prompt) == 4
    assert ex[1].prompt[-1] == {"role": "user", "content": "hi there"}


def test_sft_refuses_question_answer_rows(tmp_path):
    src = write_jsonl(tmp_path / "qa.jsonl", [{"question": "1+1?", "answer": "2"}])
    out = tmp_path / "sft.jsonl"
    r = run(src, "--to", "sft", "--out", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip()
    assert "\n" not in line
    assert line.startswith(f"{src}:1: no response field") and "no response text to train on" in line
    assert "--to rl" in line and not out.exists()


def test_sharegpt_unknown_speaker_names_the_message(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"conversations": [{"from": "narrator", "value": "q"}, {"from": "gpt", "value": "a"}]},
    ])
    r = run(src, "--to", "sft", "--out", tmp_path / "o.jsonl")
    assert r.returncode == 2
    assert r.stderr.strip().startswith(f"{src}:2: conversations[0]: unknown speaker 'narrator'")


# --------------------------------------------------------------------------------------------
# RL / eval
# --------------------------------------------------------------------------------------------


def test_csv_to_rl(tmp_path):
    src = tmp_path / "probs.csv"
    with src.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "Problem", "answer", "solution"])
        w.writerow(["p1", "What is 2+3?", "5", ""])
        w.writerow(["p2", "A question\nover two lines?", "", "so it is \\boxed{7}"])  # blank answer: from the solution
        w.writerow(["p3", "GSM8K style?", "work\n#### 1,000", ""])
    out = tmp_path / "rl.jsonl"
    r = run(src, "--to", "rl", "--out", out, "--question-field", "Problem")
    assert r.returncode == 0, r.stderr
    assert read_jsonl(out) == [
        {"question": "What is 2+3?", "answer": "5", "id": "p1"},
        {"question": "A question\nover two lines?", "answer": "7", "id": "p2"},
        {"question": "GSM8K style?", "answer": "1000", "id": "p3"},
    ]
    # dirl's RL / eval readers take it
    assert [row["answer"] for row in read_rows(out)] == ["5", "7", "1000"]
    probs = load_benchmark("math500", source=str(out))
    assert [p["question"] for p in probs][0] == "What is 2+3?" and probs[1]["answer"] == "7"
    assert probs[0]["meta"]["id"] == "p1"


def test_csv_error_names_the_line_a_record_starts_on(tmp_path):
    src = tmp_path / "p.csv"
    src.write_text('question,answer\n"two\nlines",1\n\nq3,\n', encoding="utf-8")
    r = run(src, "--to", "rl", "--out", tmp_path / "o.jsonl")
    assert r.returncode == 2
    assert r.stderr.strip().startswith(f"{src}:5: no answer field (looked for answer, final_answer")


def test_json_array_to_rl_with_boxed_extraction(tmp_path):
    rows = [
        {"id": 0, "problem": "Half of 1?", "solution": "We get \\boxed{\\frac{1}{2}}."},
        {"id": 1, "problem": "Twice?", "solution": "First \\boxed{1}, then finally \\boxed{\\sqrt{\\frac{a}{b^{2}}}}"},
        {"id": 2, "problem": "Sets?", "solution": "\\boxed{\\{1, 2\\}}"},
        {"id": 3, "problem": "Given?", "final_answer": ["3", "$4$"], "solution": "\\boxed{0}"},  # answer first
    ]
    src = tmp_path / "probs.json"
    src.write_text(json.dumps({"data": rows}, indent=2))
    out = tmp_path / "rl.jsonl"
    r = run(src, "--to", "rl", "--out", out)
    assert r.returncode == 0, r.stderr
    got = read_jsonl(out)
    assert [g["answer"] for g in got] == ["\\frac{1}{2}", "\\sqrt{\\frac{a}{b^{2}}}", "\\{1, 2\\}", "3, 4"]
    assert [g["id"] for g in got] == [0, 1, 2, 3]
    assert load_benchmark("aime2024", source=str(out))[1]["answer"] == "\\sqrt{\\frac{a}{b^{2}}}"


def test_rl_from_chat_rows(tmp_path):
    src = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "What is 6*7?"},
                      {"role": "assistant", "content": "It is \\boxed{42}."}]},
    ])
    out = tmp_path / "rl.jsonl"
    assert run(src, "--to", "rl", "--out", out).returncode == 0
    assert read_jsonl(out) == [{"question": "What is 6*7?", "answer": "42"}]


def test_rl_reader_of_the_trainer(tmp_path):
    from dirl.train.rl.config import RLDataConfig
    from dirl.train.rl.prompts import load_problems

    src = write_jsonl(tmp_path / "p.jsonl", [{"problem": "1+1?", "solution": "\\boxed{2}", "id": 9}])
    out = tmp_path / "rl.jsonl"
    cd.convert(str(src), out, "rl")
    (p,) = load_problems(RLDataConfig(source=str(out)))
    assert (p["id"], p["question"], p["answer"]) == ("9", "1+1?", "2")


# --------------------------------------------------------------------------------------------
# Errors, --skip-bad, --limit, atomic output
# --------------------------------------------------------------------------------------------


def test_bad_row_names_file_line_and_field(tmp_path):
    src = write_jsonl(tmp_path / "data.jsonl", [
        {"question": "ok?", "answer": "1"},
        {"text": "no question here", "answer": "2"},
    ])
    r = run(src.name, "--to", "rl", "--out", "rl.jsonl", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        "data.jsonl:2: no question field (looked for question, problem, prompt, instruction, input; "
        "set --question-field); the row has answer, text"
    ]
    # a field given by name must be there
    r = run(src.name, "--to", "rl", "--out", "rl.jsonl", "--answer-field", "gold", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("data.jsonl:1: no 'gold' field (--answer-field)")
    # invalid JSON is an error with its line too
    (tmp_path / "broken.jsonl").write_text('{"question": "a", "answer": "1"}\n{"question": \n')
    r = run("broken.jsonl", "--to", "rl", "--out", "rl.jsonl", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("broken.jsonl:2: invalid JSON")
    assert "Traceback" not in r.stderr and not (tmp_path / "rl.jsonl").exists()


def test_skip_bad_counts_and_limit(tmp_path):
    rows = [{"problem": f"q{i}", "solution": f"\\boxed{{{i}}}"} for i in range(6)]
    rows[1] = {"problem": "q1", "solution": "no boxed answer"}
    rows[3] = {"solution": "\\boxed{3}"}
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "rl.jsonl"
    r = run(src, "--to", "rl", "--out", out, "--skip-bad")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"read 6 rows, wrote 4, skipped 2 -> {out}"
    assert r.stderr.splitlines() == [
        f"skipped {src}:2: no answer field and no \\boxed{{...}} answer in 'solution'",
        f"skipped {src}:4: no question field (looked for question, problem, prompt, instruction, input; "
        "set --question-field); the row has solution",
    ]
    assert [row["answer"] for row in read_jsonl(out)] == ["0", "2", "4", "5"]
    # --limit counts written rows
    r = run(src, "--to", "rl", "--out", out, "--skip-bad", "--limit", "2")
    assert r.returncode == 0 and r.stdout.strip() == f"read 3 rows, wrote 2, skipped 1 -> {out}"
    assert [row["answer"] for row in read_jsonl(out)] == ["0", "2"]


def test_error_leaves_no_partial_file(tmp_path):
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(50)] + [{"question": "bad"}]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "rl.jsonl"
    r = run(src, "--to", "rl", "--out", out)
    assert r.returncode == 2 and r.stderr.startswith(f"{src}:51: no answer field")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]
    # an existing output is left as it was
    out.write_text("old\n")
    with pytest.raises(DataError, match=r"p\.jsonl:51"):
        cd.convert(str(src), out, "rl")
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "rl.jsonl"]


def test_usage_errors(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "answer": "1"}])
    for args, msg in [
        (["--to", "rl", "--out", tmp_path / "o.json"], "--out must end with .jsonl"),
        (["--to", "rl", "--out", tmp_path / "o.jsonl", "--system-prompt", "x"], "--system-prompt is for --to sft"),
        (["--to", "sft", "--out", tmp_path / "o.jsonl", "--answer-field", "a"], "--answer-field is for --to rl"),
    ]:
        r = run(src, *args)
        assert r.returncode == 2 and msg in r.stderr
    r = run(tmp_path / "missing.jsonl", "--to", "rl", "--out", tmp_path / "o.jsonl")
    assert r.returncode == 2 and r.stderr.strip() == f"{tmp_path / 'missing.jsonl'}: no such file"
    assert "--question-field" in run("--help").stdout


# --------------------------------------------------------------------------------------------
# parquet and `datasets` folders (in process: no second import of pyarrow / datasets)
# --------------------------------------------------------------------------------------------


def test_parquet_and_datasets_folder(tmp_path):
    import pyarrow as pa  # comes with `datasets`
    import pyarrow.parquet as pq

    rows = [{"id": i, "problem": f"{i}+1?", "answer": str(i + 1)} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    out = tmp_path / "rl.jsonl"
    c = cd.convert(str(tmp_path / "p.parquet"), out, "rl")
    assert (c.read, c.written, c.skipped) == (3, 3, 0)
    assert read_jsonl(out)[2] == {"question": "2+1?", "answer": "3", "id": 2}

    import datasets  # a dependency of dirl
    folder = tmp_path / "ds"
    datasets.Dataset.from_list([{"prompt": "a?", "completion": "b"}, {"prompt": "c?"}]).save_to_disk(str(folder))
    with pytest.raises(DataError, match=r"ds\[train\] row 1: no response field"):
        cd.convert(str(folder), tmp_path / "sft.jsonl", "sft")
    c = cd.convert(str(folder), tmp_path / "sft.jsonl", "sft", skip_bad=True)
    assert (c.read, c.written, c.skipped) == (2, 1, 1)
    assert read_sft_examples(str(tmp_path / "sft.jsonl"))[0].response == "b"


# --------------------------------------------------------------------------------------------
# DiRL's own rows
# --------------------------------------------------------------------------------------------


def test_dirl_sft_rows_are_kept_verbatim(tmp_path):
    rows = [{"id": 1, "prompt": "<|im_start|>user\nWhat is 1+2?<|im_end|>\n<|im_start|>assistant\n",
             "response": "1+2=3. \\boxed{3}<|im_end|><|endoftext|>"}]
    src = write_jsonl(tmp_path / "dirl_sft.jsonl", rows)
    out = tmp_path / "sft.jsonl"
    r = run(src, "--to", "sft", "--out", out)
    assert r.returncode == 0, r.stderr
    got = read_jsonl(out)
    assert got == [{"prompt": rows[0]["prompt"], "response": rows[0]["response"], "id": 1}]
    ex = read_sft_examples(str(out))
    assert ex[0].templated and ex[0].prompt_text == rows[0]["prompt"] and ex[0].response == rows[0]["response"]


def test_dirl_sft_row_with_an_open_response_names_its_line(tmp_path):
    rows = [{"prompt": "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n", "response": "a<|im_end|>"},
            {"prompt": "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n", "response": "a"}]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    r = run(src, "--to", "sft", "--out", tmp_path / "o.jsonl")
    assert r.returncode == 2
    assert f"{src}:2: " in r.stderr and "does not end with <|im_end|>" in r.stderr
    assert not (tmp_path / "o.jsonl").exists()
    r = run(write_jsonl(tmp_path / "e.jsonl", rows[:1]), "--to", "sft", "--out", tmp_path / "o.jsonl",
            "--system-prompt", "x")
    assert r.returncode == 2 and "already chat-templated" in r.stderr


def test_dirl_rl_rows(tmp_path):
    rows = [{"question": "What is 1/2 + 1/4?", "ground_truth_answer": "\\frac{3}{4}"},
            {"question": "2+2?", "ground_truth_answer": "4"}]
    src = write_jsonl(tmp_path / "dirl_rl.jsonl", rows)
    out = tmp_path / "rl.jsonl"
    r = run(src, "--to", "rl", "--out", out)
    assert r.returncode == 0, r.stderr
    assert read_jsonl(out) == [{"question": "What is 1/2 + 1/4?", "answer": "\\frac{3}{4}"},
                               {"question": "2+2?", "answer": "4"}]
    # the trainer reads DiRL's RL rows as they are, too
    from dirl.train.rl.config import RLDataConfig
    from dirl.train.rl.prompts import load_problems

    got = load_problems(RLDataConfig(source=str(src)))
    assert [(p["question"], p["answer"]) for p in got] == [(r["question"], r["ground_truth_answer"]) for r in rows]


def test_dirl_sft_rows_become_rl_rows_with_the_plain_question(tmp_path):
    """DiRL's templated SFT rows converted --to rl keep the user turn's text (the trainer templates
    it), and a templated question handed to the trainer directly is refused, not templated twice."""
    from dirl.train.rl.config import RLDataConfig
    from dirl.train.rl.prompts import load_problems

    prompt = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 1+2?<|im_end|>\n<|im_start|>assistant\n"
    src = write_jsonl(tmp_path / "dirl_sft.jsonl", [{"prompt": prompt, "response": "1+2=3. \\boxed{3}<|im_end|>"}])
    out = tmp_path / "rl.jsonl"
    r = run(src, "--to", "rl", "--out", out)
    assert r.returncode == 0, r.stderr
    assert read_jsonl(out) == [{"question": "What is 1+2?", "answer": "3"}]
    assert load_problems(RLDataConfig(source=str(out)))[0]["messages"][-1]["content"].startswith("What is 1+2?")
    bad = write_jsonl(tmp_path / "templated.jsonl", [{"question": "2+2?", "answer": "4"},
                                                     {"question": prompt, "answer": "3"}])
    with pytest.raises(DataError, match=rf"^{bad}:2: the question holds the chat-template token <\|im_start\|>"):
        load_problems(RLDataConfig(source=str(bad)))
    with pytest.raises(DataError, match=rf"^{bad}:2: the question holds"):
        load_benchmark("math500", source=str(bad))


def test_a_worked_solution_without_a_result_is_no_gold_answer(tmp_path):
    from dirl.train.rl.config import RLDataConfig
    from dirl.train.rl.prompts import load_problems

    src = write_jsonl(tmp_path / "p.jsonl", [{"problem": "1+2?", "solution": "We add. \\boxed{3}"},
                                             {"problem": "1+1?", "solution": "We add 1 and 1.\nThe sum is 2."}])
    with pytest.raises(DataError, match=rf"^{src}:2: the answer is taken from 'solution', a worked solution with no "
                                        r"\\boxed\{\} or #### result to grade against \(set data.answer_key"):
        load_problems(RLDataConfig(source=str(src)))
    with pytest.raises(DataError, match=rf"^{src}:2: the answer is taken from 'solution'"):
        load_benchmark("math500", source=str(src))
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"problem": "1+2?", "solution": "We add. \\boxed{3}"},
                                             {"problem": "6*7?", "solution": "6*7 = 42\n#### 42"},
                                             {"problem": "1/3?", "solution": "\\frac{1}{3}"},  # TRL's plain answers
                                             {"problem": "x < 2?", "solution": "(-\\infty, 2]"}])
    assert [p["answer"] for p in load_problems(RLDataConfig(source=str(ok)))] == ["3", "42", "\\frac{1}{3}", "(-\\infty, 2]"]


def test_problem_files_of_other_types_are_one_line_errors(tmp_path):
    from dirl.train.rl.config import RLDataConfig
    from dirl.train.rl.prompts import load_problems

    (tmp_path / "bad.parquet").write_text("not parquet\n")
    (tmp_path / "p.csv").write_text("question,answer\n1+1?,2\n")
    for name, want in (("bad.parquet", "not a readable parquet file (ArrowInvalid"),
                       ("p.csv", "unsupported file type '.csv' (expected .jsonl, .json, .parquet; "
                                 "scripts/convert_data.py converts")):
        with pytest.raises(DataError) as e:
            load_problems(RLDataConfig(source=str(tmp_path / name)))
        assert str(e.value).startswith(f"{tmp_path / name}: {want}"), str(e.value)


def test_csv_fields_of_any_length_and_bytes_named_by_line(tmp_path):
    long = "x" * 200_000 + " \\boxed{7}"
    src = tmp_path / "huge.csv"
    src.write_text(f"question,solution\nq?,{long}\n")
    out = tmp_path / "rl.jsonl"
    assert cd.convert(str(src), out, "rl").written == 1 and read_jsonl(out)[0]["answer"] == "7"
    for name, head in (("late.csv", "question,answer\n" + "a?,1\n" * 2000), ("late.json", '[\n' + '{"question": "a?", "answer": "1"},\n' * 5)):
        f = tmp_path / name
        f.write_bytes(head.encode() + b'{"question": "b\xff?"' if name.endswith(".json") else head.encode() + b"b\xff?,2\n")
        r = run(f, "--to", "rl", "--out", tmp_path / "o.jsonl")
        line = head.count("\n") + 1
        assert r.returncode == 2 and r.stderr.strip() == f"{f}:{line}: not UTF-8 (byte 0xff)", r.stderr
