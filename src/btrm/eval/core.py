"""Shapes shared by every benchmark: a comparison unit, a benchmark's result, and the benchmark spec.

A benchmark turns its raw rows into `Unit`s (one comparison each: a pair, a best-of-N group, a 3x3 style
matrix...). Each unit names its completions, and each completion is a whole conversation. The harness scores
the distinct conversations once and fills `Unit.scores`; the benchmark's `score` function then reads only
`scores` and `meta`, so results can be recomputed from the saved per-row file without the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

Message = dict[str, Any]
Conversation = list[Message]


@dataclass
class Unit:
    """One comparison unit of a benchmark."""

    id: str
    subset: str
    completions: dict[str, Conversation]  # completion name -> whole conversation; empty after a recompute
    meta: dict[str, Any] = field(default_factory=dict)  # what the rule needs besides scores (label, kind, ...)
    scores: dict[str, float] = field(default_factory=dict)  # completion name -> reward, filled by the harness
    skipped: bool = False  # over max_length under the "skip" policy: not scored, not counted in the results


@dataclass
class Scores:
    """A benchmark's numbers, all on the model card's 0-100 scale."""

    overall: float
    subsets: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)  # sections, pooled variants, hard/normal/easy...
    notes: list[str] = field(default_factory=list)  # how the overall was aggregated when it is ours, not official


# score(units) -> (one result per unit, in order; the benchmark's Scores). Pure: reads only scores and meta.
ScoreRule = Callable[[list[Unit]], "tuple[list[Any], Scores]"]


@dataclass(frozen=True)
class Benchmark:
    name: str  # CLI / file name
    column: str  # model card column
    hub: tuple[tuple[str, str], ...]  # (Hub dataset id, split) read when no local data is given
    to_units: Callable[[list[dict]], list[Unit]]
    score: ScoreRule


def chat(prompt: str | Sequence[Message], response: str) -> Conversation:
    """[user prompt, assistant response]; a prompt given as messages keeps only role and content."""
    if isinstance(prompt, str):
        turns = [{"role": "user", "content": prompt}]
    else:
        turns = [{"role": m["role"], "content": m["content"]} for m in prompt]
    return turns + [{"role": "assistant", "content": response}]


def pct(x: float) -> float:
    return 100.0 * x


def mean(xs: Sequence[float]) -> float:
    if not xs:
        raise ValueError("mean of nothing")
    return sum(xs) / len(xs)


def by_subset(units: Sequence[Unit], results: Sequence[float]) -> dict[str, float]:
    """Mean row result per subset, 0-100, subsets in first-seen order."""
    groups: dict[str, list[float]] = {}
    for u, r in zip(units, results):
        groups.setdefault(u.subset, []).append(r)
    return {name: pct(mean(rs)) for name, rs in groups.items()}
