"""Training objectives: the rewards of a packed batch -> a summed loss and metric sums, from one table.

An objective is built from `train.loss` (`build_objective`, by `train.loss.kind`) and has three parts:
  loss(rewards, batch) -> (loss_sum, metric_sums): the SUM over the batch's comparisons (or terms) of their
      losses, and metric sums (tensors) with the same keys for every batch. The trainer divides the loss by the
      step's global `units` count, so every comparison weighs the same however it was packed, and adds the metric
      sums over micro-batches and ranks before `finalize` turns them into what is logged.
  finalize(sums) -> metrics: reduced sums -> means, stds, counts.
  units(batch) -> the batch's comparisons (terms): what the step's loss is divided by (a pair counts 1).
Rewards are read through the batch's item layout (`comparisons`, `PackedBatch.at_rank`), never by position in the
row. Pairs and ranked groups of K responses (docs/design.md, "Ranked groups") share that layout.

To add an objective: a builder `f(cfg: LossConfig) -> Objective` in this module, its line in `OBJECTIVES`, and
its hand-computed test in tests/core/test_loss.py (docs/architecture.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from btrm.config import LossConfig
    from btrm.data.packing import PackedBatch

LossFn = Callable[[torch.Tensor, "PackedBatch"], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class Objective:
    loss: LossFn
    finalize: Callable[[dict[str, float]], dict[str, float]]
    units: Callable[["PackedBatch"], int]  # what a step's loss is divided by: the batch's comparisons (or terms)


# ----------------------------------------------------------------------------------------------------------------------
# Bradley-Terry


def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor, margins: torch.Tensor | None = None,
            center_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SUMMED per-pair loss -logsigmoid(r_c - r_r [- margin]) [+ coef (r_c + r_r)^2], and metric sums.

    The caller divides by the global pair count, so every pair weighs the same however it was packed. Metrics are
    sums (not means) for the same reason: reduce across micro-batches and ranks, then divide by the pair count.
    """
    diff = chosen.float() - rejected.float()
    logits = diff - margins.float() if margins is not None else diff
    per_pair = -F.logsigmoid(logits)
    if center_coef:
        per_pair = per_pair + center_coef * (chosen.float() + rejected.float()) ** 2
    d = diff.detach()
    c, r = chosen.detach().float(), rejected.detach().float()
    sums = {
        "pairs": torch.tensor(float(d.numel()), device=d.device),
        "loss": per_pair.detach().sum(),
        "accuracy": (d > 0).float().sum(),  # strict: a tie is wrong
        "margin": d.sum(),
        "chosen_reward": c.sum(),
        "rejected_reward": r.sum(),
        "chosen_reward_sq": (c * c).sum(),
        "rejected_reward_sq": (r * r).sum(),
    }
    return per_pair.sum(), sums


def finalize_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Metric sums (already reduced over micro-batches and ranks) -> means and stds per pair."""
    n = max(sums.get("pairs", 0.0), 1.0)
    out = {k: sums[k] / n for k in ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward") if k in sums}
    for side in ("chosen_reward", "rejected_reward"):
        if f"{side}_sq" in sums:
            var = max(sums[f"{side}_sq"] / n - out[side] ** 2, 0.0)
            out[f"{side}_std"] = var ** 0.5
    out["pairs"] = sums.get("pairs", 0.0)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Comparisons inside an item: the pairs a pair or a ranked group of responses yields


def better_pairs(ranks: list[int], scores: list[float], min_gap: float = 0.0) -> list[tuple[int, int]]:
    """(i, j) local sequence indices of one item where i is preferred to j, in row order of i then j.

    A rated item (finite scores) prefers i when its score exceeds j's by more than `min_gap`, so ties and near-ties
    compare nothing; an item without scores (a pair, a ranking) prefers the lower rank. A pair gives [(0, 1)] when
    stored chosen first."""
    k = len(ranks)
    if all(math.isfinite(s) for s in scores) and scores:
        return [(i, j) for i in range(k) for j in range(k) if scores[i] - scores[j] > min_gap]
    return [(i, j) for i in range(k) for j in range(k) if ranks[i] < ranks[j]]


def comparisons(batch: PackedBatch, min_gap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(winner, loser, item) index tensors over the batch's sequences / items: every preferred ordered pair of
    every item (`better_pairs`), items in row order. A batch of pairs gives one comparison per pair."""
    off, ranks = batch.item_offsets.tolist(), batch.ranks.tolist()
    scores = batch.scores.tolist() if len(batch.scores) else [math.nan] * len(ranks)
    w, l, it = [], [], []
    for k in range(batch.n_items):
        a, b = off[k], off[k + 1]
        for i, j in better_pairs(ranks[a:b], scores[a:b], min_gap):
            w.append(a + i)
            l.append(a + j)
            it.append(k)
    as_t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return as_t(w), as_t(l), as_t(it)


