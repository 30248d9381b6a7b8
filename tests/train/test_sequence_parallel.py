"""Ulysses sequence parallelism (btrm.sequence_parallel) under the real `deepspeed` launcher: SP = 2 (and
SP = 2 x DP = 2) give the same step losses and final weights as one process without it, fp32, on the same rows.

`data.max_tokens` is per rank, so the one-process reference runs with max_tokens x 2: the same row budget, the same
rows. Plain SGD (lr 1), as in test_share_prompt: the weights then differ only by float summation order, which a
reward read on the wrong rank, a pair counted twice or attention across segments would raise far above 1e-5.
"""

import json
import random
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from btrm.data.prefix import shared_prefix_len
from btrm.errors import UserError
from btrm.render import render_ids
from btrm.sequence_parallel import check_attention, check_model
from btrm.tiny import write_preference_jsonl

from trainhelp import REPO, env, launcher_cmd, metrics, train, write_config

STEPS = 3
PER_RANK = 96  # data.max_tokens of the SP runs (the reference: 2 x this), unless a test says otherwise


def _run(tmp_path, name, model_dir, data_file, nproc, sp, per_rank=PER_RANK, zero=2, **data):
    d = tmp_path / name
    d.mkdir()
    config = write_config(d, model_dir, data_file, optim={"name": "sgd", "lr": 1.0, "grad_clip": 0.0},
                          data={"max_tokens": per_rank * 2 // sp, "eval_fraction": 0.2, **data},
                          train={"max_steps": STEPS, "global_batch_pairs": 8, "eval_every": 2,
                                 "sequence_parallel_size": sp},
                          deepspeed={"zero_stage": zero})
    train(config, nproc)
    return d / "out"


def _assert_same(ref, sp_out):
    a, b = metrics(ref), metrics(sp_out)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert a[step]["pairs"] == b[step]["pairs"] == 8  # every pair counted once, not once per SP rank
        for key in ("loss", "accuracy", "chosen_reward", "rejected_reward"):
            assert abs(a[step][key] - b[step][key]) <= 1e-5, (step, key, a[step][key], b[step][key])
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=1e-5)  # a norm of ~5 at step 3
    assert abs(a[2]["eval/loss"] - b[2]["eval/loss"]) <= 1e-5
    wa, wb = (load_file(o / f"checkpoint-{STEPS}" / "model.safetensors") for o in (ref, sp_out))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), rtol=0, atol=1e-5), k
    assert a[STEPS]["loss"] < a[1]["loss"]  # it trained


