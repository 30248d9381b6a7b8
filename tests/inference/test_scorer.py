"""RewardModel: parity with the seed's plain-transformers recipe, checkpoint layouts, over-long policy."""

from __future__ import annotations

import json
import random

import pytest
import torch
from infhelp import hf_reward, make_conversations
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from btrm.inference.scorer import OverlongError, PairScore, RewardModel, pair_scores
from btrm.render import render_text


def reference(path, conversations):
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return [hf_reward(model, tok, c) for c in conversations]


@pytest.mark.parametrize("layout", ["llama3", "qwen3", "released", "v1"])
def test_packed_scores_match_seed_recipe(rm_dirs, layout):
    convs = make_conversations(24, seed=1)
    random.Random(2).shuffle(convs)
    # a small token budget: several packed rows of several conversations each, plus long ones alone
    rm = RewardModel.from_pretrained(rm_dirs[layout], dtype="fp32", batch_tokens=256)
    got = rm.score(convs)
    want = reference(rm_dirs[layout], convs)
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-5
    assert torch.tensor(want).std() > 0.1  # rewards differ between conversations: the check is not vacuous
    lengths = [len(x) for x in rm.encode(convs)]
    assert max(lengths) > 256 and min(lengths) < 100  # mixed lengths, one longer than the budget


def test_v1_checkpoint_has_added_pad(rm_dirs):
    rm = RewardModel.from_pretrained(rm_dirs["v1"])
    assert rm.tokenizer.pad_token == "[PAD]"
    assert rm.model.config.pad_token_id == len(rm.tokenizer) - 1 == rm.model.config.vocab_size - 1


def test_score_texts_equals_score(rm_dirs):
    rm = RewardModel.from_pretrained(rm_dirs["llama3"])
    convs = make_conversations(6, seed=3)
    texts = [render_text(rm.tokenizer, c) for c in convs]
    assert not texts[0].startswith(rm.tokenizer.bos_token)
    assert rm.score_texts(texts) == pytest.approx(rm.score(convs), abs=1e-6)
    assert rm.encode_texts(texts)[0][0] == rm.tokenizer.bos_token_id  # the tokenizer adds the one BOS back


def test_score_pairs(rm_dirs):
    rm = RewardModel.from_pretrained(rm_dirs["qwen3"])
    convs = make_conversations(8, seed=4)
    out = rm.score_pairs(convs[:4], convs[4:])
    single = rm.score(convs)
    for k, p in enumerate(out):
        assert isinstance(p, PairScore)
        assert (p.chosen, p.rejected) == pytest.approx((single[k], single[4 + k]), abs=1e-6)
        assert p.preferred == ("chosen" if p.chosen > p.rejected else "rejected")
    assert [p.preferred for p in pair_scores([1.0, 2.0, 3.0], [1.0, 1.0, 4.0])] == ["tie", "chosen", "rejected"]
    with pytest.raises(ValueError, match="2 chosen vs 1 rejected"):
        rm.score_pairs(convs[:2], convs[:1])


def test_overlong_error_names_index_and_length(rm_dirs):
    convs = make_conversations(5, seed=5)
    rm = RewardModel.from_pretrained(rm_dirs["llama3"])
    lengths = [len(x) for x in rm.encode(convs)]
    i = max(range(5), key=lengths.__getitem__)
    rm = RewardModel.from_pretrained(rm_dirs["llama3"], max_length=lengths[i] - 1)
    with pytest.raises(OverlongError, match=rf"input {i} has {lengths[i]} tokens > max_length {lengths[i] - 1}"):
        rm.score(convs)
    with pytest.raises(OverlongError, match="never truncated"):
        rm.score_texts([render_text(rm.tokenizer, convs[i])])


def test_truncation_left_keeps_the_last_turn(rm_dirs):
    long_prompt = " ".join(["the ocean is calm"] * 60)
    conv = [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "of course here is music"}]
    full = RewardModel.from_pretrained(rm_dirs["llama3"])
    ids = full.encode([conv])[0]
    rm = RewardModel.from_pretrained(rm_dirs["llama3"], max_length=len(ids) - 30, truncation="left")
    cut = rm.encode([conv])[0]
    assert len(cut) == len(ids) - 30
    assert cut[0] == ids[0] == rm.tokenizer.bos_token_id  # BOS stays
    assert cut[1:] == ids[31:]  # prompt cut from the left, the end (and the reward token) kept
    assert rm.score([conv])[0] == pytest.approx(full.score_ids([cut])[0], abs=1e-6)
    # cutting the whole prompt (template header included) would not be enough: refuse
    conv2 = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": long_prompt}]
    ids2 = full.encode([conv2])[0]
    prompt_len = len(full.encode([conv2[:1]])[0])
    rm = RewardModel.from_pretrained(rm_dirs["llama3"], max_length=len(ids2) - prompt_len, truncation="left")
    with pytest.raises(OverlongError, match="the last turn alone needs"):
        rm.score([conv2])


