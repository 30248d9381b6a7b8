import json

from btrm.config import DataConfig, SourceConfig
from btrm.data import pipeline
from btrm.data.dataset import StepSampler, fit_pair, prepare_data
from btrm.render import render_ids
from btrm.tiny import write_preference_jsonl


def test_tokenized_pairs_match_render_and_cache_is_reused(tmp_path, tok, monkeypatch):
    f = write_preference_jsonl(tmp_path / "d.jsonl", 200)
    cfg = DataConfig(sources=[SourceConfig(path=str(f))], eval_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    first = prepare_data(cfg, tok, seed=1)
    rows = [json.loads(x) for x in f.read_text().splitlines()]
    by_origin = {r: i for i, r in enumerate(first.train.ds["origin"])}
    row0 = first.train.ds[0]
    line = int(row0["origin"].rsplit(":", 1)[1]) - 1
    assert row0["chosen_ids"] == render_ids(tok, rows[line]["chosen"])
    assert row0["rejected_ids"] == render_ids(tok, rows[line]["rejected"])
    # held-out split: disjoint, stable, ~20%
    assert len(first.train) + len(first.eval) == 200 and 20 <= len(first.eval) <= 60
    assert not set(first.train.ds["origin"]) & set(first.eval.ds["origin"])
    # second run must not tokenize again
    calls = []
    monkeypatch.setattr(pipeline, "build_cache", lambda *a, **k: calls.append(1))
    second = prepare_data(cfg, tok, seed=1)
    assert calls == [] and second.train.ds["chosen_ids"] == first.train.ds["chosen_ids"]
    assert len(by_origin) == len(first.train)


def test_overlong_policies(tmp_path, tok):
    long_prompt = "word " * 300
    row = {"chosen": [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "short yes"}],
           "rejected": [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "short no"}]}
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(row) + "\n")
    write_preference_jsonl(tmp_path / "ok.jsonl", 20)
    srcs = [SourceConfig(path=str(f), name="long"), SourceConfig(path=str(tmp_path / "ok.jsonl"), name="ok")]
    cfg = DataConfig(sources=srcs, max_length=128, max_tokens=256, cache_dir=str(tmp_path / "c"))
    dropped = prepare_data(cfg, tok)
    assert dropped.report["train"]["overlong_dropped"] == {"long": 1} and len(dropped.train) == 20
    cfg.overlong = "truncate_prompt_left"
    kept = prepare_data(cfg, tok)
    assert kept.report["train"]["overlong_truncated"] == {"long": 1} and len(kept.train) == 21
    i = kept.train.ds["source"].index("long")
    c, r = kept.train.ds[i]["chosen_ids"], kept.train.ds[i]["rejected_ids"]
    full_c = render_ids(tok, row["chosen"])
    assert len(c) <= 128 and len(c) + len(r) <= 256
    assert c[0] == tok.bos_token_id and c[-20:] == full_c[-20:]  # BOS kept, response end intact


def test_fit_pair_never_cuts_responses():
    c, r = [1, 5, 5, 5, 5, 7, 8], [1, 5, 5, 5, 5, 9]
    assert fit_pair(c, r, 100, 100, "drop", 1) == (c, r, "ok")
    c2, r2, st = fit_pair(c, r, 5, 100, "truncate_prompt_left", 1)
    assert st == "truncated" and c2 == [1, 5, 5, 7, 8] and r2[-1] == 9
    assert fit_pair(c, r, 2, 100, "truncate_prompt_left", 1)[2] == "dropped"  # would need to cut a response


def test_step_sampler_is_a_function_of_step():
    s = StepSampler(100, 32, seed=5)
    assert s.steps_per_epoch == 4
    epoch0 = [i for k in range(4) for i in s.step_pairs(k)]
    assert sorted(epoch0) == list(range(100))
    assert s.step_pairs(5) == StepSampler(100, 32, seed=5).step_pairs(5)
    assert s.step_pairs(4) != s.step_pairs(0)