def group_metric_sums(rewards: torch.Tensor, batch: PackedBatch) -> dict[str, torch.Tensor]:
    """Per-item ranking metrics as sums over items (eval): `top1` - the highest reward among the best responses
    (several under a tie of scores at the top) exceeds every other response's; `kendall_tau` - (concordant -
    discordant) / ordered pairs, over the pairs the labels order (tau-a over those pairs; a predicted tie counts
    0). A pair's top1 is its accuracy and its tau is +-1. `groups` counts the items; `responses`, `reward` and
    `reward_sq` sum over every sequence once (calibration: a group's response is in several comparisons, so the
    per-comparison reward means would weight it more)."""
    r = rewards.detach().float().cpu().tolist()
    off, ranks = batch.item_offsets.tolist(), batch.ranks.tolist()
    scores = batch.scores.tolist() if len(batch.scores) else [math.nan] * len(ranks)
    top1 = tau = 0.0
    for k in range(batch.n_items):
        a, b = off[k], off[k + 1]
        pairs = better_pairs(ranks[a:b], scores[a:b])
        losers = {j for _, j in pairs}
        best = [i for i in range(b - a) if i not in losers]  # beaten by none: the best (a tie of them at the top)
        rest = [i for i in range(b - a) if i in losers]
        top1 += float(max(r[a + i] for i in best) > max(r[a + i] for i in rest)) if rest else 0.0
        if pairs:
            tau += sum((r[a + i] > r[a + j]) - (r[a + i] < r[a + j]) for i, j in pairs) / len(pairs)
    return {"groups": torch.tensor(float(batch.n_items)), "top1": torch.tensor(top1),
            "kendall_tau": torch.tensor(tau), "responses": torch.tensor(float(len(r))),
            "reward": torch.tensor(math.fsum(r)), "reward_sq": torch.tensor(math.fsum(x * x for x in r))}


# ----------------------------------------------------------------------------------------------------------------------
# The objectives


def bt_pairs(cfg: LossConfig) -> Objective:
    """Bradley-Terry over every ordered pair of an item whose scores differ by more than `min_score_gap` (every
    pair of a ranking), each comparison weighted like one pair: a pair dataset trains exactly as plain BT. The
    item's margin (`train.loss.margin`) applies to each of its comparisons, centering to each comparison's two
    rewards."""

    def loss(rewards: torch.Tensor, batch: PackedBatch):
        w, l, it = (x.to(rewards.device) for x in comparisons(batch, cfg.min_score_gap))
        margins = batch.margins.to(rewards.device).index_select(0, it) if cfg.margin else None
        return bt_loss(rewards.index_select(0, w), rewards.index_select(0, l), margins, cfg.center_coef)

    def units(batch: PackedBatch) -> int:
        return len(comparisons(batch, cfg.min_score_gap)[0])

    return Objective(loss, finalize_metrics, units)


def plackett_luce(cfg: LossConfig) -> Objective:
    """Listwise negative log-likelihood of the ranking: one term per response i that is preferred to some other,
    -log(e^{r_i} / (e^{r_i} + sum_{j in C_i} e^{r_j})) = -logsigmoid(r_i - logsumexp(r_{C_i}) [- margin]), where
    C_i are the responses i is preferred to (`better_pairs`, the same relation as bt_pairs). Without ties that is
    the Plackett-Luce likelihood of the order, the responses below i being those left when i is picked.

    Tie rule: tied responses (scores within `min_score_gap`) are in neither's C, so their order costs nothing, and
    each is picked against the responses strictly below the tie; a tie at the bottom adds no term. For K = 2 it is
    Bradley-Terry exactly (logsumexp of one reward is that reward). Each term weighs like one pair; the margin
    applies to each term, centering to (r_i + mean r_{C_i})^2 (for a pair: (r_c + r_r)^2). Logged `loss` is per
    term; `accuracy` and the reward means are over the comparisons, as for bt_pairs."""

    def terms(batch: PackedBatch):
        w, l, it = comparisons(batch, cfg.min_score_gap)
        if len(w) == 0:
            return w, it, torch.zeros((0, 1), dtype=torch.long), torch.zeros((0, 1), dtype=torch.bool), (w, l)
        head, inverse = torch.unique_consecutive(w, return_inverse=True)  # w is grouped by winner (row order)
        counts = torch.bincount(inverse)
        col = torch.arange(len(w)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        idx = torch.zeros((len(head), int(counts.max())), dtype=torch.long)
        mask = torch.zeros_like(idx, dtype=torch.bool)
        idx[inverse, col], mask[inverse, col] = l, True
        return head, it[torch.cumsum(counts, 0) - 1], idx, mask, (w, l)

    def loss(rewards: torch.Tensor, batch: PackedBatch):
        head, item, idx, mask, (w, l) = terms(batch)
        dev = rewards.device
        head, item, idx, mask = head.to(dev), item.to(dev), idx.to(dev), mask.to(dev)
        r = rewards.float()
        others = torch.where(mask, r[idx], torch.tensor(-torch.inf, device=dev))
        logits = r.index_select(0, head) - torch.logsumexp(others, dim=1)
        if cfg.margin:
            logits = logits - batch.margins.to(dev).float().index_select(0, item)
        per_term = -F.logsigmoid(logits)
        if cfg.center_coef:
            mean_c = torch.where(mask, r[idx], 0.0).sum(1) / mask.sum(1)
            per_term = per_term + cfg.center_coef * (r.index_select(0, head) + mean_c) ** 2
        _, sums = bt_loss(r.index_select(0, w.to(dev)), r.index_select(0, l.to(dev)))
        sums["loss"] = per_term.detach().sum()
        sums["units"] = torch.tensor(float(len(head)), device=dev)
        return per_term.sum(), sums

    def finalize(sums: dict[str, float]) -> dict[str, float]:
        out = finalize_metrics(sums)
        out["loss"] = sums["loss"] / max(sums.get("units", 0.0), 1.0)
        return out

    return Objective(loss, finalize, lambda batch: len(terms(batch)[0]))


# ----------------------------------------------------------------------------------------------------------------------
# The table `train.loss.kind` picks from


OBJECTIVES: dict[str, Callable[[LossConfig], Objective]] = {
    "bt_pairs": bt_pairs,
    "bt": bt_pairs,  # the name before groups: a pair has one comparison, so old configs train exactly as before
    "plackett_luce": plackett_luce,
}


def build_objective(cfg: LossConfig) -> Objective:
    try:
        return OBJECTIVES[cfg.kind](cfg)
    except KeyError:
        raise ValueError(f"train.loss.kind: {cfg.kind!r} is not one of {sorted(OBJECTIVES)}") from None
