"""Calibration (reward mean/std stored with the checkpoint, normalized scoring) and the generated model card,
on the session's trained quickstart checkpoint (copied: these tests write into it)."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys

import pytest

from btrm.calibration import heldout_pairs
from btrm.card import MODEL_PATH_LINE
from btrm.inference.scorer import RewardModel
from btrm.render import render_text

from infhelp import post, start_server, stop_server, wait_healthy


def btrm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "btrm.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def ckpt(trained_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("calib") / "ckpt"
    shutil.copytree(trained_checkpoint, out)
    return out


@pytest.fixture(scope="module")
def heldout_file(ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("heldout") / "heldout.jsonl"
    with path.open("w") as f:
        for p in heldout_pairs(ckpt):
            f.write(json.dumps({"chosen": p.chosen, "rejected": p.rejected}) + "\n")
    return path


def meta(ckpt) -> dict:
    return json.loads((ckpt / "btrm_meta.json").read_text())


def population_stats(values):
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def test_training_stores_calibration_equal_to_a_recomputation_from_btrm_score(ckpt, heldout_file, tmp_path):
    trained = meta(ckpt)["calibration"]
    assert trained["n"] == 2 * meta(ckpt)["heldout"]["eval/pairs"]
    config = json.loads((ckpt / "config.json").read_text())
    assert (config["reward_mean"], config["reward_std"]) == (trained["mean"], trained["std"])
    # recompute from `btrm score` output on the held-out pairs
    out = tmp_path / "rewards.jsonl"
    proc = btrm("score", "--model", str(ckpt), "--input", str(heldout_file), "--output", str(out), "--calibrate")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == trained["n"] // 2
    mean, std = population_stats([x for r in rows for x in (r["chosen"], r["rejected"])])
    stored = meta(ckpt)["calibration"]
    assert stored["mean"] == pytest.approx(mean, abs=1e-12) and stored["std"] == pytest.approx(std, abs=1e-12)
    # the end-of-training stats (packed training forward) agree with the scorer's to fp32 precision
    assert trained["mean"] == pytest.approx(mean, abs=1e-4) and trained["std"] == pytest.approx(std, rel=1e-4)
    # transformers keeps the extra keys
    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(ckpt)
    assert (loaded.reward_mean, loaded.reward_std) == (stored["mean"], stored["std"])
    # and `--calibrate` without --input takes the run's held-out pairs: the same sample
    proc = btrm("score", "--model", str(ckpt), "--calibrate")
    assert proc.returncode == 0, proc.stderr
    assert meta(ckpt)["calibration"]["mean"] == pytest.approx(mean, abs=1e-6)
    assert meta(ckpt)["calibration"]["n"] == trained["n"]


def test_normalized_scores_agree_across_api_cli_and_server(ckpt, heldout_file, tmp_path):
    pairs = [json.loads(line) for line in heldout_file.read_text().splitlines()][:6]
    convs = [p["chosen"] for p in pairs]
    rm = RewardModel.from_pretrained(ckpt)
    cal = rm.calibration
    raw = rm.score(convs)
    api = rm.score(convs, normalize=True)
    assert api == pytest.approx([(r - cal["mean"]) / cal["std"] for r in raw], abs=1e-9)
    inp, out = tmp_path / "convs.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    proc = btrm("score", "--model", str(ckpt), "--input", str(inp), "--output", str(out), "--normalize")
    assert proc.returncode == 0, proc.stderr
    cli = [json.loads(line)["reward"] for line in out.read_text().splitlines()]
    assert cli == pytest.approx(api, abs=1e-5)
    proc, url = start_server(ckpt, "--normalize")
    try:
        wait_healthy(proc, url)
        status, body = post(url + "/classify", {"text": [render_text(rm.tokenizer, c, rm.chat_template_kwargs)
                                                         for c in convs]})
    finally:
        stop_server(proc)
    assert status == 200
    assert [b["embedding"][0] for b in body] == pytest.approx(api, abs=1e-5)


def test_normalize_without_calibration_is_a_one_line_error(trained_checkpoint, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(trained_checkpoint, bare)
    m = json.loads((bare / "btrm_meta.json").read_text())
    m.pop("calibration")
    (bare / "btrm_meta.json").write_text(json.dumps(m))
    cfg = json.loads((bare / "config.json").read_text())
    cfg.pop("reward_mean"), cfg.pop("reward_std")
    (bare / "config.json").write_text(json.dumps(cfg))
    inp = tmp_path / "c.jsonl"
    inp.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                              "content": "yo"}]}) + "\n")
    proc = btrm("score", "--model", str(bare), "--input", str(inp), "--output", str(tmp_path / "o.jsonl"),
                "--normalize")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("btrm score: error: ") and "no reward calibration" in last
    assert not (tmp_path / "o.jsonl").exists() or not (tmp_path / "o.jsonl").read_text()


def test_card_usage_snippet_reproduces_the_stored_heldout_accuracy(ckpt, heldout_file):
    card = (ckpt / "README.md").read_text()
    for needle in ("tiny:llama3", "synthetic", "## Held-out metrics", "## Calibration", "SGLang", "vLLM",
                   "btrm_config.yaml"):
        assert needle in card
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert MODEL_PATH_LINE in snippet
    namespace: dict = {}
    exec(snippet.replace(MODEL_PATH_LINE, f"model_path = {str(ckpt)!r}"), namespace)  # the card's code, as is
    reward = namespace["reward"]
    pairs = [json.loads(line) for line in heldout_file.read_text().splitlines()]
    correct = sum(reward(p["chosen"]) > reward(p["rejected"]) for p in pairs)
    held = meta(ckpt)["heldout"]
    assert len(pairs) == held["eval/pairs"]
    assert correct / len(pairs) == pytest.approx(held["eval/accuracy"], abs=1e-12)


def test_eval_update_card_writes_the_table(ckpt, tmp_path):
    from pathlib import Path

    fixtures = Path(__file__).resolve().parents[1] / "eval" / "fixtures"
    proc = btrm("eval", "--model", str(ckpt), "--benchmark", "rewardbench", "--data",
                str(fixtures / "rewardbench.jsonl"), "--output-dir", str(tmp_path / "ev"), "--update-card", str(ckpt))
    assert proc.returncode == 0, proc.stderr
    card = (ckpt / "README.md").read_text()
    section = card.split("## Benchmarks", 1)[1].split("## Usage", 1)[0]
    table = (tmp_path / "ev" / "table.md").read_text().strip()
    assert table.splitlines()[-1] in section
    assert json.loads((ckpt / "btrm_eval.json").read_text())["results"]["rewardbench"] >= 0
