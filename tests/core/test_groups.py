"""Ranked groups of K responses (issue 13): row validation (every invalid kind counted by default, named under
strict), storage best first, mixing with pairs, the over-long rule, and a group as one packing item."""

import json
import re

import pytest

from btrm.config import DataConfig, SourceConfig
from btrm.data.dataset import fit_group, prepare_data
from btrm.data.sources import BadRow
from btrm.render import render_ids
from btrm.tiny import make_group_rows, write_jsonl, write_preference_jsonl

GOOD = {"prompt": "Name a colour.", "responses": ["Red is a colour.", "Blue.", "A colour."], "scores": [2, 3, 1]}
BAD = {  # reason -> (row, the field the error names)
    "too_few_responses": ({"prompt": "p", "responses": ["only one"], "scores": [1]}, "responses"),
    "bad_score": ({**GOOD, "scores": [1, "high", 0]}, "scores[1]"),
    "bad_score_nan": ({**GOOD, "scores": [1, float("nan"), 0]}, "scores[1]"),
    "all_tied": ({**GOOD, "scores": [2, 2, 2]}, "scores"),
    "duplicate_response": ({**GOOD, "responses": ["a", "b", "a"]}, "responses[2]"),
    "length_mismatch": ({**GOOD, "scores": [1, 2]}, "scores"),
    "bad_ranking": ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}, "ranking"),
    "two_labels": ({**GOOD, "ranking": [1, 0, 2]}, "scores"),
    "missing_field": ({"prompt": "p", "responses": ["a", "b"]}, "scores"),
}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # NaN is written as NaN, which json reads back
    return path


def _cfg(tmp_path, *files, **kw):
    return DataConfig(sources=[SourceConfig(path=str(f)) for f in files], cache_dir=str(tmp_path / "c"), **kw)


def test_invalid_groups_are_counted_skips(tmp_path, tok):
    f = _write(tmp_path / "g.jsonl", [GOOD] + [row for row, _ in BAD.values()])
    data = prepare_data(_cfg(tmp_path, f), tok, use_cache=False)
    skipped = data.report["train"]["skipped"]["g"]
    assert skipped == {"too_few_responses": 1, "bad_score": 2, "all_tied": 1, "duplicate_response": 1,
                       "length_mismatch": 1, "bad_ranking": 1, "two_labels": 1, "missing_field": 1}
    assert len(data.train) == 1


@pytest.mark.parametrize("kind", sorted(BAD))
def test_invalid_group_strict_names_file_row_field(tmp_path, tok, kind):
    row, field = BAD[kind]
    f = _write(tmp_path / "g.jsonl", [GOOD, row])
    with pytest.raises(BadRow, match=re.escape(f"g.jsonl:2: field '{field}'")):
        prepare_data(_cfg(tmp_path, f, strict=True), tok, use_cache=False)


def test_groups_and_pairs_mix_stored_best_first(tmp_path, tok):
    pairs = write_preference_jsonl(tmp_path / "pairs.jsonl", 6)
    ranked = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}],
              "responses": ["hello there", [{"role": "assistant", "content": "hi"}], "good day"], "ranking": [1, 2, 0]}
    groups = _write(tmp_path / "groups.jsonl", [GOOD, ranked])
    data = prepare_data(_cfg(tmp_path, pairs, groups), tok, use_cache=False)
    ds = data.train.ds
    assert len(data.train) == 8 and data.train.num_seqs.tolist() == [2] * 6 + [3, 3]
    rated, rk = ds[6], ds[7]
    assert rated["scores"] == [3.0, 2.0, 1.0]  # best first
    prompt = [{"role": "user", "content": "Name a colour."}]
    assert rated["chosen_ids"] == render_ids(tok, prompt + [{"role": "assistant", "content": "Blue."}])
    assert rated["more_ids"] == [render_ids(tok, prompt + [{"role": "assistant", "content": "A colour."}])]
    assert rk["scores"] == [] and rk["chosen_ids"] == render_ids(tok, ranked["prompt"] + ranked["responses"][1])
    assert rated["seq_lens"] == [len(x) for x in (rated["chosen_ids"], rated["rejected_ids"], *rated["more_ids"])]
    assert data.train.sizes[6] == sum(rated["seq_lens"])
    # one packing item per group: the prompt once, three branches; ranks 0..2 and the scores in the layout
    batch = data.train.batch([0, 6, 7], share=True)
    assert batch.item_offsets.tolist() == [0, 2, 5, 8] and batch.ranks.tolist() == [0, 1, 0, 1, 2, 0, 1, 2]
    assert batch.scores[2:5].tolist() == [3.0, 2.0, 1.0] and batch.scores[5:].isnan().all()
    assert batch.num_tokens == data.train.packed_sizes(True)[[0, 6, 7]].sum() < data.train.sizes[[0, 6, 7]].sum()


