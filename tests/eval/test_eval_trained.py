"""`btrm eval --suite all` with a real checkpoint trained by `train.py` (no stand-in scorer)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from evalhelp import FIXTURES

from btrm.cli import main
from btrm.eval import BENCHMARKS, recompute
from btrm.inference.scorer import RewardModel

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    cmd = [sys.executable, "train.py", "--config", "configs/quickstart.yaml", "--train.max_steps=4",
           f"--train.output_dir={out}", f"--data.cache_dir={out / 'cache'}", "--logging.wandb=false",
           "--logging.progress=false", "--data.sources=[{path: 'synthetic:400'}]"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out / "checkpoint-4"


@pytest.mark.slow
def test_suite_all_with_trained_checkpoint(trained_checkpoint, tmp_path, capsys, monkeypatch):
    seen = []
    real_score = RewardModel.score

    def counting_score(self, conversations, *a, **k):  # the real model's scores, counted on the way through
        seen.extend(json.dumps(c, sort_keys=True) for c in conversations)
        return real_score(self, conversations, *a, **k)

    monkeypatch.setattr(RewardModel, "score", counting_score)
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(trained_checkpoint), "--suite", "all", "--data-dir", str(FIXTURES),
                 "--output-dir", str(out), "--model-name", "tiny-trained"]) == 0
    printed = capsys.readouterr().out
    assert "| Model | RewardBench v1 | RewardBench v2 |" in printed and "| tiny-trained |" in printed

    results = {name: json.loads((out / f"{name}.results.json").read_text()) for name in BENCHMARKS}
    for name in BENCHMARKS:
        assert recompute(out / f"{name}.rows.jsonl") == results[name]  # identical without the model
    # one forward per distinct completion: nothing scored twice within a benchmark
    distinct = sum(r["counts"]["distinct_conversations"] for r in results.values())
    assert len(seen) == distinct
