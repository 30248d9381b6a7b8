"""The one in-memory shape of a preference pair, shared by training, curation and evaluation."""

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
