"""Evaluation on math benchmarks: ``dirl eval`` (:mod:`dirl.eval.run`), metrics and reports.

Import the pieces from their modules (``dirl.eval.run.EvalConfig``, ``run_eval``;
``dirl.eval.metrics.pass_at_k``, ``benchmark_metrics``; ``dirl.eval.report.write_report``); this
package file stays import-light.
"""
