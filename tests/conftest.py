"""Session fixtures: tiny base checkpoints (random init, locally built tokenizers) in the real families' formats."""

import pytest

from btrm.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return build_tiny_model("llama3", tmp_path_factory.mktemp("tiny") / "llama3")


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory):
    return build_tiny_model("qwen3", tmp_path_factory.mktemp("tiny") / "qwen3")
