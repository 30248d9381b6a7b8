"""The streaming pipeline builds the same data as the list-based preparation it replaced, and its cache survives
races and kills."""

import dataclasses
import json
import subprocess
import sys
import time

import pandas as pd
import pytest
from transformers import AutoTokenizer

from btrm.builtin import resolve_builtins
from btrm.config import DataConfig, SourceConfig, load_config
from btrm.data import pipeline
from btrm.data.dataset import cache_key, fit_pair, is_heldout, pair_hash, prepare_data
from btrm.data.pipeline import FINAL_COLUMNS, file_lock, load_prepared, prepare_cache, sample_indices
from btrm.data.prefix import shared_prefix_len
from btrm.data.sources import BadRow, DataReport, load_pairs
from btrm.modeling import ensure_pad_token
from btrm.render import render_ids
from btrm.tiny import write_preference_jsonl

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def list_based(cfg, tok, seed):
    """The list-based preparation the pipeline replaced, kept as the reference: `load_pairs` (every pair a Python
    object, weights applied to the lists), the hash split, one render per conversation, `fit_pair`, and every count
    a Counter filled pair by pair. Returns (train rows, eval rows or None, report)."""
    train_rep, eval_rep = DataReport(), DataReport()
    pairs = load_pairs(cfg.sources, train_rep, cfg.strict, seed)
    if cfg.eval_sources:
        held_out = load_pairs(cfg.eval_sources, eval_rep, cfg.strict, seed)
    else:
        flags = [cfg.eval_fraction > 0 and is_heldout(pair_hash(p.chosen, p.rejected), cfg.eval_fraction)
                 for p in pairs]
        held_out = [p for p, f in zip(pairs, flags) if f]
        pairs = [p for p, f in zip(pairs, flags) if not f]
    bos = tok.bos_token_id if tok.bos_token else None

    def tokenize(ps, rep):
        rows = []
        for p in ps:
            c, r = (render_ids(tok, x, cfg.chat_template_kwargs) for x in (p.chosen, p.rejected))
            if c == r:
                rep.skip(p.source, BadRow("identical_responses", "rejected", "the same tokens as chosen once rendered",
                                          p.origin))
                rep.kept[p.source] -= 1
                continue
            c, r, status = fit_pair(c, r, cfg.max_length, cfg.max_tokens, cfg.overlong, bos)
            if status == "dropped":
                rep.overlong_dropped[p.source] += 1
                continue
            if status == "truncated":
                rep.overlong_truncated[p.source] += 1
            rows.append({"margin": p.margin, "source": p.source, "category": p.category, "origin": p.origin,
                         "chosen_ids": c, "rejected_ids": r, "more_ids": [], "scores": [],  # pairs: no more
                         "seq_lens": [len(c), len(r)], "status": status, "num_tokens": len(c) + len(r),
                         "chosen_len": len(c), "prefix_len": shared_prefix_len([c, r])})
        return rows

    train = tokenize(pairs, train_rep)
    ev = tokenize(held_out, eval_rep) if held_out else None
    return train, ev, {"train": train_rep.as_dict(), "eval": eval_rep.as_dict(), "train_pairs": len(train),
                       "eval_pairs": len(ev) if ev else 0}


def rows_of(data):
    def rows(split):
        return None if split is None else split.ds.select_columns(FINAL_COLUMNS).to_list()

    return rows(data.train), rows(data.eval), data.report


def assert_same(new, ref):
    """Identical ids, order, sizes and report (key order included)."""
    train, ev, report = ref
    assert json.dumps(new.report) == json.dumps(report)
    for got, want in ((new.train, train), (new.eval, ev)):
        assert (got is None) == (want is None)
        if got is not None:
            assert got.ds.select_columns(FINAL_COLUMNS).to_list() == want
            assert got.sizes.tolist() == [w["num_tokens"] for w in want]
            assert got.chosen_lengths.tolist() == [w["chosen_len"] for w in want]
            assert got.prefix_lengths.tolist() == [w["prefix_len"] for w in want]


def test_quickstart_data_equals_the_list_based_preparation(tmp_path):
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [f"--data.cache_dir={tmp_path}"])
    cfg = resolve_builtins(cfg, True, lambda: None)
    tok = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    ensure_pad_token(tok)
    root = tmp_path / cache_key(cfg.data, tok, cfg.train.seed)
    assert prepare_cache(cfg.data, tok, cfg.train.seed, root) and not prepare_cache(cfg.data, tok, 0, root)
    assert_same(load_prepared(root), list_based(cfg.data, tok, cfg.train.seed))


