"""Objectives against hand-computed values, read through the batch's item layout.

Two pairs, rewards (chosen, rejected) = (1, 0) and (-1, 1): r_c - r_r = 1 and -2, so
  -logsigmoid(1)  = log(1 + e^-1)   = 0.31326168751822286
  -logsigmoid(-2) = log(1 + e^2)    = 2.1269280110429727
  -logsigmoid(0.5)= log(1 + e^-0.5) = 0.4740769841801067   (pair 0 with margin 0.5)
  d/dr_c = -sigmoid(-(r_c - r_r)):  -0.2689414213699951 (pair 0), -0.8807970779778823 (pair 1); d/dr_r = minus that.
"""

import pytest
import torch

from btrm.config import ConfigError, LossConfig, load_config
from btrm.data.packing import collate, collate_pairs
from btrm.loss import OBJECTIVES, build_objective

L0, L1, L0_MARGIN = 0.31326168751822286, 2.1269280110429727, 0.4740769841801067
G0, G1 = 0.2689414213699951, 0.8807970779778823


def two_pairs(margins=(0.5, None)):
    # token ids are irrelevant to the loss: only the layout (which sequence is which pair's chosen) matters
    batch = collate_pairs([[1, 2], [3]], [[4], [5, 6, 7]], margins=list(margins))
    rewards = torch.tensor([1.0, 0.0, -1.0, 1.0], requires_grad=True)  # row order: c0, r0, c1, r1
    return batch, rewards


def test_bt_loss_metrics_and_gradient():
    batch, rewards = two_pairs()
    loss, sums = build_objective(LossConfig()).loss(rewards, batch)
    assert loss.item() == pytest.approx(L0 + L1, abs=1e-6)
    loss.backward()
    assert rewards.grad.tolist() == pytest.approx([-G0, G0, -G1, G1], abs=1e-6)
    assert {k: v.item() for k, v in sums.items()} == pytest.approx(
        {"pairs": 2, "loss": L0 + L1, "accuracy": 1, "margin": -1, "chosen_reward": 0, "rejected_reward": 1,
         "chosen_reward_sq": 2, "rejected_reward_sq": 1}, abs=1e-6)
    metrics = build_objective(LossConfig()).finalize({k: v.item() for k, v in sums.items()})
    # chosen rewards {1, -1}: mean 0, std 1; rejected {0, 1}: mean 0.5, std 0.5
    assert metrics == pytest.approx({"loss": (L0 + L1) / 2, "accuracy": 0.5, "margin": -0.5, "chosen_reward": 0.0,
                                     "rejected_reward": 0.5, "chosen_reward_std": 1.0, "rejected_reward_std": 0.5,
                                     "pairs": 2}, abs=1e-6)


def test_bt_margin_and_centering():
    batch, rewards = two_pairs()
    margin, _ = build_objective(LossConfig(margin=True)).loss(rewards, batch)
    assert margin.item() == pytest.approx(L0_MARGIN + L1, abs=1e-6)  # a missing margin counts as 0
    centered, sums = build_objective(LossConfig(center_coef=0.1)).loss(rewards, batch)
    # + 0.1 * (1 + 0)^2 + 0.1 * (-1 + 1)^2 = 0.1
    assert centered.item() == pytest.approx(L0 + L1 + 0.1, abs=1e-6)
    assert sums["loss"].item() == pytest.approx(L0 + L1 + 0.1, abs=1e-6)


def test_bt_reads_the_layout_not_row_positions():
    # the same two pairs with pair 1 stored rejected-first: ranks say which sequence is chosen
    batch = collate([[[1, 2], [4]], [[5, 6, 7], [3]]], ranks=[[0, 1], [1, 0]])
    rewards = torch.tensor([1.0, 0.0, 1.0, -1.0], requires_grad=True)  # c0, r0, r1, c1
    loss, _ = build_objective(LossConfig()).loss(rewards, batch)
    assert loss.item() == pytest.approx(L0 + L1, abs=1e-6)
    loss.backward()
    assert rewards.grad.tolist() == pytest.approx([-G0, G0, G1, -G1], abs=1e-6)


def test_layout_of_a_ranked_group():
    # items: a pair, and a group of three whose best (rank 0) is stored last
    batch = collate([[[1], [2]], [[3], [4], [5]]], ranks=[[0, 1], [2, 1, 0]])
    assert batch.item_offsets.tolist() == [0, 2, 5] and batch.ranks.tolist() == [0, 1, 2, 1, 0]
    rewards = torch.tensor([1.0, 1.0, 0.5, 3.0, 2.0])
    assert batch.at_rank(rewards, 0).tolist() == [1.0, 2.0]
    assert batch.best_wins(rewards).tolist() == [False, False]  # a tie loses; 2.0 < 3.0 (rank 1) loses
    assert batch.best_wins(torch.tensor([2.0, 1.0, 0.5, 1.0, 2.0])).tolist() == [True, True]
    with pytest.raises(ValueError, match="needs items of two sequences"):
        build_objective(LossConfig()).loss(rewards, batch)


def test_empty_micro_batch_has_no_items():
    batch = collate_pairs([], [])
    assert batch.n_items == 0 and batch.num_tokens == 0


def test_kind_is_checked_against_the_table():
    assert "bt" in OBJECTIVES
    with pytest.raises(ConfigError, match="train.loss.kind"):
        load_config(overrides={"model": {"name_or_path": "x"}, "data": {"sources": [{"path": "x"}]},
                               "train": {"loss": {"kind": "nope"}}})
