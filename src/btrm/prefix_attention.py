"""Attention and the reward forward over shared-prefix rows (layout: `btrm.data.prefix`).

The layout travels to the attention function the way `cu_seq_lens_q` does: as an extra keyword argument
(`prefix_layout`) of the decoder's forward, which transformers passes through every layer to the attention
interface. Backends:

- segment (any device): per root, causal SDPA; per branch, Bi's queries over [P; Bi]'s keys with a
  bottom-right-aligned causal mask. On CPU that is two flash calls (all of P; causal Bi) merged by log-sum-exp,
  which skips the masked half of Bi x Bi; elsewhere one masked SDPA call.
- varlen kernels (CUDA; torch's `varlen_attn` under varlen, flash-attn's `flash_attn_varlen_func` under
  flash_attention_2): one varlen call over the roots, one over the branches with keys/values gathered as
  [P; Bi] per branch. The kernel's causal mask must align bottom-right when a sequence has fewer queries than keys;
  the flash kernel behind torch's `varlen_attn` does (its mask admits key j for query i iff
  j <= i + seqlen_k - seqlen_q, per sequence: aten/src/ATen/native/transformers/cuda/flash_attn/mask.h, and
  flash_api.cpp turns causal off when max_seqlen_q is 1, which is only equivalent bottom-right), and so does
  flash-attn from 2.1 on (its `flash_attn_varlen_func` docstring; 2.0 aligned top-left). Gradients reach P
  through the gather.
- sdpa / eager (reference): transformers' own functions with an explicit additive mask.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from btrm.attention import BACKENDS, LAYOUT_KWARG
from btrm.data.prefix import PrefixLayout


# A causal varlen kernel: (q [Tq,H,D], k, v [Tk,Hkv,D], cu_q, cu_k, max_q, max_k, scale) -> [Tq,H,D], mask aligned
# bottom-right per sequence.
VarlenKernel = Callable[..., torch.Tensor]


def bottom_right_causal(n_q: int, n_k: int, device) -> torch.Tensor:
    """Bool [n_q, n_k]: query i (the i-th of the last n_q positions) sees keys 0 .. n_k - n_q + i."""
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(n_k - n_q)


class _BranchAttention(torch.autograd.Function):
    """A branch's queries over [P; Bi] on CPU: flash over P (no mask) plus causal flash over Bi, merged by their
    log-sum-exps. One masked call over [P; Bi] would also compute the masked half of Bi x Bi. The backward runs
    each part's flash backward with the merged output and log-sum-exp, which gives the exact gradients of the
    whole (the identity ring attention uses)."""

    @staticmethod
    def forward(ctx, q, kp, vp, kb, vb, scale):
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        o1, l1 = flash(q, kp, vp, 0.0, False, scale=scale)
        o2, l2 = flash(q, kb, vb, 0.0, True, scale=scale)
        lse = torch.logaddexp(l1, l2)
        out = (o1.float() * (l1 - lse).exp().unsqueeze(-1) + o2.float() * (l2 - lse).exp().unsqueeze(-1)).to(q.dtype)
        ctx.save_for_backward(q, kp, vp, kb, vb, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, kp, vp, kb, vb, out, lse = ctx.saved_tensors
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        grad = grad.contiguous()
        dq1, dkp, dvp = backward(grad, q, kp, vp, out, lse, 0.0, False, scale=ctx.scale)
        dq2, dkb, dvb = backward(grad, q, kb, vb, out, lse, 0.0, True, scale=ctx.scale)
        return dq1 + dq2, dkp, dvp, dkb, dvb, None


def _branch_attention(q, kp, vp, kb, vb, scaling, dropout, gqa):
    if q.device.type == "cpu" and not dropout and hasattr(torch.ops.aten,
                                                          "_scaled_dot_product_flash_attention_for_cpu"):
        return _BranchAttention.apply(q, kp, vp, kb, vb, scaling)
    k, v = torch.cat([kp, kb], dim=2), torch.cat([vp, vb], dim=2)
    mask = bottom_right_causal(q.shape[2], k.shape[2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, dropout_p=dropout, enable_gqa=gqa)


def segment_prefix_attention(query, key, value, layout: PrefixLayout, scaling=None, dropout: float = 0.0):
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] -> [1, T, Hq, D] under the shared-prefix mask."""
    if query.shape[0] != 1:
        raise ValueError("shared-prefix attention expects one packed row (batch size 1)")
    gqa = query.shape[1] != key.shape[1]
    qs, ks, vs = (x.split(layout.lengths, dim=2) for x in (query, key, value))
    outs = []
    for s, (q, k, v) in enumerate(zip(qs, ks, vs)):
        root = layout.parent[s]
        if root < 0:
            outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, dropout_p=dropout,
                                                       enable_gqa=gqa))
            continue
        outs.append(_branch_attention(q, ks[root], vs[root], k, v, scaling, dropout, gqa))
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.transpose(1, 2).contiguous()


def varlen_prefix_attention(query, key, value, layout: PrefixLayout, kernel: VarlenKernel, scaling=None):
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] -> [1, T, Hq, D] with two varlen kernel calls."""
    if query.shape[0] != 1:
        raise ValueError("shared-prefix attention expects one packed row (batch size 1)")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, D]
    ix = layout.varlen_index(q.device)
    if ix.branch is None:  # nothing shared: the roots are the whole row, in order
        return kernel(q, k, v, ix.cu_root, ix.cu_root, ix.max_root, ix.max_root, scaling)[None]
    r = ix.root
    out_root = kernel(q[r], k[r], v[r], ix.cu_root, ix.cu_root, ix.max_root, ix.max_root, scaling)
    out_branch = kernel(q[ix.branch], k[ix.branch_kv], v[ix.branch_kv], ix.cu_branch_q, ix.cu_branch_k,
                        ix.max_branch_q, ix.max_branch_k, scaling)
    return torch.cat([out_root, out_branch]).index_select(0, ix.inverse)[None]


# ----------------------------------------------------------------------------------------------------------------------
# Reward forward


def sharing_mode(model) -> str | None:
    """How `model`'s attention takes a shared-prefix row, from btrm.attention's table: "layout", "mask" or None
    (any other function would silently attend across branches)."""
    impl = model.config._attn_implementation
    return next((b.shares_prompt for b in BACKENDS.values() if b.hf_name == impl), None)


def prefix_rewards(model, input_ids: torch.Tensor, position_ids: torch.Tensor, layout: PrefixLayout) -> torch.Tensor:
    """Rewards [n_seq] (float32, input order) of a shared-prefix row: one decoder pass, head at each end index."""
    from btrm.modeling import decoder_of

    device = next(model.parameters()).device
    mode = sharing_mode(model)
    if mode is None:
        raise ValueError(f"attention implementation {model.config._attn_implementation!r} cannot share prompts; "
                         f"use one of {', '.join(BACKENDS)}, or turn prompt sharing off")
    kwargs = ({"attention_mask": layout.dense_mask(model.dtype, device)} if mode == "mask" else
              {"attention_mask": None, LAYOUT_KWARG: layout})
    out = decoder_of(model)(input_ids=input_ids.to(device), position_ids=position_ids.to(device), use_cache=False,
                            **kwargs)
    ends = torch.tensor(layout.ends, dtype=torch.long, device=device)
    return model.score(out.last_hidden_state[0].index_select(0, ends)).squeeze(-1).float()
