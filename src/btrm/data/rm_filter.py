"""RM-assisted curation (`btrm data filter`): score both sides of every pair with a reward model and remove (or
flag) the pairs whose reward margin contradicts their label, or that fall outside a margin band.

margin = reward(chosen) - reward(rejected), from a local checkpoint (`RewardModel`, same render as training) or a
fleet of servers (`RemoteScorer`, rendering with the checkpoint's tokenizer and template kwargs, so both give the
same rewards). Reasons, counted per source like the other steps:
  disagreement   margin < -max_disagreement: the model prefers the rejected side by more than the threshold
  outside_band   margin outside [band_low, band_high] (e.g. drop pairs too easy to teach anything)
With `flag`, every pair is kept and the verdicts are counted under the report's "flagged" instead. Either way the
rewards of every pair go to `<output stem>.scores.jsonl` (origin, source, rewards, verdict) in input order, so a
person can review the flagged pairs and a new threshold needs no rescoring.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

ScoreFn = Callable[[list[list[dict]]], list[float | None]]  # conversations -> rewards (None: could not be scored)


@dataclass
class FilterRule:
    max_disagreement: float | None = None
    band: tuple[float, float] | None = None
    flag: bool = False

    def __post_init__(self):
        if self.max_disagreement is None and self.band is None:
            raise ValueError("filter needs --max-disagreement and/or --margin-band")
        if self.max_disagreement is not None and self.max_disagreement < 0:
            raise ValueError(f"--max-disagreement must be >= 0, got {self.max_disagreement}")
        if self.band is not None and self.band[0] > self.band[1]:
            raise ValueError(f"--margin-band: low {self.band[0]} > high {self.band[1]}")

    def verdict(self, margin: float) -> str | None:
        if self.max_disagreement is not None and margin < -self.max_disagreement:
            return "disagreement"
        if self.band is not None and not self.band[0] <= margin <= self.band[1]:
            return "outside_band"
        return None

    def settings(self) -> dict:
        return {"margin": "reward(chosen) - reward(rejected)", "max_disagreement": self.max_disagreement,
                "margin_band": list(self.band) if self.band else None, "mode": "flag" if self.flag else "remove"}


def local_scorer(checkpoint: str, device: str | None = None) -> tuple[ScoreFn, dict]:
    """Rewards from a local checkpoint; a conversation longer than its max_length is left unscored (None)."""
    from btrm.inference.scorer import OverlongError, RewardModel

    rm = RewardModel.from_pretrained(checkpoint, device=device)

    def score(conversations):
        ids = rm.encode_each(conversations)
        ok = [i for i, x in enumerate(ids) if not isinstance(x, OverlongError)]
        rewards: list[float | None] = [None] * len(ids)
        for i, r in zip(ok, rm.score_ids([ids[i] for i in ok], progress=False)):
            rewards[i] = r
        return rewards

    return score, {"model": str(checkpoint), "max_length": rm.max_length,
                   "chat_template_kwargs": rm.chat_template_kwargs}


def remote_scorer(urls: Sequence[str], tokenizer: str, backend: str = "sglang") -> tuple[ScoreFn, dict]:
    """Rewards from running servers; rendered with `tokenizer` (a checkpoint dir: its btrm_meta template kwargs)."""
    from btrm.inference.remote import RemoteScorer
    from btrm.inference.scorer import read_meta

    kwargs = read_meta(tokenizer).get("chat_template_kwargs") or {}
    scorer = RemoteScorer(list(urls), backend=backend, tokenizer=tokenizer, chat_template_kwargs=kwargs)
    return scorer.score, {"servers": list(urls), "backend": backend, "tokenizer": str(tokenizer),
                          "chat_template_kwargs": kwargs}


def scores_path(output: str | Path) -> Path:
    return Path(output).with_suffix(".scores.jsonl")


def conversations(rows) -> tuple[list, list]:
    """(chosen, rejected) conversations of an encoded chunk (`curate.encode_rows`: jsonl lines or a pyarrow Table)."""
    if isinstance(rows, list):
        parsed = [json.loads(line) for line in rows]
        return [r["chosen"] for r in parsed], [r["rejected"] for r in parsed]
    return rows.column("chosen").to_pylist(), rows.column("rejected").to_pylist()


class RMFilter:
    """The filter step: score each chunk's pairs (chosen and rejected in one call) and keep, flag or remove them."""

    def __init__(self, score: ScoreFn, rule: FilterRule, tally, scores_file: Path):
        self.score, self.rule, self.tally, self.scores_file = score, rule, tally, Path(scores_file)
        self.flagged: dict[str, Counter] = defaultdict(Counter)
        self.unscored: Counter = Counter()
        self.tmp = self.scores_file.with_name(f".{self.scores_file.name}.partial")
        self.out = self.tmp.open("w", encoding="utf-8")

    def __call__(self, chunk) -> list[bool] | None:
        if not chunk.sources:
            return None
        chosen, rejected = conversations(chunk.rows)
        rewards = self.score(chosen + rejected)
        n, keep = len(chosen), []
        for source, origin, rc, rr in zip(chunk.sources, chunk.origins, rewards[:n], rewards[n:]):
            verdict = None
            if rc is None or rr is None:
                self.unscored[source] += 1  # kept: the model cannot judge what it cannot read
            else:
                verdict = self.rule.verdict(rc - rr)
            self.out.write(json.dumps({"origin": origin, "source": source, "chosen": rc, "rejected": rr,
                                       "verdict": verdict}, ensure_ascii=False) + "\n")
            if verdict is not None and self.rule.flag:
                self.flagged[source][verdict] += 1
            elif verdict is not None:
                self.tally.remove(source, verdict)
            keep.append(verdict is None or self.rule.flag)
        return keep

    def details(self) -> dict:
        self.out.close()
        self.tmp.replace(self.scores_file)
        return {"flagged": {s: dict(c) for s, c in self.flagged.items()}, "unscored_overlong": dict(self.unscored),
                "scores": str(self.scores_file)}
