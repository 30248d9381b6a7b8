"""Tiny reward checkpoints for the inference tests, in the layouts users bring.

- `rm_dirs["llama3"]`, `rm_dirs["qwen3"]`: the trainer's layout (base loaded as *ForSequenceClassification with one
  label, pad token set by btrm.modeling.ensure_pad_token, save_pretrained).
- `rm_dirs["released"]`: written by plain transformers only (LlamaForSequenceClassification(config), random init).
- `rm_dirs["v1"]`: Skywork-V1 style: an added "[PAD]" token and embeddings resized to the tokenizer's length.
- `rm_dirs["base"]`: a base causal LM (no score head).
Score heads are drawn with std 1 so rewards are O(1-10) and a 1e-5 parity check means something.
"""

from __future__ import annotations

import pytest
import torch
from infhelp import SERVER_ARGS, start_server, stop_server, wait_healthy

from btrm.tiny import build_tiny_model, build_tokenizer


def _with_head(model, seed: int):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=gen))
    return model


@pytest.fixture(scope="session")
def rm_dirs(tmp_path_factory):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from btrm.modeling import ensure_pad_token

    root = tmp_path_factory.mktemp("rm")
    dirs = {}
    for fam in ("llama3", "qwen3"):
        base = build_tiny_model(fam, root / f"base_{fam}", seed=1)
        tok = AutoTokenizer.from_pretrained(base)
        pad = ensure_pad_token(tok)
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, pad_token_id=pad)
        out = root / f"rm_{fam}"
        _with_head(model, 2).save_pretrained(out)
        tok.save_pretrained(out)
        dirs[fam] = out
    dirs["base"] = root / "base_llama3"

    # Released layout, no btrm involved: a config built by hand, pad = a reserved special token.
    tok = build_tokenizer("llama3")
    tok.pad_token = "<|finetune_right_pad_id|>"
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=2048,
                         num_labels=1, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.convert_tokens_to_ids("<|eot_id|>"))
    torch.manual_seed(3)
    out = root / "released"
    _with_head(LlamaForSequenceClassification(config), 4).save_pretrained(out)
    tok.save_pretrained(out)
    dirs["released"] = out

    # V1 style: "[PAD]" added after the vocab (id = old vocab size), embeddings resized to len(tokenizer).
    tok = build_tokenizer("llama3")
    tok.add_special_tokens({"pad_token": "[PAD]"})
    config = LlamaConfig(vocab_size=len(tok) - 1, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, num_labels=1)
    torch.manual_seed(5)
    model = LlamaForSequenceClassification(config)
    model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    out = root / "v1"
    _with_head(model, 6).save_pretrained(out)
    tok.save_pretrained(out)
    dirs["v1"] = out
    return dirs


@pytest.fixture(scope="session")
def servers(rm_dirs):
    """Three `btrm serve` processes on the llama3 checkpoint: "a", "b" and "spare" (a test may kill the spare)."""
    procs = {}
    try:
        for name in ("a", "b", "spare"):  # start all, then wait: the model loads run side by side
            procs[name] = start_server(rm_dirs["llama3"], *SERVER_ARGS)
        for proc, url in procs.values():
            wait_healthy(proc, url)
        yield {name: url for name, (_, url) in procs.items()} | {"procs": {n: p for n, (p, _) in procs.items()}}
    finally:
        for proc, _ in procs.values():
            stop_server(proc)
