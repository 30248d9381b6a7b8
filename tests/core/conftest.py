"""Fixtures shared by the core tests: tokenizers and reward models built from the session's tiny bases."""

import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from btrm.attention import SEGMENT
from btrm.modeling import ensure_pad_token, load_reward_model


@pytest.fixture
def tok(tiny_llama_dir):
    t = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ensure_pad_token(t)
    return t


@pytest.fixture(params=["llama", "qwen3"])
def models(request, tiny_llama_dir, tiny_qwen3_dir):
    """(tokenizer, our reward model, transformers' own model with the same weights) per family."""
    path = str(tiny_llama_dir if request.param == "llama" else tiny_qwen3_dir)
    tok = AutoTokenizer.from_pretrained(path)
    ensure_pad_token(tok)
    ours = load_reward_model(path, tok, attn_implementation=SEGMENT, seed=3, head_init_std=1.0)  # O(1) rewards
    ref = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, pad_token_id=tok.pad_token_id)
    ref.load_state_dict(ours.state_dict())
    return tok, ours, ref
