"""Shared-prefix rows == transformers' own per-sequence forward: rewards and BT-loss gradients, every backend.

The varlen backend runs on CPU against stand-ins of torch's `varlen_attn` with the 2.11 and 2.13 signatures and
argument checks, flash_attention_2 against stand-ins of flash-attn's `flash_attn_varlen_func` with the 2.1 and 2.8
signatures; their causal mask is the flash kernel's (per sequence, key j is visible to query i iff
j <= i + seqlen_k - seqlen_q: aligned bottom-right, flash-attn's rule since 2.1).
"""

import pytest
import torch
import torch.nn.functional as F

from btrm import attention
from btrm.data.packing import collate
from btrm.loss import bt_loss
from btrm.attention import SEGMENT, VARLEN
from btrm.modeling import packed_rewards
from btrm.render import render_ids


def _conv(*turns):
    roles = ["user", "assistant"] * len(turns)
    return [{"role": r, "content": t} for r, t in zip(roles, turns)]


SYSTEM = {"role": "system", "content": "You are a helpful assistant. Please answer the question below."}
HISTORY = ["Could you explain how this works?", "Sure, here is a short explanation of how it works."]

# Items in rows: each inner list answers one prompt. Every item has an even size so rewards pair up for BT.
ROWS = [
    [
        # single-turn pair
        [_conv("What is the capital of France?", "The capital of France is Paris."),
         _conv("What is the capital of France?", "Paris, of course.")],
        # a pair packed unshared (two lone sequences) between shared items
        [_conv("What is two plus three?", "Five.")],
        [_conv("What is two plus three?", "Two plus three is five, I think.")],
        # best-of-4 with a duplicated response: one-token branches
        [_conv("Tell me about the weather today.", x) for x in
         ("It is sunny and warm.", "Rain is expected later this week.", "Sunny.", "Sunny.")],
    ],
    [
        # multi-turn with a system message
        [[SYSTEM, *_conv(*HISTORY, "And why is the sky blue?", a)] for a in
         ("Light scatters off the air.", "Because the water in the sea reflects up to the sky every day.")],
        # branches diverging inside the last user turn: responses to differently-worded prompts
        [_conv(*HISTORY, "What is the capital of France?", "Paris."),
         _conv(*HISTORY, "What is the capital of Spain, please?", "The capital of Spain is Madrid.")],
    ],
]


def _standin(query, key, value, cu_q, cu_k, max_q, max_k, scale, window_size):
    """Per-sequence SDPA with the flash kernel's bottom-right causal mask, after the kernel's argument checks."""
    assert isinstance(window_size, tuple) and window_size == (-1, 0), "causal is window_size == (-1, 0), a tuple"
    return _causal_varlen(query, key, value, cu_q, cu_k, max_q, max_k, scale)


def _causal_varlen(query, key, value, cu_q, cu_k, max_q, max_k, scale):
    assert query.dim() == key.dim() == value.dim() == 3, "varlen takes [T, H, D]"
    for x in (query, key, value):
        assert x.stride(-1) == 1, "last dim must be contiguous"
    for cu in (cu_q, cu_k):
        assert cu.dtype == torch.int32 and cu.is_contiguous() and cu.dim() == 1
    assert cu_q.numel() == cu_k.numel()
    lq, lk = (cu_q[1:] - cu_q[:-1]).tolist(), (cu_k[1:] - cu_k[:-1]).tolist()
    assert max_q >= max(lq) and max_k >= max(lk)
    assert query.shape[1] % key.shape[1] == 0
    out = []
    for a, b, c, d in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        q, k, v = (x.transpose(0, 1)[None] for x in (query[a:b], key[c:d], value[c:d]))
        mask = torch.ones(b - a, d - c, dtype=torch.bool).tril((d - c) - (b - a))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                           enable_gqa=query.shape[1] != key.shape[1])
        out.append(o[0].transpose(0, 1))
    return torch.cat(out)


def varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1)):
    return _standin(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size)


def varlen_attn_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    if not enable_gqa and query.shape[1] != key.shape[1]:
        raise ValueError("Expect query and key/value to have the same number of heads; try enable_gqa=True")
    return _standin(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size)


def _flash_standin(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                   causal, return_attn_probs):
    """flash_attn_varlen_func after its checks: int max lengths (its op schema), causal flag, no dropout here."""
    assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int), "max_seqlen_q/k are ints"
    assert causal is True and dropout_p == 0.0 and not return_attn_probs
    return _causal_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale)


def flash_attn_varlen_func_2_1(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, return_attn_probs=False):
    return _flash_standin(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                          causal, return_attn_probs)


def flash_attn_varlen_func_2_8(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                               deterministic=False, return_attn_probs=False, block_table=None):
    assert window_size == (-1, -1) and softcap == 0.0 and alibi_slopes is None and block_table is None
    return _flash_standin(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                          causal, return_attn_probs)


FLASH = "flash_attention_2"
BACKENDS = {"segment": (SEGMENT, None), "sdpa": ("sdpa", None), "eager": ("eager", None),
            "varlen-2.11": (VARLEN, varlen_attn_2_11), "varlen-2.13": (VARLEN, varlen_attn_2_13),
            "flash-2.1": (FLASH, flash_attn_varlen_func_2_1), "flash-2.8": (FLASH, flash_attn_varlen_func_2_8)}


def _set_backend(model, name, monkeypatch):
    impl, standin = BACKENDS[name]
    if impl == FLASH:  # our flash_attention_2 function calls the kernel the probe of flash-attn returns
        monkeypatch.setattr(attention, "flash_varlen", lambda: attention.probe_flash(standin))
        model.config._attn_implementation = FLASH  # set_attn_implementation would look for flash-attn and CUDA
        return
    if standin is not None:  # btrm_varlen calls the kernel the probe of this torch returns
        monkeypatch.setattr(attention, "torch_varlen", lambda: attention.probe_varlen(standin))
    model.set_attn_implementation(impl)


def _rows(tok):
    return [[[render_ids(tok, c) for c in item] for item in row] for row in ROWS]


def _flat(rows):
    return [s for row in rows for item in row for s in item]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_shared_rewards_and_gradients_match_hf(models, backend, monkeypatch):
    tok, ours, ref = models
    _set_backend(ours, backend, monkeypatch)
    rows = _rows(tok)
    packed = [collate(r, share=True, min_prefix=1) for r in rows]
    assert all(p.num_tokens < p.prefix.sequence_tokens for p in packed)  # the prompts really are shared
    rewards = torch.cat([packed_rewards(ours, p) for p in packed])
    loss = bt_loss(rewards[0::2], rewards[1::2])[0]
    loss.backward()

    expected = torch.stack([ref(input_ids=torch.tensor([s])).logits[0, 0] for s in _flat(rows)])
    ref_loss = bt_loss(expected[0::2], expected[1::2])[0]
    ref_loss.backward()
    assert (rewards - expected).abs().max().item() <= 1e-5
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        g, gr = p.grad, ref_params[name].grad
        assert ((g - gr).norm() / gr.norm().clamp_min(1e-12)).item() <= 1e-5, name


@pytest.mark.parametrize("backend", ["segment", "varlen-2.13", "flash-2.8"])
def test_shared_equals_unshared_row(models, backend, monkeypatch):
    """Same rows packed with and without sharing: the same rewards and gradients, with fewer tokens. Unshared
    flash_attention_2 rows are transformers' own flash function (CUDA only): segment stands in for them."""
    tok, ours, _ = models
    rows = _rows(tok)
    grads, rewards = [], []
    for share in (True, False):
        _set_backend(ours, backend if share or not backend.startswith("flash") else "segment", monkeypatch)
        ours.zero_grad()
        r = torch.cat([packed_rewards(ours, collate(row, share=share, min_prefix=1)) for row in rows])
        bt_loss(r[0::2], r[1::2])[0].backward()
        rewards.append(r.detach())
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters()})
    assert (rewards[0] - rewards[1]).abs().max().item() <= 1e-5
    for name, g in grads[0].items():
        assert ((g - grads[1][name]).norm() / grads[1][name].norm().clamp_min(1e-12)).item() <= 1e-5, name


