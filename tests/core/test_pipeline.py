"""The streaming pipeline builds the same data as the list-based loader, and its cache survives races and kills."""

import json
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from transformers import AutoTokenizer

from btrm.builtin import resolve_builtins
from btrm.config import DataConfig, SourceConfig, load_config
from btrm.data import dataset as ds_mod
from btrm.data.dataset import cache_key, prepare_data
from btrm.data.pipeline import FINAL_COLUMNS, file_lock, load_prepared, prepare_cache, sample_indices
from btrm.modeling import ensure_pad_token
from btrm.tiny import write_preference_jsonl

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture
def tok(tiny_llama_dir):
    t = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ensure_pad_token(t)
    return t


def assert_same(new, old):
    """Identical ids, order, sizes and report."""
    assert json.dumps(new.report) == json.dumps(old.report)
    for a, b in ((new.train, old.train), (new.eval, old.eval)):
        assert (a is None) == (b is None)
        if a is None:
            continue
        for col in FINAL_COLUMNS:
            assert a.ds[col] == b.ds[col], col
        assert np.array_equal(a.sizes, b.sizes) and np.array_equal(a.chosen_lengths, b.chosen_lengths)


def test_quickstart_data_equals_prepare_data(tmp_path):
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [f"--data.cache_dir={tmp_path}"])
    cfg = resolve_builtins(cfg, True, lambda: None)
    tok = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    ensure_pad_token(tok)
    root = tmp_path / cache_key(cfg.data, tok, cfg.train.seed)
    assert prepare_cache(cfg.data, tok, cfg.train.seed, root) and not prepare_cache(cfg.data, tok, 0, root)
    assert_same(load_prepared(root), prepare_data(cfg.data, tok, cfg.train.seed, use_cache=False))


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
         "rejected": f"no {i}", "source": "c-own" if i % 4 == 0 else None} for i in range(20)]))
    return [SourceConfig(path=str(a), name="a", weight=2.0), SourceConfig(path=str(tmp_path / "b.parquet"), weight=0.5),
            SourceConfig(path=str(tmp_path / "c.json"), name="c", weight=1.5, swap=True)]


@pytest.mark.parametrize("overlong", ["drop", "truncate_prompt_left"])
def test_mixed_weighted_heldout_equals_prepare_data(tmp_path, tok, overlong):
    cfg = DataConfig(sources=_mixed_sources(tmp_path), eval_fraction=0.3, max_length=160, max_tokens=300,
                     overlong=overlong, num_proc=2)
    root = tmp_path / "cache" / cache_key(cfg, tok, 3)
    prepare_cache(cfg, tok, 3, root)
    new, old = load_prepared(root), prepare_data(cfg, tok, 3, use_cache=False)
    assert_same(new, old)
    r = new.report["train"]
    assert r["skipped"]["a"] == {"bad_json": 1, "missing_field": 1} and r["skipped"]["b"] == {"identical_responses": 7}
    assert r["overlong_" + ("dropped" if overlong == "drop" else "truncated")]


def test_eval_sources_equal_prepare_data(tmp_path, tok):
    srcs = _mixed_sources(tmp_path)
    cfg = DataConfig(sources=srcs[1:], eval_sources=srcs[:1], max_length=160, max_tokens=300)
    root = tmp_path / "cache" / "k"
    prepare_cache(cfg, tok, 0, root)
    assert_same(load_prepared(root), prepare_data(cfg, tok, 0, use_cache=False))


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
    assert_same(load_prepared(root), load_prepared(ref))
    # the trainer's loader finds this cache under the same key and tokenizes nothing
    monkeypatch.setattr(ds_mod, "tokenize_pairs", lambda *a, **k: pytest.fail("tokenized again"))
    cfg.data.cache_dir = str(cache)
    assert_same(prepare_data(cfg.data, tok, cfg.train.seed), load_prepared(root))
