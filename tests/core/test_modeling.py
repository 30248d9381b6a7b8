"""Packed forward == transformers' own per-sequence forward (rewards and BT-loss gradients)."""

import pytest
import torch

from btrm.data.packing import collate_pairs
from btrm.loss import bt_loss
from btrm.attention import SEGMENT
from btrm.modeling import packed_rewards
from btrm.render import render_ids

WORDS = "the cat sat on a warm mat while rain fell over quiet hills and rivers".split()


def conversations(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k1, k2 = (int(x) for x in torch.randint(1, 60, (2,), generator=g))
        out.append([{"role": "user", "content": " ".join(WORDS[i % len(WORDS)] for i in range(k1))},
                    {"role": "assistant", "content": " ".join(WORDS[(3 * i) % len(WORDS)] for i in range(k2))}])
    return out


def reference_rewards(ref, ids):
    return torch.stack([ref(input_ids=torch.tensor([s])).logits[0, 0] for s in ids])


@pytest.mark.parametrize("layout", [[2], [1, 1, 2], [4], [3, 1]])  # pairs per packed row
@pytest.mark.parametrize("impl", [SEGMENT, "sdpa", "eager"])
def test_packed_rewards_match_hf(models, layout, impl):
    tok, ours, ref = models
    ours.set_attn_implementation(impl)
    convs = conversations(2 * sum(layout), seed=len(layout))
    ids = [render_ids(tok, c) for c in convs]
    expected = reference_rewards(ref, ids)
    got, k = [], 0
    for n_pairs in layout:
        seqs = ids[k:k + 2 * n_pairs]
        got.append(packed_rewards(ours, collate_pairs(seqs[0::2], seqs[1::2])))
        k += 2 * n_pairs
    got = torch.cat(got)
    assert (got - expected).abs().max().item() <= 1e-5


def test_bt_gradients_match_hf(models):
    tok, ours, ref = models
    convs = conversations(8, seed=11)
    ids = [render_ids(tok, c) for c in convs]
    # ours: two packed rows; reference: one sequence at a time
    loss = sum(bt_loss(*(lambda r: (r[0::2], r[1::2]))(packed_rewards(ours, collate_pairs(s[0::2], s[1::2]))))[0]
               for s in (ids[:4], ids[4:]))
    loss.backward()
    r = reference_rewards(ref, ids)
    ref_loss = bt_loss(r[0::2], r[1::2])[0]
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        g, gr = p.grad, ref_params[name].grad
        rel = (g - gr).norm() / gr.norm().clamp_min(1e-12)
        assert rel.item() <= 1e-5, name


def test_pad_token_never_ends_a_conversation(models):
    tok, ours, _ = models
    last = render_ids(tok, conversations(1)[0])[-1]
    assert tok.pad_token_id is not None and tok.pad_token_id != last
    assert ours.config.pad_token_id == tok.pad_token_id
