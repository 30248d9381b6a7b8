"""The in-memory shapes of preference data: a pair (training, curation, evaluation) and a ranked group of K
responses (training, scoring)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Message = dict[str, Any]  # {"role": "user" | "assistant" | "system" | "tool", "content": str}


@dataclass
class Pair:
    """Two whole conversations that share their prompt turns and differ in the last assistant turn."""

    chosen: list[Message]
    rejected: list[Message]
    margin: float | None = None  # optional per-pair margin for the BT loss
    source: str = "default"  # data source name (per-source counts, eval breakdowns)
    category: str | None = None
    origin: str = ""  # "file:row" of the raw row, for error messages and reports

    @property
    def prompt(self) -> list[Message]:
        return self.chosen[:-1]

    def swapped(self) -> "Pair":
        return Pair(self.rejected, self.chosen, self.margin, self.source, self.category, self.origin)


@dataclass
class Group:
    """K >= 2 whole conversations that share their prompt turns, best first. `scores` (higher is better, ties
    allowed, in the same order) for a rated group; None for a ranking (a strict order). A pair is a group of 2."""

    responses: list[list[Message]]
    scores: list[float] | None = None
    margin: float | None = None  # applies to each comparison of the group
    source: str = "default"
    category: str | None = None
    origin: str = ""

    @property
    def prompt(self) -> list[Message]:
        return self.responses[0][:-1]
