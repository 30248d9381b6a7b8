"""Objectives against hand-computed values, read through the batch's item layout.

Two pairs, rewards (chosen, rejected) = (1, 0) and (-1, 1): r_c - r_r = 1 and -2, so
  -logsigmoid(1)  = log(1 + e^-1)   = 0.31326168751822286
  -logsigmoid(-2) = log(1 + e^2)    = 2.1269280110429727
  -logsigmoid(0.5)= log(1 + e^-0.5) = 0.4740769841801067   (pair 0 with margin 0.5)
  d/dr_c = -sigmoid(-(r_c - r_r)):  -0.2689414213699951 (pair 0), -0.8807970779778823 (pair 1); d/dr_r = minus that.
"""

import math

import pytest
import torch

from btrm.config import ConfigError, LossConfig, load_config
from btrm.data.packing import collate, collate_pairs
from btrm.loss import OBJECTIVES, build_objective, comparisons, group_metric_sums

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
    # bt_pairs takes groups (issue 13): the pair, then the group's 3 comparisons (5 > 4 > 3 by rank)
    w, l, item = comparisons(batch)
    assert w.tolist() == [0, 3, 4, 4] and l.tolist() == [1, 2, 2, 3] and item.tolist() == [0, 1, 1, 1]


def test_empty_micro_batch_has_no_items():
    batch = collate_pairs([], [])
    assert batch.n_items == 0 and batch.num_tokens == 0


def test_kind_is_checked_against_the_table():
    assert "bt" in OBJECTIVES
    with pytest.raises(ConfigError, match="train.loss.kind"):
        load_config(overrides={"model": {"name_or_path": "x"}, "data": {"sources": [{"path": "x"}]},
                               "train": {"loss": {"kind": "nope"}}})


# ----------------------------------------------------------------------------------------------------------------------
# Groups of K > 2 responses (issue 13)


def pl_reference(r, stages):
    """Plackett-Luce by hand: sum over (picked, rest) of -log(e^r_picked / (e^r_picked + sum_rest e^r_j))."""
    return sum(-r[i] + torch.log(torch.exp(r[i]) + sum(torch.exp(r[j]) for j in rest)) for i, rest in stages)


@pytest.mark.parametrize("kind", ["bt", "bt_pairs", "plackett_luce"])
def test_k2_equals_plain_bt_exactly(kind):
    # two pairs, and the same two pairs as rated groups of 2 (scores) stored worse first
    batch, rewards = two_pairs()
    loss, sums = build_objective(LossConfig(kind=kind)).loss(rewards, batch)
    loss.backward()
    assert loss.item() == pytest.approx(L0 + L1, abs=1e-6)
    assert rewards.grad.tolist() == pytest.approx([-G0, G0, -G1, G1], abs=1e-6)
    as_groups = collate([[[2], [1]], [[5], [6]]], ranks=[[1, 0], [1, 0]], scores=[[0.5, 4.0], [1.0, 3.0]])
    r2 = torch.tensor([0.0, 1.0, 1.0, -1.0], requires_grad=True)
    loss2, sums2 = build_objective(LossConfig(kind=kind)).loss(r2, as_groups)
    loss2.backward()
    plain, plain_sums = build_objective(LossConfig(kind="bt")).loss(rewards.detach(), batch)
    assert loss2.item() == plain.item() == loss.item()  # bitwise
    assert r2.grad.tolist() == [G for G in rewards.grad[[1, 0, 3, 2]].tolist()]
    assert {k: v.item() for k, v in sums2.items()} == {k: v.item() for k, v in sums.items()}
    assert build_objective(LossConfig(kind=kind)).units(batch) == 2


