"""Ulysses sequence parallelism for packed reward rows, through DeepSpeed's `UlyssesSPAttentionHF`.

With `train.sequence_parallel_size` = SP > 1, the SP ranks of a data-parallel replica (btrm.distributed) split
each packed row along the sequence: the row (up to `data.max_tokens` x SP tokens) is padded to a multiple of SP
and rank s of the group runs the decoder over tokens [s*T/SP, (s+1)*T/SP). Projections, MLPs and norms see only
that slice; in each attention layer DeepSpeed's wrapper exchanges heads for sequence (all-to-all), so our attention
function (segment, varlen or flash-attn) runs over the WHOLE row with H/SP heads, reading the row's segment bounds
(`cu_seq_lens_q/k`) or shared-prefix layout exactly as without SP, and a second all-to-all gives the slice back.

Rewards: a sequence's reward token sits on whichever rank holds that index. Each rank scores the ends in its slice
and the group sums the partial vectors (`_GroupSum`), so every rank holds all the row's rewards and computes the
same loss. Its backward hands each rank the gradient of the rewards unchanged: the group's parameter gradients
then add up to that loss's gradient once, and DeepSpeed (given the SP groups as its mpu) sums gradients over the
ranks of a group and averages over the replicas, so each pair stays 1/N of the step (docs/design.md).

The padding is a segment of its own at the end of the row; nothing reads its reward.
"""

from __future__ import annotations

import torch

from btrm.attention import BACKENDS, LAYOUT_KWARG
from btrm.config import sp_heads_error
from btrm.data.prefix import PrefixLayout
from btrm.distributed import Dist
from btrm.errors import UserError

# Ulysses drops transformers' dense mask (DeepSpeed's wrapper passes attention_mask=None), so only kernels that
# read the packed row's segment bounds keep sequences apart; sdpa over a packed row would attend across them.
SP_BACKENDS = ("segment", "varlen", "flash_attention_2")


def check_model(model_config, sp: int) -> None:
    """The heads split over SP ranks (btrm.config.sp_heads_error)."""
    text = model_config.get_text_config()
    why = sp_heads_error(sp, text.num_attention_heads, text.num_key_value_heads)
    if why:
        raise UserError(f"train.sequence_parallel_size={sp}: {why}")


def check_attention(hf_name: str, sp: int) -> None:
    ok = {BACKENDS[b].hf_name for b in SP_BACKENDS}
    if hf_name not in ok:
        raise UserError(f"train.sequence_parallel_size={sp} needs model.attn_implementation segment, varlen or "
                        f"flash_attention_2 (kernels that read the packed row's bounds), not {hf_name}")


def enable(model, hf_name: str, dist: Dist):
    """Route `model`'s attention (`hf_name`) through DeepSpeed's Ulysses wrapper; returns DeepSpeed's mpu (the SP
    groups), for `deepspeed.initialize(mpu=...)`. Once per process: the wrapper replaces `hf_name` globally."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=hf_name, sequence_parallel_size=dist.sp_size,
        micro_batch_size=1, seq_length_is_variable=True)
    if mpu.get_sequence_parallel_rank() != dist.sp_rank:
        raise AssertionError("DeepSpeed's SP groups differ from btrm.distributed's consecutive-rank layout")
    dist.sp_group = mpu.get_sequence_parallel_group()
    return mpu


class _GroupSum(torch.autograd.Function):
    """Sum over the SP group; the backward passes the gradient through unchanged. Every rank computes the same loss
    from the summed rewards, so each already holds the full gradient of its own partial rewards (a summing
    backward would count the loss SP times)."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.clone()
        torch.distributed.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def rewards(model, batch, dist: Dist) -> torch.Tensor:
    """Rewards [n_seq] (float32, the same on every rank of the group) of a PackedBatch split over the SP group."""
    from btrm.modeling import decoder_of

    sp, device = dist.sp_size, next(model.parameters()).device
    ids, pos, cu, max_len = batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen
    layout = batch.prefix
    t = ids.shape[1]
    pad = -t % sp
    if pad:  # a trailing segment of its own, so every rank holds T / SP tokens
        ids = torch.cat([ids, ids.new_full((1, pad), model.config.pad_token_id)], dim=1)
        pos = torch.cat([pos, torch.arange(pad, dtype=pos.dtype)[None]], dim=1)
        cu = torch.cat([cu, cu.new_tensor([t + pad])])
        max_len = max(max_len, pad)
        if layout is not None:
            layout = PrefixLayout(layout.lengths + [pad], layout.parent + [-1], layout.ends, layout.sequence_tokens)
    n = (t + pad) // sp
    lo = dist.sp_rank * n
    if layout is not None:
        kwargs = {LAYOUT_KWARG: layout}
    else:
        cu = cu.to(device)
        kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)
    out = decoder_of(model)(input_ids=ids[:, lo:lo + n].to(device), position_ids=pos[:, lo:lo + n].to(device),
                            attention_mask=None, use_cache=False, **kwargs)
    ends = batch.ends.to(device)
    mine = torch.nonzero((ends >= lo) & (ends < lo + n)).squeeze(-1)
    # an empty selection still links the loss to this rank's slice: its backward runs the all-to-alls too
    local = model.score(out.last_hidden_state[0].index_select(0, ends[mine] - lo)).squeeze(-1).float()
    partial = torch.zeros(len(ends), dtype=torch.float32, device=device).index_add(0, mine, local)
    return _GroupSum.apply(partial, dist.sp_group)
