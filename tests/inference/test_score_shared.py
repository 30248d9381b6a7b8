"""Scoring with shared prompts: the same rewards as without sharing and as plain transformers, fewer tokens."""

from __future__ import annotations

import random

import pytest
import torch
from infhelp import hf_reward, make_conversations
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from btrm.inference.scorer import RewardModel

PROMPT = [{"role": "system", "content": "You are a helpful assistant."},
          {"role": "user", "content": "what is two plus three please help me with my homework"},
          {"role": "assistant", "content": "of course here is a short answer"},
          {"role": "user", "content": "and what is the ocean like today"}]
RESPONSES = ["the ocean is calm today", "calm", "calm", "many people say music helps when you read a book",
             {"role": "assistant", "content": "rain"},
             [{"role": "assistant", "content": "trains"}, {"role": "user", "content": "and rain?"},
              {"role": "assistant", "content": "rain too"}]]


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_best_of_n_matches_hf_and_unshared(rm_dirs, family):
    path = rm_dirs[family]
    shared = RewardModel.from_pretrained(path, dtype="fp32")
    plain = RewardModel.from_pretrained(path, dtype="fp32", share_prompt=False)
    got = shared.score_responses(PROMPT, RESPONSES)
    assert got == pytest.approx(plain.score_responses(PROMPT, RESPONSES), abs=1e-5)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    convs = [PROMPT + ([{"role": "assistant", "content": r}] if isinstance(r, str) else [r] if isinstance(r, dict)
                       else r) for r in RESPONSES]
    assert got == pytest.approx([hf_reward(model, tok, c) for c in convs], abs=1e-5)
    assert got[1] == got[2] and len(set(got)) == len(got) - 1  # the duplicate scores alike, the others differ
    assert shared.token_counts["sequences"] == plain.token_counts["forward"] == plain.token_counts["sequences"]
    assert shared.token_counts["forward"] < 0.5 * plain.token_counts["forward"]


def test_mixed_call_in_input_order(rm_dirs):
    """Unrelated conversations and groups of responses to a few prompts, shuffled, in several token-budget rows."""
    rm = RewardModel.from_pretrained(rm_dirs["llama3"], dtype="fp32", batch_tokens=512)
    plain = RewardModel.from_pretrained(rm_dirs["llama3"], dtype="fp32", batch_tokens=512, share_prompt=False)
    convs = make_conversations(12, seed=5)
    convs += [c[:-1] + [{"role": "assistant", "content": r}] for c in convs[:3] for r in ("yes", "no", "of course")]
    random.Random(0).shuffle(convs)
    assert rm.score(convs) == pytest.approx(plain.score(convs), abs=1e-5)
    assert rm.token_counts["forward"] < plain.token_counts["forward"]
