"""Acceptance of the one render function against the seed's recipe and hand-written templated strings."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from transformers import AutoTokenizer

from btrm.render import render_ids, render_many, render_text
from btrm.tiny import build_tokenizer

# Two exchanges; the llama template trims content, the qwen3 one does not.
CONV = [
    {"role": "user", "content": "Hi there "},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
]

LLAMA3_TEXT = (
    "<|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello! How can I help?<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
)
# Only the final assistant turn (after the last user turn) gets the empty think block.
QWEN3_TEXT = (
    "<|im_start|>user\nHi there <|im_end|>\n"
    "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>\n"
)


@pytest.fixture(scope="module")
def llama_tok(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)  # from disk: the saved chat template must survive


@pytest.fixture(scope="module")
def qwen3_tok(tiny_qwen3_dir):
    return AutoTokenizer.from_pretrained(tiny_qwen3_dir)


def seed_recipe(tokenizer, messages, **kwargs) -> list[int]:
    """The Skywork seed's recipe, written out independently of btrm.render."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    if tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token):
        text = text[len(tokenizer.bos_token):]
    return tokenizer(text)["input_ids"]


def test_llama3_text_and_ids(llama_tok):
    assert render_text(llama_tok, CONV) == LLAMA3_TEXT
    ids = render_ids(llama_tok, CONV)
    assert ids == seed_recipe(llama_tok, CONV)
    bos = llama_tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert ids[0] == bos and ids.count(bos) == 1
    assert ids[-1] == llama_tok.convert_tokens_to_ids("<|eot_id|>")
    assert llama_tok.decode(ids) == "<|begin_of_text|>" + LLAMA3_TEXT


def test_llama3_without_strip_would_double_bos(llama_tok):
    # Why render strips: the template emits a BOS string and the tokenizer adds another.
    raw = llama_tok.apply_chat_template(CONV, tokenize=False)
    assert raw.startswith("<|begin_of_text|>")
    bos = llama_tok.bos_token_id
    assert llama_tok(raw)["input_ids"][:2] == [bos, bos]


def test_qwen3_text_and_ids(qwen3_tok):
    assert qwen3_tok.bos_token is None
    assert render_text(qwen3_tok, CONV) == QWEN3_TEXT
    ids = render_ids(qwen3_tok, CONV)
    assert ids == seed_recipe(qwen3_tok, CONV)
    assert ids[0] == qwen3_tok.convert_tokens_to_ids("<|im_start|>")
    assert qwen3_tok.convert_tokens_to_ids("<|endoftext|>") not in ids  # no BOS-like token anywhere
    assert qwen3_tok.convert_ids_to_tokens(ids[-2:]) == ["<|im_end|>", "Ċ"]  # reward token is the newline
    assert ids[-1] != qwen3_tok.pad_token_id
    assert qwen3_tok.decode(ids) == QWEN3_TEXT


def test_render_many_matches_render_ids(llama_tok, qwen3_tok):
    convs = [CONV, CONV[:2], [{"role": "system", "content": "Be brief."}, *CONV[:2]]]
    for tok in (llama_tok, qwen3_tok):
        assert render_many(tok, convs) == [render_ids(tok, c) for c in convs]
        assert render_many(tok, []) == []


def test_system_message_goes_into_the_header(llama_tok, qwen3_tok):
    conv = [{"role": "system", "content": "Be brief."}, *CONV[:2]]
    assert render_text(llama_tok, conv).startswith(
        "<|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
    )
    assert render_text(qwen3_tok, conv).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


def test_llama3_date_string_kwarg(llama_tok):
    kwargs = {"date_string": "01 Jan 2025"}
    text = render_text(llama_tok, CONV, kwargs)
    assert "Today Date: 01 Jan 2025\n" in text and "26 Jul 2024" not in text
    assert render_ids(llama_tok, CONV, kwargs) == seed_recipe(llama_tok, CONV, **kwargs)
    assert render_ids(llama_tok, CONV, kwargs) != render_ids(llama_tok, CONV)


def test_llama32_uses_todays_date_unless_pinned():
    tok = build_tokenizer("llama3.2")
    before = datetime.now()
    text = render_text(tok, CONV)
    days = {(before + timedelta(days=d)).strftime("%d %b %Y") for d in (0, 1)}  # a run across midnight
    assert any(f"Today Date: {d}\n" in text for d in days), text
    pinned = render_text(tok, CONV, {"date_string": "26 Jul 2024"})
    assert pinned == LLAMA3_TEXT
