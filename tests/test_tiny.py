"""The offline stand-ins: tokenizer formats, tiny model directories, and the synthetic preference set."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from btrm.render import render_ids
from btrm.tiny import FAMILIES, build_tiny_model, build_tokenizer, make_preference_rows, write_preference_jsonl


# ----------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_is_fast_small_and_deterministic(family):
    t0 = time.perf_counter()
    a = build_tokenizer(family)
    assert time.perf_counter() - t0 < 2.0
    b = build_tokenizer(family)
    assert a.get_vocab() == b.get_vocab()
    assert 1000 <= len(a) <= 2100
    assert a.model_max_length >= 32768
    text = "Hello world, the quick brown fox.\n\nTHIS IS LOUD. 12345 café"
    assert a.decode(a(text, add_special_tokens=False)["input_ids"]) == text  # byte-level: lossless


def test_llama_special_tokens():
    tok = build_tokenizer("llama3")
    assert tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|eot_id|>" and tok.pad_token is None
    for t in ("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>",
              "<|finetune_right_pad_id|>", "<|reserved_special_token_0|>"):
        assert t in tok.all_special_tokens or t in tok.get_added_vocab(), t
        assert tok.convert_tokens_to_ids(t) >= len(tok) - 16  # after the BPE vocab, as in the real one
    ids = tok("hello")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok("hello", add_special_tokens=False)["input_ids"] == ids[1:]


def test_qwen3_special_tokens():
    tok = build_tokenizer("qwen3")
    assert tok.bos_token is None and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok("hello")["input_ids"] == tok("hello", add_special_tokens=False)["input_ids"]
    for t in ("<|im_start|>", "<think>", "</think>"):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t


def test_generation_prompt():
    conv = [{"role": "user", "content": "hi"}]
    llama = build_tokenizer("llama3").apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert llama.endswith("hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    qwen = build_tokenizer("qwen3").apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert qwen == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# ----------------------------------------------------------------------------------------------------------
# Tiny models
# ----------------------------------------------------------------------------------------------------------


def _check_model_dir(path, family):
    cfg = AutoConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template == build_tokenizer(family).chat_template
    assert cfg.vocab_size == len(tok) and cfg.max_position_embeddings >= 32768
    if family.startswith("llama"):
        assert cfg.model_type == "llama" and cfg.pad_token_id is None
        assert cfg.bos_token_id == tok.bos_token_id and tok.eos_token_id in cfg.eos_token_id
    else:
        assert cfg.model_type == "qwen3" and cfg.pad_token_id == tok.pad_token_id
        assert cfg.eos_token_id == tok.eos_token_id
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    assert model.score.weight.shape == (1, cfg.hidden_size) and model.score.bias is None
    assert model.dtype == torch.float32
    ids = render_ids(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    with torch.no_grad():
        out = model(torch.tensor([ids])).logits
    assert out.shape == (1, 1) and torch.isfinite(out).all()


def test_tiny_llama_dir(tiny_llama_dir):
    _check_model_dir(tiny_llama_dir, "llama3")


def test_tiny_qwen3_dir(tiny_qwen3_dir):
    _check_model_dir(tiny_qwen3_dir, "qwen3")


def test_tiny_model_is_deterministic(tmp_path, tiny_llama_dir):
    a = build_tiny_model("llama3", tmp_path / "a", seed=0)
    b = build_tiny_model("llama3", tmp_path / "b", seed=1)
    same = (tiny_llama_dir / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() == same
    assert (b / "model.safetensors").read_bytes() != same


def test_llama32_model_dir(tmp_path):
    _check_model_dir(build_tiny_model("llama3.2", tmp_path), "llama3.2")


# ----------------------------------------------------------------------------------------------------------
# Preference rows
# ----------------------------------------------------------------------------------------------------------


def test_rows_schema():
    rows = make_preference_rows(60)
    assert len(rows) == 60
    assert {r["source"] for r in rows} == {"tiny-case", "tiny-temperature", "tiny-tone"}
    for r in rows:
        assert set(r) == {"chosen", "rejected", "source"}
        assert [m["role"] for m in r["chosen"]] == ["user", "assistant"]
        assert [m["role"] for m in r["rejected"]] == ["user", "assistant"]
        assert r["chosen"][0] == r["rejected"][0]
        assert r["chosen"][1]["content"] != r["rejected"][1]["content"]
        assert all(isinstance(m["content"], str) and m["content"] for m in r["chosen"] + r["rejected"])


def test_rows_are_deterministic():
    assert make_preference_rows(50, seed=3) == make_preference_rows(50, seed=3)
    assert make_preference_rows(50, seed=3) != make_preference_rows(50, seed=4)
    assert make_preference_rows(80, seed=3)[:50] == make_preference_rows(50, seed=3)


def _longer_wins(chosen: list[int], rejected: list[int]) -> float:
    """Accuracy of the rule "the longer response is chosen" (ties count half)."""
    return sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)) / len(chosen)


@pytest.mark.parametrize("unit", ["chars", "tokens"])
def test_length_does_not_predict_the_label(unit):
    rows = make_preference_rows(1200, seed=0)
    tok = build_tokenizer("llama3")

    def lengths(rows, side):
        texts = [r[side][-1]["content"] for r in rows]
        return list(map(len, texts if unit == "chars" else tok(texts, add_special_tokens=False)["input_ids"]))

    acc = _longer_wins(lengths(rows, "chosen"), lengths(rows, "rejected"))
    assert acc <= 0.60 and 1 - acc <= 0.60, acc  # longer-wins and shorter-wins both near chance
    for source in {r["source"] for r in rows}:
        part = [r for r in rows if r["source"] == source]
        acc = _longer_wins(lengths(part, "chosen"), lengths(part, "rejected"))
        assert 0.35 <= acc <= 0.65, (source, acc)


def test_rows_render_short(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    lengths = [len(render_ids(tok, r[side])) for r in make_preference_rows(300) for side in ("chosen", "rejected")]
    assert max(lengths) <= 120  # incl. ~28 tokens of Llama system header: CPU training stays quick


def test_write_jsonl(tmp_path):
    path = write_preference_jsonl(tmp_path / "d" / "pairs.jsonl", 7, seed=2)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == make_preference_rows(7, seed=2)


def test_builtins_are_materialised_per_version(tmp_path):
    """A cache holding synthetic pairs from an older generator is not reused: paths carry BUILTIN_VERSION."""
    from btrm.builtin import resolve_builtins
    from btrm.config import Config, SourceConfig
    from btrm.tiny import BUILTIN_VERSION

    stale = tmp_path / "builtin" / "synthetic-30-0.jsonl"  # where a version-1 btrm wrote it
    stale.parent.mkdir(parents=True)
    stale.write_text('{"stale": true}\n')
    cfg = Config()
    cfg.data.cache_dir = str(tmp_path)
    cfg.data.sources = [SourceConfig(path="synthetic:30")]
    resolved = resolve_builtins(cfg, is_main=True, barrier=lambda: None)
    path = Path(resolved.data.sources[0].path)
    assert path == tmp_path / "builtin" / f"v{BUILTIN_VERSION}" / "synthetic-30-0.jsonl"
    assert [json.loads(line) for line in path.read_text().splitlines()] == make_preference_rows(30)
    assert cfg.data.sources[0].path == "synthetic:30"  # the caller's config is not modified