def test_cut_length_is_the_least_truncation_reaches(rm_dirs):
    # cut_length (what btrm eval uses to decide which rows to skip) agrees with what truncation='left' does
    conv = [{"role": "user", "content": " ".join(["the ocean is calm"] * 40)},
            {"role": "assistant", "content": "of course here is music"}]
    full = RewardModel.from_pretrained(rm_dirs["llama3"])
    n = full.cut_length(conv)
    assert 0 < n < len(full.encode([conv])[0])
    assert len(RewardModel.from_pretrained(rm_dirs["llama3"], max_length=n, truncation="left").encode([conv])[0]) == n
    with pytest.raises(OverlongError, match=f"the last turn alone needs {n} tokens"):
        RewardModel.from_pretrained(rm_dirs["llama3"], max_length=n - 1, truncation="left").encode([conv])
    assert full.cut_length(conv[1:]) == len(full.encode([conv[1:]])[0])  # no prompt: nothing to cut


def test_missing_local_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}: no such checkpoint directory"):
        RewardModel.from_pretrained(tmp_path / "nope")


def test_base_checkpoint_without_head_is_refused(rm_dirs):
    with pytest.raises(ValueError, match="no trained score head"):
        RewardModel.from_pretrained(rm_dirs["base"])


def test_pad_that_ends_every_conversation_is_refused(rm_dirs, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(rm_dirs["llama3"])
    tok = AutoTokenizer.from_pretrained(rm_dirs["llama3"])
    model.config.pad_token_id = tok.convert_tokens_to_ids("<|eot_id|>")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="one token early"):
        RewardModel.from_pretrained(tmp_path)


def test_checkpoint_meta_sets_template_kwargs_and_max_length(rm_dirs, tmp_path):
    import shutil

    shutil.copytree(rm_dirs["llama3"], tmp_path / "ck")
    # max_length well above the conversation's ~345 tokens: this test is about reading the meta, not truncation
    meta = {"chat_template_kwargs": {"date_string": "01 Jan 2025"}, "max_length": 777}
    (tmp_path / "ck" / "btrm_meta.json").write_text(json.dumps(meta))
    rm = RewardModel.from_pretrained(tmp_path / "ck")
    assert rm.chat_template_kwargs == meta["chat_template_kwargs"]
    # the training length is recorded, not used as the cap: the model's usable length is (131072 positions -> 16384)
    assert rm.train_max_length == 777 and rm.max_length == 16384
    assert rm.length_note() == ("max_length 16384 tokens (min(max_position_embeddings 131072, 16384)); trained at 777 "
                                "(btrm_meta.json)")
    conv = make_conversations(1)[0]
    assert "01 Jan 2025" in render_text(rm.tokenizer, conv, rm.chat_template_kwargs)
    plain = RewardModel.from_pretrained(rm_dirs["llama3"])
    assert rm.score([conv])[0] != pytest.approx(plain.score([conv])[0], abs=1e-6)  # the date is in the input
    override = RewardModel.from_pretrained(tmp_path / "ck", chat_template_kwargs={}, max_length=1000)
    assert override.chat_template_kwargs == {} and override.max_length == 1000
    assert override.score([conv])[0] == pytest.approx(plain.score([conv])[0], abs=1e-6)


def test_default_max_length_is_capped_by_position_embeddings(rm_dirs):
    assert RewardModel.from_pretrained(rm_dirs["llama3"]).max_length == 16384  # 131072 positions, capped
    assert RewardModel.from_pretrained(rm_dirs["released"]).max_length == 2048


def test_sdpa_backend_agrees(rm_dirs):
    convs = make_conversations(10, seed=6)
    seg = RewardModel.from_pretrained(rm_dirs["qwen3"], batch_tokens=400).score(convs)
    sdpa = RewardModel.from_pretrained(rm_dirs["qwen3"], attn_implementation="sdpa", batch_tokens=400).score(convs)
    assert max(abs(a - b) for a, b in zip(seg, sdpa)) <= 1e-5
