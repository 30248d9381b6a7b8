"""Bradley-Terry loss: a small pure function and its metrics."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