def test_unaware_backend_refuses_shared_rows(models):
    tok, ours, _ = models
    ours.config._attn_implementation = "flex_attention"  # would attend across branches: must raise, not run
    with pytest.raises(ValueError, match="cannot share prompts"):
        packed_rewards(ours, collate(_rows(tok)[0], share=True, min_prefix=1))


def test_flash_probe_and_unshared_rows_go_to_transformers(monkeypatch):
    """The probe refuses a kernel without the keywords we pass; rows without a layout reach transformers' own
    flash_attention_2 function untouched (a recorder stands in for it)."""
    from transformers.integrations import flash_attention as hf_flash

    assert attention.probe_flash(flash_attn_varlen_func_2_1) is flash_attn_varlen_func_2_1
    assert "no softmax_scale, causal" in attention.probe_flash(lambda q, k, v, cu_q, cu_k, mq, mk, dropout_p=0.0: q)
    seen = {}
    monkeypatch.setattr(hf_flash, "flash_attention_forward", lambda *a, **k: seen.update(args=a, kwargs=k))
    q = torch.zeros(1, 2, 3, 4)
    attention.flash_attention(None, q, q, q, None, scaling=0.5, dropout=0.0, sliding_window=None,
                              cu_seq_lens_q="cu", prefix_layout=None)
    assert seen["args"][1] is q and seen["kwargs"] == {"scaling": 0.5, "dropout": 0.0, "sliding_window": None,
                                                       "cu_seq_lens_q": "cu"}


@pytest.mark.parametrize("p,b", [(7, 1), (3, 9), (16, 16)])
def test_cpu_branch_merge_equals_one_masked_call(p, b):
    """The CPU path (flash over P + causal flash over Bi, merged by log-sum-exp) against one masked SDPA call."""
    from btrm.prefix_attention import _branch_attention, bottom_right_causal

    g = torch.Generator().manual_seed(p + b)
    q = torch.randn(1, 4, b, 8, generator=g, requires_grad=True)
    kp, vp = (torch.randn(1, 2, p, 8, generator=g, requires_grad=True) for _ in range(2))
    kb, vb = (torch.randn(1, 2, b, 8, generator=g, requires_grad=True) for _ in range(2))
    got = _branch_attention(q, kp, vp, kb, vb, None, 0.0, True)
    want = F.scaled_dot_product_attention(q, torch.cat([kp, kb], 2), torch.cat([vp, vb], 2), enable_gqa=True,
                                          attn_mask=bottom_right_causal(b, p + b, "cpu"))
    w = torch.randn(want.shape, generator=g)
    grads = torch.autograd.grad((got * w).sum(), (q, kp, vp, kb, vb))
    ref = torch.autograd.grad((want * w).sum(), (q, kp, vp, kb, vb))
    assert (got - want).abs().max().item() <= 1e-5
    for a, r in zip(grads, ref):
        assert (a - r).abs().max().item() <= 1e-5


def test_activation_checkpointing_keeps_the_layout(models):
    """The layout keyword survives transformers' per-layer recomputation: same gradients with checkpointing on."""
    from btrm.modeling import enable_activation_checkpointing

    tok, ours, _ = models
    batch = collate(_rows(tok)[1], share=True, min_prefix=1)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            enable_activation_checkpointing(ours)
        ours.train()
        ours.zero_grad()
        r = packed_rewards(ours, batch)
        bt_loss(r[0::2], r[1::2])[0].backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], rtol=1e-5, atol=1e-7), name
