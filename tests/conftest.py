"""Shared fixtures: tiny random-init bases in the real families' formats, built once per test session."""

from __future__ import annotations

import pytest

from btrm.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """Directory of a 2-layer Llama-3.1-format base (LlamaForCausalLM + tokenizer with chat template, no pad)."""
    return build_tiny_model("llama3", tmp_path_factory.mktemp("tiny-llama3"))


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory):
    """Directory of a 2-layer Qwen3-format base (Qwen3ForCausalLM + tokenizer with chat template, pad <|endoftext|>)."""
    return build_tiny_model("qwen3", tmp_path_factory.mktemp("tiny-qwen3"))