def _mixed_sources(tmp_path):
    """Three formats, bad rows, own source columns, weights 2 / 0.5 / 1.5, a swapped source, over-long prompts."""
    a = write_preference_jsonl(tmp_path / "a.jsonl", 1100)  # > 1000 rows: tokenized in 2 processes
    lines = a.read_text().splitlines()
    long_prompt = "word " * 200
    lines[3] = "{not json"
    lines[7] = json.dumps({"chosen": None, "rejected": []})
    lines.append(json.dumps({"chosen": [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "y"}],
                             "rejected": [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "n"}],
                             "source": "own"}))
    a.write_text("\n".join(lines) + "\n")
    rows = [{"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}" if i % 9 else f"good {i}",
             "margin": float(i % 3), "category": "c" + str(i % 2)} for i in range(60)]
    pd.DataFrame(rows).to_parquet(tmp_path / "b.parquet")
    (tmp_path / "c.json").write_text(json.dumps([
        {"prompt": [{"role": "user", "content": long_prompt if i == 2 else f"hi {i}"}], "chosen": f"yes {i}",
         "rejected": f"yes {i} " if i == 5 else f"no {i}",  # the template trims: same ids as chosen
         "source": "c-own" if i % 4 == 0 else None} for i in range(20)]))
    return [SourceConfig(path=str(a), name="a", weight=2.0), SourceConfig(path=str(tmp_path / "b.parquet"), weight=0.5),
            SourceConfig(path=str(tmp_path / "c.json"), name="c", weight=1.5, swap=True)]


@pytest.mark.parametrize("overlong", ["drop", "truncate_prompt_left"])
def test_mixed_weighted_heldout_equals_the_list_based_preparation(tmp_path, tok, overlong):
    cfg = DataConfig(sources=_mixed_sources(tmp_path), eval_fraction=0.3, max_length=160, max_tokens=300,
                     overlong=overlong, num_proc=2)
    root = tmp_path / "cache" / cache_key(cfg, tok, 3)
    prepare_cache(cfg, tok, 3, root)
    new = load_prepared(root)
    assert_same(new, list_based(cfg, tok, 3))
    r = new.report["train"]
    assert r["skipped"]["a"] == {"bad_json": 1, "null_field": 1} and r["skipped"]["b"] == {"identical_responses": 7}
    assert r["skipped"]["c"] == {"identical_responses": 1}  # rendered ids, counted as often as the pair is repeated
    assert r["overlong_" + ("dropped" if overlong == "drop" else "truncated")]


def test_eval_sources_equal_the_list_based_preparation(tmp_path, tok):
    srcs = _mixed_sources(tmp_path)
    cfg = DataConfig(sources=srcs[1:], eval_sources=srcs[:1], max_length=160, max_tokens=300)
    root = tmp_path / "cache" / "k"
    prepare_cache(cfg, tok, 0, root)
    assert_same(load_prepared(root), list_based(cfg, tok, 0))


@pytest.mark.parametrize("n,k", [(10, 3), (50, 25), (1000, 7), (5, 5)])
def test_sample_indices_is_random_sample(n, k):
    import random

    assert sample_indices(n, k, 11).tolist() == sorted(random.Random(11).sample(range(n), k))


def _recipe(tmp_path, model_dir, n=3000):
    data = write_preference_jsonl(tmp_path / "d.jsonl", n)
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({"model": {"name_or_path": str(model_dir)},
                                "data": {"sources": [{"path": str(data)}], "eval_fraction": 0.1}}))
    return path


def _prepare(recipe, cache, **kw):
    return subprocess.Popen([sys.executable, "-m", "btrm.cli", "data", "prepare", "--config", str(recipe),
                             f"--data.cache_dir={cache}"], text=True, **kw)


def _wait_for(predicate, what, timeout=300):
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, what
        time.sleep(0.05)


