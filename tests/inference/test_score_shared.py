"""Scoring with shared prompts: the same rewards as without sharing and as plain transformers, fewer tokens."""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

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


def test_btrm_score_same_with_sharing_off(rm_dirs, tmp_path, capsys):
    from btrm.cli import main

    rows = [{"id": i, "messages": PROMPT + [{"role": "assistant", "content": r}]}
            for i, r in enumerate(RESPONSES[:4])]
    rows += [{"chosen": PROMPT + [{"role": "assistant", "content": "rain"}],
              "rejected": PROMPT + [{"role": "assistant", "content": "rain and trains"}]}]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    outs, reports = [], []
    for extra in ([], ["--no-share-prompt"]):
        out = tmp_path / f"out{len(extra)}.jsonl"
        assert main(["score", "--model", str(rm_dirs["llama3"]), "--input", str(inp), "--output", str(out),
                     *extra]) == 0
        outs.append([json.loads(line) for line in out.read_text().splitlines()])
        reports.append(re.search(r"decoder ran on ([\d,]+) tokens for ([\d,]+)", capsys.readouterr().out).groups())
    for a, b in zip(*outs):
        for k in ("reward", "chosen", "rejected"):
            if k in a:
                assert a[k] == pytest.approx(b[k], abs=1e-5)
    (fwd_on, seq_on), (fwd_off, seq_off) = ([int(x.replace(",", "")) for x in r] for r in reports)
    assert seq_on == seq_off == fwd_off and fwd_on < 0.6 * fwd_off


def test_eval_harness_same_with_sharing_off(rm_dirs):
    """RewardBench 2 best-of-4 rows: identical per-row results, fewer decoder tokens."""
    from btrm.eval.harness import evaluate

    data = Path(__file__).parents[1] / "eval" / "fixtures" / "rewardbench2.jsonl"

    results, models = [], []
    for share in (True, False):
        rm = RewardModel.from_pretrained(rm_dirs["qwen3"], dtype="fp32", share_prompt=share)
        results.append(evaluate(rm.score, "rewardbench2", str(data), progress=False))
        models.append(rm)
    a, b = results
    assert a["overall"] == pytest.approx(b["overall"], abs=1e-5)
    assert a["subsets"] == pytest.approx(b["subsets"], abs=1e-5)
    assert {k: v for k, v in a.items() if k not in ("overall", "subsets")} == \
        {k: v for k, v in b.items() if k not in ("overall", "subsets")}
    assert models[0].token_counts["forward"] < models[1].token_counts["forward"] == models[1].token_counts["sequences"]


def test_btrm_eval_same_with_sharing_off_and_logs_fewer_tokens(rm_dirs, tmp_path, caplog):
    """`btrm eval` on RewardBench 2 best-of-4 rows: identical per-row scores and results, and the token counts its
    log lines report (parsed as written) are smaller with sharing."""
    from btrm.cli import main

    data = Path(__file__).parents[1] / "eval" / "fixtures" / "rewardbench2.jsonl"
    line = re.compile(r"scored \d+ conversations: decoder ran on ([\d,]+) tokens for ([\d,]+) sequence tokens")
    rows, results, counts = [], [], []
    for extra in ([], ["--no-share-prompt"]):
        out = tmp_path / f"eval{len(extra)}"
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="btrm.eval"):
            assert main(["eval", "--model", str(rm_dirs["qwen3"]), "--benchmark", "rewardbench2", "--data", str(data),
                         "--dtype", "fp32", "--output-dir", str(out), *extra]) == 0
        found = [line.search(r.getMessage()) for r in caplog.records if r.name == "btrm.eval"]
        assert found and all(found), [r.getMessage() for r in caplog.records]
        counts.append([sum(int(m.group(k).replace(",", "")) for m in found) for k in (1, 2)])
        rows.append([json.loads(x) for x in (out / "rewardbench2.rows.jsonl").read_text().splitlines()[1:]])
        results.append(json.loads((out / "rewardbench2.results.json").read_text()))
    assert [r["id"] for r in rows[0]] == [r["id"] for r in rows[1]]
    for a, b in zip(*rows):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5) and a["result"] == b["result"]
    assert results[0]["overall"] == pytest.approx(results[1]["overall"], abs=1e-5)
    assert results[0]["subsets"] == pytest.approx(results[1]["subsets"], abs=1e-5)
    (fwd_on, seq_on), (fwd_off, seq_off) = counts
    assert seq_on == seq_off == fwd_off and fwd_on < fwd_off


def test_server_shares_prefixes_across_texts(servers, rm_dirs):
    from infhelp import get_json, post

    from btrm.render import render_text

    plain = RewardModel.from_pretrained(rm_dirs["llama3"], share_prompt=False)
    convs = [PROMPT + [{"role": "assistant", "content": r}] for r in RESPONSES[:4]]
    texts = [render_text(plain.tokenizer, c) for c in convs]
    before = get_json(servers["a"] + "/health")[1]["tokens"]
    status, out = post(servers["a"] + "/classify", {"text": texts})
    assert status == 200
    assert [o["embedding"][0] for o in out] == pytest.approx(plain.score(convs), abs=1e-5)
    after = get_json(servers["a"] + "/health")[1]["tokens"]
    assert after["forward"] - before["forward"] < after["sequences"] - before["sequences"]
