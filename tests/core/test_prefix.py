"""Shared-prefix layout: prefix length, positions, reward indices and the attention mask, against brute force."""

import pytest
import torch

from btrm.data.packing import collate
from btrm.data.prefix import common_prefix_len, group_by_prefix, item_tokens, shared_prefix_len


def test_shared_prefix_keeps_a_token_in_every_branch():
    assert common_prefix_len([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_len([], [1]) == 0
    assert shared_prefix_len([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert shared_prefix_len([[1, 2, 3], [1, 2, 3]]) == 2  # identical: the last (reward) token stays a branch
    assert shared_prefix_len([[1, 2, 3], [1, 2, 3, 4]]) == 2  # a prefix of another: its last token is kept
    assert shared_prefix_len([[5], [5, 6]]) == 0
    assert shared_prefix_len([[1, 2, 3]]) == 0  # a lone sequence shares nothing
    assert shared_prefix_len([[7, 2], [1, 2]]) == 0
    assert item_tokens([10, 12, 9], 6) == 6 + 4 + 6 + 3


def brute_mask(items, share_min):
    """Expected (row tokens, positions, allowed[T, T], ends) written from the definition, one token at a time."""
    toks, pos, owner, ends = [], [], [], []  # owner: (item, branch or None for P, index in the sequence)
    for it, seqs in enumerate(items):
        p = shared_prefix_len(seqs)
        p = p if p >= share_min else 0
        for j in range(p):
            toks.append(seqs[0][j]), pos.append(j), owner.append((it, None, j))
        for b, s in enumerate(seqs):
            for j in range(p, len(s)):
                toks.append(s[j]), pos.append(j), owner.append((it, b, j))
            ends.append(len(toks) - 1)
    n = len(toks)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        iq, bq, jq = owner[q]
        for k in range(n):
            ik, bk, jk = owner[k]
            same_seq = iq == ik and (bk is None or bk == bq) and (bq is not None or bk is None)
            allowed[q, k] = same_seq and jk <= jq
    return toks, pos, allowed, ends


ITEMS = [
    [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6]],  # a pair sharing [1, 2, 3, 4]
    [[9, 8], [7, 8, 9]],  # nothing shared: two whole sequences
    [[4, 4, 4, 1], [4, 4, 4, 2], [4, 4, 4, 3, 3]],  # best-of-3 with one-token branches
    [[5, 6, 7]],  # a lone sequence
    [[3, 3, 3, 3], [3, 3, 3, 3]],  # identical pair: P of 3, one-token branches
]


@pytest.mark.parametrize("share_min", [1, 4])
def test_layout_matches_definition(share_min):
    row = collate(ITEMS, share=True, min_prefix=share_min)
    toks, pos, allowed, ends = brute_mask(ITEMS, share_min)
    assert row.input_ids[0].tolist() == toks
    assert row.position_ids[0].tolist() == pos
    assert row.prefix.ends == ends
    assert row.prefix.sequence_tokens == sum(len(s) for seqs in ITEMS for s in seqs)
    dense = row.prefix.dense_mask(torch.float32, "cpu")[0, 0]
    assert torch.equal(dense == 0, allowed)
    # the varlen gathers describe the same mask: roots causal on themselves, branches bottom-right over [P; Bi]
    ix = row.prefix.varlen_index("cpu")
    got = torch.zeros_like(allowed)
    calls = [(ix.root, ix.root, ix.cu_root, ix.cu_root)]
    if ix.branch is not None:
        calls.append((ix.branch, ix.branch_kv, ix.cu_branch_q, ix.cu_branch_k))
    for qi, ki, cq, ck in calls:
        for a, b, c, d in zip(cq[:-1].tolist(), cq[1:].tolist(), ck[:-1].tolist(), ck[1:].tolist()):
            sub = torch.ones(b - a, d - c, dtype=torch.bool).tril(d - c - (b - a))
            for i in range(b - a):
                got[qi[a + i], ki[c:d][sub[i]]] = True
    assert torch.equal(got, allowed)
    order = torch.cat([ix.root] + ([ix.branch] if ix.branch is not None else []))
    if ix.inverse is not None:
        assert torch.equal(order[ix.inverse], torch.arange(row.num_tokens))


def test_unshared_row_is_plain_packing():
    row = collate(ITEMS, share=False)
    assert row.prefix is None and row.num_tokens == sum(len(s) for seqs in ITEMS for s in seqs)
    assert row.cu_seqlens.diff().tolist() == [len(s) for seqs in ITEMS for s in seqs]


def test_empty_sequence_is_refused():
    with pytest.raises(ValueError, match="empty"):
        collate([[[1, 2], []]], share=True)


def test_group_by_prefix_finds_prompts_and_respects_capacity():
    header = list(range(100, 120))  # 20 tokens every sequence shares (a system header)
    a = header + list(range(200, 240))  # prompt A (60 tokens)
    b = header + list(range(300, 340))  # prompt B
    seqs = [a + [1, 2], b + [5], a + [3], [7, 8, 9], b + [6, 6], a + [4, 4, 4], a + [1, 2]]
    items = group_by_prefix(seqs, capacity=1000, min_prefix=16)
    assert sorted(sorted(i) for i in items) == [[0, 2, 5, 6], [1, 4], [3]]
    # the shared header alone (20 tokens) is not worth mixing prompts A and B: they stay separate items
    for cap in (70, 100, 128):
        items = group_by_prefix(seqs, capacity=cap, min_prefix=16)
        assert sorted(i for item in items for i in item) == list(range(len(seqs)))
        for item in items:
            lens = [len(seqs[i]) for i in item]
            p = shared_prefix_len([seqs[i] for i in item])
            assert len(item) == 1 or item_tokens(lens, p) <= cap
    assert sorted(group_by_prefix(seqs, capacity=1000, min_prefix=62)) == [[i] for i in range(7)]  # 0 and 6 share 61


def test_tokenized_pairs_record_prompt_length(tmp_path, tiny_llama_dir):
    """The cache holds each pair's shared prefix; the budget counts it once; a shared batch holds the same pairs."""
    from transformers import AutoTokenizer

    from btrm.config import DataConfig, SourceConfig
    from btrm.data.dataset import prepare_data, rank_micro_batches
    from btrm.modeling import ensure_pad_token
    from btrm.tiny import write_preference_jsonl

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ensure_pad_token(tok)
    f = write_preference_jsonl(tmp_path / "d.jsonl", 40)
    data = prepare_data(DataConfig(sources=[SourceConfig(path=str(f))], cache_dir=str(tmp_path / "c")), tok).train
    ds = data.ds
    for i in range(len(data)):
        assert data.prefix_lengths[i] == shared_prefix_len([ds[i]["chosen_ids"], ds[i]["rejected_ids"]]) > 16
    assert (data.packed_sizes(True) == data.sizes - data.prefix_lengths).all()
    assert (data.packed_sizes(False) == data.sizes).all()
    pairs = list(range(0, 40, 3))
    for share in (False, True):
        micro, plan, sizes = rank_micro_batches(data, pairs, 600, 2, 1, share)
        for batch, mb in zip(micro, plan[1]):
            assert batch.num_tokens == sum(sizes[i] for i in mb) <= 600
            assert batch.item_ids == [pairs[i] for i in mb]
            assert (batch.prefix is not None) == share
            ends = batch.ends.tolist()
            for k, p in enumerate(batch.item_ids):  # the reward tokens are the pair's last tokens
                assert batch.input_ids[0, ends[2 * k]] == ds[p]["chosen_ids"][-1]
                assert batch.input_ids[0, ends[2 * k + 1]] == ds[p]["rejected_ids"][-1]