def test_plackett_luce_hand_computed_3_and_4_with_ties():
    pl = build_objective(LossConfig(kind="plackett_luce"))
    # item 0: 3 responses ranked by a permutation (no scores), stored [2nd, best, 3rd];
    # item 1: 3 rated responses, the bottom two tied (no term for them);
    # item 2: 4 rated responses, the top two tied: each is picked against the two below, then 1 vs 0
    batch = collate([[[1], [2], [3]], [[4], [5], [6]], [[7], [8], [9], [10]]],
                    ranks=[[1, 0, 2], [0, 1, 2], [0, 1, 2, 3]],
                    scores=[None, [3.0, 1.0, 1.0], [2.0, 2.0, 1.0, 0.0]])
    r = torch.tensor([2.0, 1.0, 0.0, 0.5, 1.0, -1.0, 0.0, 1.0, -0.5, 0.3], requires_grad=True)
    loss, sums = pl.loss(r, batch)
    ref_r = r.detach().clone().requires_grad_(True)
    ref = pl_reference(ref_r, [(1, [0, 2]), (0, [2]), (3, [4, 5]), (6, [8, 9]), (7, [8, 9]), (8, [9])])
    ref.backward()
    loss.backward()
    # the same by numbers: e.g. item 1's term = log(1 + e^0.5 + e^-1.5) = 1.0297...
    assert pl_reference(torch.tensor([0.5, 1.0, -1.0]), [(0, [1, 2])]).item() == pytest.approx(
        math.log(1 + math.exp(0.5) + math.exp(-1.5)), abs=1e-6)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    assert r.grad.tolist() == pytest.approx(ref_r.grad.tolist(), abs=1e-6)
    assert sums["units"].item() == 6 == pl.units(batch)
    # accuracy is over the 3 + 2 + 5 comparisons the labels order
    assert sums["pairs"].item() == 10
    metrics = pl.finalize({k: v.item() for k, v in sums.items()})
    assert metrics["loss"] == pytest.approx(ref.item() / 6, abs=1e-6)


def test_bt_pairs_group_equals_its_comparisons_as_pairs():
    prompt = list(range(100, 130))  # a 30-token prompt the four responses share
    resp = [[1, 2], [3], [4, 5, 6], [7]]
    scores = [3.0, 2.0, 2.0, 0.0]  # a tie: 1 and 2 are not compared, 5 comparisons
    obj = build_objective(LossConfig(kind="bt_pairs", center_coef=0.1))
    group = collate([[prompt + x for x in resp]], ranks=[[0, 1, 2, 3]], scores=[scores], share=True)
    base = torch.tensor([0.3, -0.2, 0.9, 0.1], requires_grad=True)
    loss, sums = obj.loss(base, group)
    loss.backward()
    pairs = [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    flat = collate_pairs([prompt + resp[i] for i, _ in pairs], [prompt + resp[j] for _, j in pairs], share=True)
    base2 = base.detach().clone().requires_grad_(True)
    loss2, sums2 = obj.loss(base2[[k for p in pairs for k in p]], flat)
    loss2.backward()
    assert abs(loss.item() - loss2.item()) <= 1e-5 and obj.units(group) == obj.units(flat) == 5
    assert (base.grad - base2.grad).abs().max().item() <= 1e-5
    assert {k: v.item() for k, v in sums.items()} == pytest.approx({k: v.item() for k, v in sums2.items()})
    assert group.num_tokens == 30 + 7 < flat.num_tokens == 5 * 30 + 17  # the prompt once, not once per pair
    # min_score_gap: only gaps above 1 compare (3-0, 2-0 twice): 3 comparisons
    assert build_objective(LossConfig(min_score_gap=1.0)).units(group) == 3


def test_group_metrics():
    batch = collate([[[1], [2], [3]], [[4], [5]], [[6], [7], [8]]], ranks=[[0, 1, 2], [0, 1], [0, 1, 2]],
                    scores=[None, None, [2.0, 2.0, 0.0]])
    # item 0: predicted order 0 > 2 > 1: top1 right, tau (2 - 1) / 3; item 1: wrong, tau -1;
    # item 2: either tied best wins: 7 > 8 > 6: top1 right, tau (1 - 1) / 2 = 0
    r = torch.tensor([3.0, 1.0, 2.0, 0.0, 1.0, 0.0, 2.0, 1.0])
    s = {k: v.item() for k, v in group_metric_sums(r, batch).items()}
    assert s == pytest.approx({"groups": 3, "top1": 2, "kendall_tau": 1 / 3 - 1 + 0, "responses": 8, "reward": 10,
                               "reward_sq": 20})
