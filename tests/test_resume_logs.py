"""Resume reads the logs a killed run left: a torn last line (killed mid-write, disk full) is dropped."""

from __future__ import annotations

import json

from dirl.config import LoggingConfig
from dirl.data.formats import read_jsonl_log, truncate_jsonl_log
from dirl.eval.run import read_responses
from dirl.train.common import MetricsLogger, read_metrics


def _torn(path, steps, tail=b'{"step": 9, "lo'):
    path.write_bytes(b"".join(json.dumps({"step": s, "loss": 1.0 / s}).encode() + b"\n" for s in steps) + tail)


def test_read_jsonl_log_drops_a_torn_tail_and_broken_lines(tmp_path):
    p = tmp_path / "log.jsonl"
    assert read_jsonl_log(p) == []
    _torn(p, [1, 2, 3])
    assert [r["step"] for r in read_jsonl_log(p)] == [1, 2, 3]
    p.write_bytes(b'{"step": 1}\n\x00\x00garbage\xff\n[1]\n{"step": 2}\n')
    assert [r["step"] for r in read_jsonl_log(p)] == [1, 2]
    p.write_bytes(b"")
    assert read_jsonl_log(p) == []


def test_metrics_logger_resumes_over_a_torn_line(tmp_path):
    _torn(tmp_path / "metrics.jsonl", [1, 2, 3, 4])
    log = MetricsLogger(tmp_path, LoggingConfig(tensorboard=False), resume_step=3)
    log.log(4, {"loss": 0.5})
    log.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == 0.5
    assert (tmp_path / "metrics.jsonl").read_text().endswith("\n")


def test_samples_and_responses_logs_resume_over_a_torn_line(tmp_path):
    samples = tmp_path / "samples.jsonl"
    _torn(samples, [1, 2, 3], tail=b'{"step": 3, "text": "cut')
    truncate_jsonl_log(samples, 2)
    assert [r["step"] for r in read_jsonl_log(samples)] == [1, 2]
    assert not (tmp_path / "samples.jsonl.tmp").exists()
    responses = tmp_path / "responses.jsonl"
    _torn(responses, [1, 2])
    assert [r["step"] for r in read_responses(responses)] == [1, 2]
