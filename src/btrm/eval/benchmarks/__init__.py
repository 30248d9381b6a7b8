"""The seven benchmarks of the Skywork-Reward-V2 model card, in the card's column order."""

from __future__ import annotations

from btrm.eval.benchmarks import judgebench, ppe, rewardbench, rewardbench2, rmb, rmbench
from btrm.eval.core import Benchmark

BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        rewardbench.BENCHMARK,
        rewardbench2.BENCHMARK,
        ppe.PREFERENCE,
        ppe.CORRECTNESS,
        rmb.BENCHMARK,
        rmbench.BENCHMARK,
        judgebench.BENCHMARK,
    )
}


def get_benchmark(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}") from None
