"""Shared fixtures: tiny random-init bases in the real families' formats, built once per test session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory):
    """A quickstart-recipe model trained by `train.py` for 40 steps on `synthetic:400` (~1-2 min on 2 cores), built
    once per session. It separates the synthetic labels: ~76% pairwise accuracy on fresh synthetic pairs."""
    out = tmp_path_factory.mktemp("trained")
    cmd = [sys.executable, "train.py", "--config", "configs/quickstart.yaml", "--train.max_steps=40",
           f"--train.output_dir={out}", f"--data.cache_dir={out / 'cache'}", "--logging.wandb=false",
           "--logging.progress=false", "--data.sources=[{path: 'synthetic:400'}]"]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out / "checkpoint-40"