def test_fit_group_drops_longest_responses_keeping_two():
    prompt = [1, 2, 3, 4]
    seqs = [prompt + [10] * 3, prompt + [11] * 9, prompt + [12] * 2, prompt + [13] * 5]  # best first
    assert fit_group(seqs, None, 100, 100, "drop", 1) == ([0, 1, 2, 3], seqs, "ok")
    # 40 tokens > 30: drop the 13-token response (rank 1), then 27 fits
    assert fit_group(seqs, None, 100, 30, "drop", 1) == ([0, 2, 3], [seqs[0], seqs[2], seqs[3]], "trimmed")
    # never fewer than two: the two shortest left (13 tokens) still do not fit 12 -> the pair rule, dropped
    assert fit_group(seqs, None, 100, 12, "drop", 1)[2] == "dropped"
    kept, fitted, status = fit_group(seqs, None, 100, 12, "truncate_prompt_left", 1)
    assert kept == [0, 2] and status == "truncated" and fitted == [[1, 3, 4, 10, 10, 10], [1, 3, 4, 12, 12]]
    # what is left must still order something: [2, 2, 2, 0] losing the 13- and 9-token responses leaves a tie
    assert fit_group(seqs, [2.0, 2.0, 2.0, 0.0], 100, 20, "drop", 1)[2] == "dropped"


def test_overlong_groups_are_counted_trimmed(tmp_path, tok):
    row = {"prompt": "hi", "responses": ["short one", "word " * 200, "short two"], "scores": [1, 2, 0]}
    f = _write(tmp_path / "long.jsonl", [row])
    data = prepare_data(_cfg(tmp_path, f, max_length=128, max_tokens=256), tok, use_cache=False)
    assert data.report["train"]["overlong_trimmed"] == {"long": 1}
    assert data.train.ds[0]["scores"] == [1.0, 0.0] and data.train.num_seqs.tolist() == [2]


def test_synthetic_groups_are_valid_rows(tmp_path, tok):
    rows = make_group_rows(40, seed=1)
    assert all(len(r["responses"]) == 4 and sorted(r["scores"]) == [0, 1, 2, 3] for r in rows)
    data = prepare_data(_cfg(tmp_path, write_jsonl(tmp_path / "s.jsonl", rows)), tok, use_cache=False)
    assert len(data.train) == 40 and data.report["train"]["skipped"] == {}


def test_nested_columns_and_pair_only_commands(tmp_path):
    from btrm.config import SourceConfig as Src
    from btrm.data.sources import DataReport, normalize_row, validate_rows

    row = {"instruction": "Q?", "completions": [{"response": "a", "rating": 2}, {"response": "b", "rating": 5}]}
    src = Src(path="x", columns={"prompt": "instruction", "responses": "completions[].response",
                                 "scores": "completions[].rating"})
    group = normalize_row(row, src, "f:1", "uf")
    assert [c[-1]["content"] for c in group.responses] == ["b", "a"] and group.scores == [5.0, 2.0]
    # `btrm data` and calibration read pairs: a group row is a counted skip there, not a crash
    report = DataReport()
    assert list(validate_rows(src, [("f:1", row)], report)) == []
    assert report.skipped["x"] == {"group_row": 1}


def test_group_through_the_model_equals_its_comparisons_as_pairs(tiny_llama_dir, tok):
    """A real packed forward/backward under bt_pairs: 2 groups of 4 (one with a tie) as 2 items vs their 11
    comparisons as 11 pair items. Same loss and gradients (<= 1e-5), fewer tokens."""
    from btrm.attention import SEGMENT
    from btrm.config import LossConfig
    from btrm.data.packing import collate, collate_pairs
    from btrm.loss import build_objective, comparisons
    from btrm.modeling import load_reward_model, packed_rewards

    model = load_reward_model(str(tiny_llama_dir), tok, attn_implementation=SEGMENT, seed=3, head_init_std=1.0)
    rows = make_group_rows(2, seed=5)
    rows[1]["scores"] = [2, 2, 1, 0]  # a tie: 5 comparisons
    items, scores = [], []
    for r in rows:
        order = sorted(range(4), key=lambda i: -r["scores"][i])
        items.append([render_ids(tok, [{"role": "user", "content": r["prompt"]},
                                       {"role": "assistant", "content": r["responses"][i]}]) for i in order])
        scores.append([float(r["scores"][i]) for i in order])
    group = collate(items, scores=scores, share=True)
    w, l, _ = comparisons(group)
    seqs = [s for item in items for s in item]
    flat = collate_pairs([seqs[i] for i in w.tolist()], [seqs[j] for j in l.tolist()], share=True)
    assert len(w) == 11 and group.num_tokens < flat.num_tokens

    def run(batch, objective):
        model.zero_grad(set_to_none=True)
        loss = objective.loss(packed_rewards(model, batch), batch)[0] / objective.units(batch)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    obj = build_objective(LossConfig(kind="bt_pairs"))
    (got, g_got), (want, g_want) = run(group, obj), run(flat, obj)
    assert abs(got - want) <= 1e-5
    assert g_got.keys() == g_want.keys() and max((g_got[n] - g_want[n]).abs().max().item() for n in g_got) <= 1e-5