def test_prepare_cli_writes_the_trainer_cache_survives_a_kill_and_waits_for_the_lock(tmp_path, tiny_llama_dir, tok,
                                                                                       monkeypatch):
    recipe, cache = _recipe(tmp_path, tiny_llama_dir), tmp_path / "cache"
    proc = _prepare(recipe, cache, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    _wait_for(lambda: list(cache.glob("*.tmp/work/train/convert/*")), "tokenizing never started")
    proc.kill()
    proc.wait()
    [tmp] = cache.glob("*.tmp")
    root = tmp.with_name(tmp.name[:-4])
    assert not (root / "done.json").exists()
    # a second preparer waits while another process holds the lock, and only then replaces the stale .tmp
    with file_lock(root.with_name(root.name + ".lock")):
        proc = _prepare(recipe, cache, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
        _wait_for(lambda: "another process is preparing" in proc.stderr.readline(), "did not wait for the lock")
        assert tmp.exists() and not root.exists()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"prepared: {root}" in out and not tmp.exists()
    cfg = load_config(recipe, [f"--data.cache_dir={tmp_path / 'ref'}"])
    ref = tmp_path / "ref" / root.name
    assert prepare_cache(cfg.data, tok, cfg.train.seed, ref)  # same key from the same config
    assert_same(load_prepared(root), rows_of(load_prepared(ref)))
    # the trainer's loader finds this cache under the same key and tokenizes nothing
    monkeypatch.setattr(pipeline, "build_cache", lambda *a, **k: pytest.fail("tokenized again"))
    cfg.data.cache_dir = str(cache)
    assert_same(prepare_data(cfg.data, tok, cfg.train.seed), rows_of(load_prepared(root)))


def test_segments_and_batchwise_write_change_nothing(tmp_path, tok, monkeypatch):
    """Sources read in several segments (one crossing a source boundary, one tokenized in 2 processes) give the same
    cache; the write reads record batches across segment files out of order (repeated sources jump back)."""
    from datasets import Dataset

    monkeypatch.setattr(pipeline, "SEGMENT_BYTES", 430_000)
    cfg = DataConfig(sources=_mixed_sources(tmp_path), eval_fraction=0.3, max_length=160, max_tokens=300, num_proc=2)
    segments = [len(Dataset.from_file(str(f))) for f in pipeline._raw_segments(cfg.sources, tmp_path / "seg")]
    assert segments == [1047, 134]  # a.jsonl has 1101 rows: its last 54 share a segment with b and c
    root = tmp_path / "cache" / "k"
    prepare_cache(cfg, tok, 3, root)
    assert_same(load_prepared(root), list_based(cfg, tok, 3))


def test_strict_raises_the_first_bad_row_and_leaves_no_cache(tmp_path, tok):
    """strict: the first bad row in row order (tokenized in 2 processes) is the error the list-based loader raises;
    responses that render to the chosen ids are an error too, found after the scan; neither leaves a cache."""
    sources = _mixed_sources(tmp_path)
    cfg = DataConfig(sources=sources, strict=True, max_length=160, max_tokens=300, num_proc=2)
    root = tmp_path / "cache" / "k"
    with pytest.raises(BadRow) as err:
        prepare_cache(cfg, tok, 0, root)
    with pytest.raises(BadRow) as want:
        list_based(cfg, tok, 0)
    assert str(err.value) == str(want.value) and err.value.reason == "bad_json" and "a.jsonl:4: field" in str(err.value)
    cfg = DataConfig(sources=sources[2:], strict=True, max_length=160, max_tokens=300)  # c.json: its row 5
    with pytest.raises(BadRow) as err:
        prepare_cache(cfg, tok, 0, root)
    assert err.value.reason == "identical_responses" and "c.json[5]: field" in str(err.value)
    assert not root.exists() and not root.with_name("k.tmp").exists()


def test_a_held_out_split_whose_pairs_are_all_dropped_is_written_empty(tmp_path, tok):
    train = write_preference_jsonl(tmp_path / "t.jsonl", 20)
    long = [{"role": "user", "content": "word " * 300}]
    (tmp_path / "e.jsonl").write_text("".join(json.dumps({"chosen": long + [{"role": "assistant", "content": "y"}],
                                                          "rejected": long + [{"role": "assistant", "content": "n"}]})
                                              + "\n" for _ in range(3)))
    cfg = DataConfig(sources=[SourceConfig(path=str(train))], eval_sources=[SourceConfig(path=str(tmp_path / "e.jsonl"))],
                     max_length=160, max_tokens=300)
    root = tmp_path / "cache" / "k"
    prepare_cache(cfg, tok, 0, root)
    data = load_prepared(root)
    assert len(data.eval.ds) == 0 and len(data.eval.sizes) == 0 and data.report["eval_pairs"] == 0
    assert sum(data.report["eval"]["overlong_dropped"].values()) == 3 and len(data.train.ds) == 20


def test_strict_run_on_a_cache_built_without_strict_raises_its_first_skip(tmp_path, tok):
    """strict is not in the cache key (it changes no token): a strict run that finds a cache with skipped rows
    raises the first of them instead of training on what the lenient run kept; a clean cache is reused."""
    from btrm.errors import UserError

    sources = _mixed_sources(tmp_path)
    lenient = DataConfig(sources=sources, max_length=160, max_tokens=300)
    strict = DataConfig(sources=sources, max_length=160, max_tokens=300, strict=True)
    assert cache_key(lenient, tok, 0) == cache_key(strict, tok, 0)
    root = tmp_path / "cache" / "k"
    assert prepare_cache(lenient, tok, 0, root)
    with pytest.raises(UserError, match=r"built without strict, skipped train rows \(1 bad_json, 1 null_field, .*"
                                        r"the first: .*a\.jsonl:4: field"):
        prepare_cache(strict, tok, 0, root)
    clean = DataConfig(sources=[SourceConfig(path=str(write_preference_jsonl(tmp_path / "ok.jsonl", 30)))])
    root = tmp_path / "cache" / "clean"
    assert prepare_cache(clean, tok, 0, root)
    assert not prepare_cache(dataclasses.replace(clean, strict=True), tok, 0, root)
