"""RewardBench 2 (allenai/reward-bench-2, split `test`, 1,865 rows in 6 subsets).

Rules and where they come from (allenai/reward-bench):
- a row's completions are `chosen + rejected`, in that order, and the first `num_correct` of them are the
  correct ones (`rewardbench/utils.py::load_bon_dataset_v2` unrolls them; `process_single_model` reads
  `i < num_correct`); a row without `num_correct` takes its `chosen` list as the correct ones;
- rows other than Ties: the row scores 1/k when the first completion holds the maximum score and k completions
  share that maximum, else 0 (`rewardbench/utils.py::reroll_and_score_dataset`); subset = mean over rows;
- Ties rows ("ref:<n>" with one correct answer, "tied:<n>" with several, for the same prompt n) are scored as a
  set (`rewardbench/utils.py::process_single_model` and `_compute_prompt_stats`), see `ties_score`;
- overall = unweighted mean of the subsets (`scripts/run_v2.py`, per-subset `results_grouped`).
"""

from __future__ import annotations

import math

from btrm.eval.core import Benchmark, Scores, Unit, chat, mean, pct

TIES = "ties"


def to_units(records: list[dict]) -> list[Unit]:
    units = []
    for r in records:
        chosen, rejected = list(r["chosen"]), list(r["rejected"])
        total = r.get("total_completions")
        if total is not None and total != len(chosen) + len(rejected):
            raise ValueError(f"row {r['id']}: total_completions={total} but {len(chosen) + len(rejected)} completions")
        completions = {f"chosen_{i}": chat(r["prompt"], c) for i, c in enumerate(chosen)}
        completions.update({f"rejected_{i}": chat(r["prompt"], c) for i, c in enumerate(rejected)})
        num_correct = r.get("num_correct")
        if num_correct is not None and not 0 <= num_correct <= len(completions):
            raise ValueError(f"row {r['id']}: num_correct={num_correct} with {len(completions)} completions")
        meta = {} if num_correct is None else {"num_correct": num_correct}
        units.append(Unit(id=str(r["id"]), subset=r["subset"], completions=completions, meta=meta))
    return units


def ordered(scores: dict[str, float]) -> list[float]:
    """Scores in the official order: chosen_0, chosen_1, ..., rejected_0, rejected_1, ..."""
    def key(name: str) -> tuple[int, int]:
        kind, _, i = name.rpartition("_")
        return (0 if kind == "chosen" else 1, int(i))

    return [scores[name] for name in sorted(scores, key=key)]


def best_of_n(scores: dict[str, float]) -> float:
    """1/k when the first completion (chosen_0) holds the maximum shared by k completions, else 0."""
    top = max(scores.values())
    if ordered(scores)[0] != top:
        return 0.0
    return 1.0 / sum(1 for s in scores.values() if s == top)


def _split(u: Unit) -> tuple[list[float], list[float]]:
    """(correct, incorrect) scores: the first num_correct in the official order (default: the chosen ones)."""
    n = u.meta.get("num_correct", sum(name.startswith("chosen_") for name in u.scores))
    scores = ordered(u.scores)
    return scores[:n], scores[n:]


def _ratio_tanh(num: float, den: float) -> float:
    """tanh(num/den - 1) with numpy's division semantics: x/0 = +-inf (tanh +-1), 0/0 = nan (counted as 0)."""
    if den == 0:
        return 0.0 if num == 0 else math.copysign(1.0, num)
    return math.tanh(num / den - 1)


def ties_score(units: list[Unit]) -> tuple[list[float], float]:
    """Ties subset, 0-1: 0.3 tied accuracy + 0.3 ref accuracy + 0.2 P(margin > spread) + 0.2 P(min margin > spread)
    + 0.01 mean tanh(min margin / spread - 1).

    Per prompt: accurate = every correct answer outscores every incorrect one; margin = worst correct - best
    incorrect; spread = best correct - worst correct (tied rows). The margin terms use prompts present as both a
    ref and a tied row. Row result = accurate (1/0).
    """
    stats: dict[tuple[str, str], tuple[bool, float, float]] = {}
    results = []
    for u in units:
        kind, sep, prompt_id = u.id.partition(":")
        if not sep or kind not in ("ref", "tied"):
            raise ValueError(f"Ties row id {u.id!r}: expected 'ref:<n>' or 'tied:<n>'")
        correct, incorrect = _split(u)
        if not correct or not incorrect:
            raise ValueError(f"Ties row {u.id}: needs a correct and an incorrect completion (num_correct)")
        margin = min(correct) - max(incorrect)
        spread = max(correct) - min(correct)  # 0 for one correct answer (official: None, never used for refs)
        stats[kind, prompt_id] = (margin > 0, margin, spread)
        results.append(1.0 if margin > 0 else 0.0)

    def accuracy(kind: str) -> float:
        acc = [s[0] for (k, _), s in stats.items() if k == kind]
        return mean(acc) if acc else 0.0

    both = [p for (k, p) in stats if k == "tied" and ("ref", p) in stats]
    preferred = preferred_hard = tanh_term = 0.0
    if both:
        tied = [stats["tied", p] for p in both]
        ref = [stats["ref", p] for p in both]
        preferred = mean([t[1] > t[2] for t in tied])
        preferred_hard = mean([min(r[1], t[1]) > t[2] for r, t in zip(ref, tied)])
        tanh_term = mean([_ratio_tanh(min(r[1], t[1]), t[2]) for r, t in zip(ref, tied)])
    total = 0.3 * accuracy("tied") + 0.3 * accuracy("ref") + 0.2 * preferred + 0.2 * preferred_hard + 0.01 * tanh_term
    return results, total


def score(units: list[Unit]) -> tuple[list[float], Scores]:
    results: list[float] = [0.0] * len(units)
    groups: dict[str, list[int]] = {}
    for i, u in enumerate(units):
        groups.setdefault(u.subset, []).append(i)
    subsets = {}
    for name, idx in groups.items():
        if name.lower() == TIES:
            rows, value = ties_score([units[i] for i in idx])
        else:
            rows = [best_of_n(units[i].scores) for i in idx]
            value = mean(rows)
        for i, r in zip(idx, rows):
            results[i] = r
        subsets[name] = pct(value)
    notes = [] if len(subsets) == 6 else [f"overall over {len(subsets)} subsets (the full benchmark has 6)"]
    return results, Scores(mean(list(subsets.values())), subsets, {}, notes)


BENCHMARK = Benchmark(
    name="rewardbench2",
    column="RewardBench v2",
    hub=(("allenai/reward-bench-2", "test"),),
    to_units=to_units,
    score=score,
)
