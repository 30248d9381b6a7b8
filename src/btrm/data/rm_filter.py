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
from typing import Callable, Iterable, Iterator, Sequence

from btrm.data.pairs import Pair

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
        for i, r in zip(ok, rm.score_ids([ids[i] for i in ok])):
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


def rm_filter(chunks: Iterable[tuple[list[Pair], object]], score: ScoreFn, rule: FilterRule, tally, details: dict,
              scores_file: Path) -> Iterator[Pair]:
    """Score each chunk's pairs (chosen then rejected, one call) and keep, flag or remove them by `rule`."""
    flagged: dict[str, Counter] = defaultdict(Counter)
    unscored: Counter = Counter()
    tmp = scores_file.with_name(f".{scores_file.name}.partial")
    with tmp.open("w", encoding="utf-8") as out:
        for pairs, _ in chunks:
            if not pairs:
                continue
            rewards = score([p.chosen for p in pairs] + [p.rejected for p in pairs])
            for pair, rc, rr in zip(pairs, rewards[:len(pairs)], rewards[len(pairs):]):
                verdict = None
                if rc is None or rr is None:
                    unscored[pair.source] += 1  # kept: the model cannot judge what it cannot read
                else:
                    verdict = rule.verdict(rc - rr)
                out.write(json.dumps({"origin": pair.origin, "source": pair.source, "chosen": rc, "rejected": rr,
                                      "verdict": verdict}, ensure_ascii=False) + "\n")
                if verdict is None or rule.flag:
                    if verdict is not None:
                        flagged[pair.source][verdict] += 1
                    yield pair
                else:
                    tally.remove(pair, verdict)
    tmp.replace(scores_file)
    details["flagged"] = {s: dict(c) for s, c in flagged.items()}
    details["unscored_overlong"] = dict(unscored)
    details["scores"] = str(scores_file)
