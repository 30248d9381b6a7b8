"""JudgeBench (ScalerLab/JudgeBench, split `gpt`, 350 pairs; label "A>B" or "B>A").

Rules and where they come from (ScalerLab/JudgeBench):
- decision "A>B" when score(A) > score(B), otherwise "B>A": a tie goes to B (`utils/judges.py`, the reward-model
  judges: `'A>B' if score_A > score_B else 'B>A'`);
- accuracy = 100 * correct / pairs over the pairs whose `source` starts with a category prefix, and "Overall"
  over all pairs (`utils/metrics.py::compute_final_metrics` single game, called per prefix by `run_judge.py`).
The model card reports the mean of the 4 category accuracies (knowledge, reasoning, math, coding); JudgeBench's
own "Overall" pools all pairs: both are reported (`details.pooled`), the overall is the category mean.
"""

from __future__ import annotations

from btrm.eval.core import Benchmark, Scores, Unit, by_subset, chat, mean, pct

# `source` prefix -> category (mmlu-pro-<field>, livebench-reasoning, livebench-math, livecodebench)
CATEGORIES = (
    ("mmlu-pro", "knowledge"),
    ("livebench-reasoning", "reasoning"),
    ("livebench-math", "math"),
    ("livecodebench", "coding"),
)


def category(source: str) -> str:
    for prefix, name in CATEGORIES:
        if source.startswith(prefix):
            return name
    raise ValueError(f"JudgeBench source {source!r} matches no category {[p for p, _ in CATEGORIES]}")


def to_units(records: list[dict]) -> list[Unit]:
    units = []
    for r in records:
        if r["label"] not in ("A>B", "B>A"):
            raise ValueError(f"pair {r['pair_id']}: label {r['label']!r}, expected 'A>B' or 'B>A'")
        units.append(
            Unit(
                id=str(r["pair_id"]),
                subset=category(r["source"]),
                completions={"A": chat(r["question"], r["response_A"]), "B": chat(r["question"], r["response_B"])},
                meta={"label": r["label"], "source": r["source"]},
            )
        )
    return units


def decision(scores: dict[str, float]) -> str:
    return "A>B" if scores["A"] > scores["B"] else "B>A"


def score(units: list[Unit]) -> tuple[list[float], Scores]:
    results = [1.0 if decision(u.scores) == u.meta["label"] else 0.0 for u in units]
    subsets = by_subset(units, results)
    details = {"category_mean": mean(list(subsets.values())), "pooled": pct(mean(results))}
    return results, Scores(details["category_mean"], subsets, details)


BENCHMARK = Benchmark(
    name="judgebench",
    column="JudgeBench",
    hub=(("ScalerLab/JudgeBench", "gpt"),),
    to_units=to_units,
    score=score,
)
