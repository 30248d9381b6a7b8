"""Helpers shared by the eval tests (a plain module: a second conftest.py elsewhere would shadow its name)."""

import re
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"

_EMBEDDED = re.compile(r"<(-?\d+(?:\.\d+)?)>\s*$")


def embedded_score(conversations):
    """The fixtures end every response with '<x>': that x is its reward, so expectations can be read off the files."""
    return [float(_EMBEDDED.search(c[-1]["content"]).group(1)) for c in conversations]


class Counting:
    """Wraps a score_fn; records every call's conversations."""

    def __init__(self, fn=embedded_score):
        self.fn = fn
        self.calls: list[list] = []

    def __call__(self, conversations):
        self.calls.append(list(conversations))
        return self.fn(conversations)

    @property
    def forwards(self) -> int:
        return sum(len(c) for c in self.calls)
