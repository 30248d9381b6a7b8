"""Reward-model benchmarks of the Skywork-Reward-V2 model card, scored with any `score_fn(conversations)`.

    from btrm.eval import evaluate, recompute
    results = evaluate(model.score, "rewardbench", "data/rewardbench.parquet", "out/")
    assert recompute("out/rewardbench.rows.jsonl") == results
"""

from btrm.eval.benchmarks import BENCHMARKS, get_benchmark
from btrm.eval.harness import evaluate, evaluate_suite, find_data, markdown_table, recompute, score_units

__all__ = [
    "BENCHMARKS",
    "evaluate",
    "evaluate_suite",
    "find_data",
    "get_benchmark",
    "markdown_table",
    "recompute",
    "score_units",
]
