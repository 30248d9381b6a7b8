"""Reward model = decoder + `score = Linear(hidden, 1, bias=False)` (HF *ForSequenceClassification layout).

The packed forward runs the decoder once over a packed row (position_ids restarting per sequence, no attention
mask) and applies the score head only at each sequence's end index. The attention backends that read the
segment boundaries, and the choice among them, live in btrm.attention.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from btrm.attention import SEGMENT, register_all
from btrm.prefix_attention import prefix_rewards
from btrm.render import render_ids

log = logging.getLogger(__name__)

register_all()  # our attention functions, under their transformers names, for any model loaded after this import


# ----------------------------------------------------------------------------------------------------------------------
# Precision

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
           "float": torch.float32}


def resolve_dtype(name: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """auto = bf16 on CUDA, fp32 elsewhere; also bf16/bfloat16, fp32/float32 or a torch.dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r}: expected 'auto', 'bf16', 'fp32' or a torch.dtype")
    return _DTYPES[name]


# ----------------------------------------------------------------------------------------------------------------------
# Pad token: HF pools the rightmost token != pad_token_id, so pad must never end a rendered conversation.

_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", "<|endoftext|>", "<pad>")
_PROBE = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def conversation_end_token(tokenizer, chat_template_kwargs: dict | None = None) -> int:
    """The token that ends a rendered conversation (where the reward is read): the pad id must differ from it."""
    return render_ids(tokenizer, _PROBE, chat_template_kwargs)[-1]


def ensure_pad_token(tokenizer, requested: str | None = None, chat_template_kwargs: dict | None = None) -> int:
    """Set a pad token that is not the last token of a rendered conversation; returns its id. No vocab resize."""
    last = conversation_end_token(tokenizer, chat_template_kwargs)
    vocab = tokenizer.get_vocab()
    if requested is not None:
        if requested not in vocab:
            raise ValueError(f"model.pad_token {requested!r} is not in the tokenizer's vocabulary")
        tokenizer.pad_token = requested
    elif tokenizer.pad_token is None or tokenizer.pad_token_id == last:
        for cand in _PAD_CANDIDATES:
            if cand in vocab and vocab[cand] != last:
                tokenizer.pad_token = cand
                break
        else:
            raise ValueError("tokenizer has no usable pad token; set model.pad_token to an unused special token")
    check_pad_token(tokenizer.pad_token_id, last)
    return tokenizer.pad_token_id


def check_pad_token(pad_id: int | None, last_token_id: int) -> None:
    if pad_id is None:
        raise ValueError("pad_token_id is not set")
    if pad_id == last_token_id:
        raise ValueError(f"pad_token_id {pad_id} equals the token that ends a rendered conversation: "
                         "HF pooling would read every reward one token early")


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def load_reward_model(name_or_path: str, tokenizer, *, dtype: torch.dtype = torch.float32,
                      attn_implementation: str = SEGMENT, trust_remote_code: bool = False,
                      head_init_std: float | None = None, seed: int = 0, **hf_kwargs: Any):
    """Load a base or a reward checkpoint as *ForSequenceClassification with one label.

    A base without a `score` weight gets a fresh head N(0, std) drawn from `seed` on the whole (gathered)
    parameter, identical on every rank, so ZeRO-3 shards never hold an independently drawn slice.
    """
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    model, info = AutoModelForSequenceClassification.from_pretrained(
        name_or_path, config=config, dtype=dtype, attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code, output_loading_info=True, **hf_kwargs)
    head = model.score if hasattr(model, "score") else None
    if head is None or not isinstance(head, torch.nn.Linear) or head.out_features != 1 or head.bias is not None:
        raise ValueError(f"{type(model).__name__} has no `score = Linear(hidden, 1, bias=False)` head")
    if any(k.endswith("score.weight") for k in info.get("missing_keys", [])):
        std = head_init_std if head_init_std is not None else getattr(config, "initializer_range", 0.02)
        init_score_head(head, std, seed)
    return model


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in backward (non-reentrant), through whichever name this transformers has.

    transformers 5.x renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` and warns on
    the old name; both reach the same per-layer checkpointing.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def init_score_head(head: torch.nn.Linear, std: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with _gathered(head.weight):
        w = torch.randn(head.weight.shape, generator=gen, dtype=torch.float32) * std
        head.weight.data.copy_(w.to(head.weight.dtype))


class _gathered:
    """Context giving the full parameter under ZeRO-3 (modifications broadcast from rank 0), no-op otherwise."""

    def __init__(self, param):
        self.param = param
        self.ctx = None

    def __enter__(self):
        if hasattr(self.param, "ds_id"):
            import deepspeed

            self.ctx = deepspeed.zero.GatheredParameters([self.param], modifier_rank=0)
            self.ctx.__enter__()
        return self.param

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False


# ----------------------------------------------------------------------------------------------------------------------
# Packed forward


def decoder_of(model):
    return getattr(model, model.base_model_prefix)


def packed_rewards(model, batch) -> torch.Tensor:
    """Rewards [n_seq] (float32) for a PackedBatch: one decoder pass over the row, head at each end index."""
    if getattr(batch, "prefix", None) is not None:  # gpu_check passes a bare namespace with the row only
        return prefix_rewards(model, batch.input_ids, batch.position_ids, batch.prefix)
    device = next(model.parameters()).device
    out = decoder_of(model)(
        input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device), attention_mask=None,
        use_cache=False, cu_seq_lens_q=batch.cu_seqlens.to(device), cu_seq_lens_k=batch.cu_seqlens.to(device),
        max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen)
    hidden = out.last_hidden_state[0]  # [T, H]
    ends = batch.ends.to(device)
    return model.score(hidden.index_select(0, ends)).squeeze(-1).float()
