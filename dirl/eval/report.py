"""Evaluation reports: ``metrics.json`` and ``report.md`` (a Markdown table) in the run folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence


def _pct(x: Optional[float]) -> str:
    return "–" if x is None else f"{100.0 * x:.1f}"


def _num(x: Optional[float], digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def pass_columns(per_benchmark: Mapping[str, Mapping]) -> list[str]:
    """The pass@j columns reported by any benchmark, in increasing j."""
    ks = set()
    for m in per_benchmark.values():
        ks.update(int(k.split("@")[1]) for k in m if k.startswith("pass@"))
    return [f"pass@{j}" for j in sorted(ks)]


def markdown_table(per_benchmark: Mapping[str, Mapping], average: Optional[Mapping] = None) -> str:
    """One row per benchmark (and the average): problems, samples, avg@k accuracy, pass@j,
    tokens per step, decoding steps per response, mean response length, truncation rate
    (percentages for rates)."""
    passes = pass_columns(per_benchmark)
    head = ["benchmark", "problems", "k", "accuracy (avg@k) %"] + [f"{p} %" for p in passes]
    head += ["tokens/step", "steps/response", "mean length", "truncated %", "boxed %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]

    def row(name: str, m: Mapping, n: str, k: str) -> str:
        cells = [name, n, k, _pct(m.get("accuracy"))] + [_pct(m.get(p)) for p in passes]
        cells += [_num(m.get("tokens_per_step")), _num(m.get("steps_per_response"), 1), _num(m.get("mean_response_length"), 1), _pct(m.get("truncation_rate")), _pct(m.get("answer_rate"))]
        return "| " + " | ".join(cells) + " |"

    for name, m in per_benchmark.items():
        k = m.get("samples_per_problem", "–")
        k = "–".join(str(x) for x in k) if isinstance(k, list) else str(k)
        lines.append(row(name, m, str(m.get("num_problems", 0)), k))
    if average and len(per_benchmark) > 1:
        lines.append(row("**average**", average, "", ""))
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(
    out_dir: str | os.PathLike,
    per_benchmark: Mapping[str, Mapping],
    average: Mapping,
    info: Optional[Mapping[str, Any]] = None,
    notes: Sequence[str] = (),
) -> tuple[Path, Path]:
    """Write ``metrics.json`` and ``report.md``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmarks": dict(per_benchmark), "average": dict(average), "info": dict(info or {})}
    jpath, mpath = out / "metrics.json", out / "report.md"
    _atomic_write(jpath, json.dumps(payload, indent=2, sort_keys=False) + "\n")
    md = ["# Evaluation report", ""]
    for k, v in (info or {}).items():
        if isinstance(v, (dict, list)):
            v = json.dumps(v, sort_keys=True)
        md.append(f"- **{k}**: {v}")
    if info:
        md.append("")
    md.append(markdown_table(per_benchmark, average))
    md += [f"{n}" for n in notes]
    md.append(
        "accuracy = mean correctness over all samples (avg@k); pass@j = unbiased estimator over the k samples; "
        "tokens/step = mean of |o| / |distinct steps| per response; mean length in tokens up to the stop token; "
        "truncated = finish reason `length` (graded wrong); boxed = responses with a `\\boxed{}` answer."
    )
    _atomic_write(mpath, "\n".join(md) + "\n")
    return jpath, mpath