def _long_prompt_pairs(path, n):
    """Pairs with a long shared prompt and ~20-token answers: packed with the prompt once, a pair takes more than
    half a row (so it is alone in its row) and each conversation is longer than half of that."""
    rng = random.Random(0)
    rows = []
    for i in range(n):
        prompt = f"Question {i}: " + "the " * 40 + "ok?"
        good = " ".join(rng.choice(["good", "fine", "nice", "yes"]) for _ in range(rng.randint(8, 12)))
        bad = " ".join(rng.choice(["bad", "poor", "no", "weak"]) for _ in range(rng.randint(8, 12)))
        rows.append({side: [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
                     for side, text in (("chosen", good), ("rejected", bad))})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


@pytest.fixture(scope="module")
def llama_reference(tmp_path_factory, tiny_llama_dir):
    """Synthetic pairs and the one-process run on them that the Llama SP runs are compared with. Rows of two or
    three whole pairs (no prompt sharing, ~100-150 tokens a pair in a row of 320): sequences cross the slice
    boundary anywhere."""
    tmp = tmp_path_factory.mktemp("sp-llama")
    data_file = write_preference_jsonl(tmp / "pairs.jsonl", 50, seed=5)
    return data_file, _run(tmp, "ref", tiny_llama_dir, data_file, 1, 1, per_rank=160, share_prompt=False)


@pytest.mark.slow
def test_sp2_equals_one_process_llama(tmp_path, tiny_llama_dir, llama_reference):
    data_file, ref = llama_reference
    sp = _run(tmp_path, "sp2", tiny_llama_dir, data_file, 2, 2, per_rank=160, share_prompt=False)
    _assert_same(ref, sp)
    assert metrics(sp)[1]["packing"] == metrics(ref)[1]["packing"]  # the same rows, filled the same
    assert metrics(sp)[1]["micro_steps"] < 8  # several pairs in a row


@pytest.mark.slow
def test_sp2_equals_one_process_qwen3_long_pairs_shared_prompt(tmp_path, tiny_qwen3_dir):
    """GQA (4 query, 2 key/value heads: one KV head per rank) and shared-prompt rows whose pair is longer than a
    rank's slice: each pair is alone in its row, its first token on SP rank 0, both reward tokens on rank 1."""
    data_file, rows = _long_prompt_pairs(tmp_path / "long.jsonl", 30)
    tok = AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    for row in rows:
        c, r = render_ids(tok, row["chosen"]), render_ids(tok, row["rejected"])
        p = shared_prefix_len([c, r])
        row_len = p + (len(c) - p) + (len(r) - p)  # packed with its prompt once
        assert len(c) + len(r) <= 2 * PER_RANK  # kept (not over-long)
        assert row_len > PER_RANK  # no two pairs share a row: each pair starts its row
        half = -(-row_len // 2)  # rank 1 holds row indices [half, row_len)
        assert len(c) > half and len(r) > half  # each conversation longer than a rank's slice
        assert len(c) - 1 >= half  # chosen: first token (row index 0) on rank 0, reward token on rank 1
    ref = _run(tmp_path, "ref", tiny_qwen3_dir, data_file, 1, 1)
    sp = _run(tmp_path, "sp2", tiny_qwen3_dir, data_file, 2, 2)
    _assert_same(ref, sp)
    assert metrics(sp)[1]["prompt_tokens_saved"] > 0.3  # the shared-prompt layout was used


@pytest.mark.slow
def test_sp2_zero3_equals_one_process(tmp_path, tiny_llama_dir, llama_reference):
    """ZeRO-3 partitions at load and reduce-scatters gradients, averaging over every rank rather than the
    data-parallel replicas (the trainer's loss scale accounts for it)."""
    data_file, ref = llama_reference
    _assert_same(ref, _run(tmp_path, "zero3", tiny_llama_dir, data_file, 2, 2, per_rank=160, zero=3,
                           share_prompt=False))


@pytest.mark.slow
def test_sp2_dp2_four_ranks_equal_one_process(tmp_path, tiny_llama_dir, llama_reference):
    data_file, ref = llama_reference
    sp = _run(tmp_path, "sp2dp2", tiny_llama_dir, data_file, 4, 2, per_rank=160, share_prompt=False)
    _assert_same(ref, sp)
    assert metrics(sp)[1]["micro_steps"] == metrics(ref)[1]["micro_steps"] // 2  # the rows dealt to 2 replicas


def test_heads_must_divide_by_sp(tiny_llama_dir):
    config = AutoConfig.from_pretrained(tiny_llama_dir)  # 4 query heads, 2 key/value heads
    check_model(config, 2)
    check_model(config, 4)  # 2 KV heads, each repeated on 2 ranks
    with pytest.raises(UserError, match="4 attention heads do not divide by it"):
        check_model(config, 3)
    config.num_key_value_heads = 3
    config.num_attention_heads = 6
    with pytest.raises(UserError, match="3 key/value heads neither divide by it nor divide it"):
        check_model(config, 2)
    check_attention("btrm_segment", 2)
    with pytest.raises(UserError, match="needs model.attn_implementation segment, varlen or flash_attention_2"):
        check_attention("sdpa", 2)


@pytest.mark.slow
def test_sp_not_dividing_heads_is_one_line_error(tmp_path, tiny_llama_dir):
    data_file = write_preference_jsonl(tmp_path / "pairs.jsonl", 20, seed=5)
    config = write_config(tmp_path, tiny_llama_dir, data_file, train={"sequence_parallel_size": 3, "max_steps": 1})
    proc = subprocess.run(launcher_cmd(config, 3), cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert ("train.py: error: train.sequence_parallel_size=3: the model's 4 attention heads do not divide by it"
            in proc.stderr), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
