"""Training objectives: the rewards of a packed batch -> a summed loss and metric sums, from one table.

An objective is built from `train.loss` (`build_objective`, by `train.loss.kind`) and has two parts:
  loss(rewards, batch) -> (loss_sum, metric_sums): the SUM over the batch's items of per-item losses, and metric
      sums (tensors) with the same keys for every batch. The trainer divides the loss by the step's global item
      count, so every item weighs the same however it was packed, and adds the metric sums over micro-batches and
      ranks before `finalize` turns them into what is logged.
  finalize(sums) -> metrics: reduced sums -> means, stds, counts.
Rewards are read through the batch's item layout (`PackedBatch.at_rank`, `best_wins`), never by position in the row.

To add an objective: a builder `f(cfg: LossConfig) -> Objective` in this module, its line in `OBJECTIVES`, and
its hand-computed test in tests/core/test_loss.py (docs/architecture.md).
"""

from __future__ import annotations

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


def bradley_terry(cfg: LossConfig) -> Objective:
    """Plain BT over pair items, with the optional per-pair margin and reward centering of `train.loss`."""

    def loss(rewards: torch.Tensor, batch: PackedBatch):
        if len(batch.ranks) != 2 * batch.n_items:
            raise ValueError(f"train.loss.kind=bt needs items of two sequences, got {len(batch.ranks)} sequences "
                             f"in {batch.n_items} items")
        margins = batch.margins.to(rewards.device) if cfg.margin else None
        return bt_loss(batch.at_rank(rewards, 0), batch.at_rank(rewards, 1), margins, cfg.center_coef)

    return Objective(loss, finalize_metrics)


# ----------------------------------------------------------------------------------------------------------------------
# The table `train.loss.kind` picks from


OBJECTIVES: dict[str, Callable[[LossConfig], Objective]] = {
    "bt": bradley_terry,
}


def build_objective(cfg: LossConfig) -> Objective:
    try:
        return OBJECTIVES[cfg.kind](cfg)
    except KeyError:
        raise ValueError(f"train.loss.kind: {cfg.kind!r} is not one of {sorted(OBJECTIVES)}") from None
