"""`btrm eval --suite all` with a real checkpoint trained by `train.py` (no stand-in scorer)."""

import json

import pytest
from evalhelp import FIXTURES

from btrm.cli import main
from btrm.eval import BENCHMARKS, recompute
from btrm.inference.scorer import RewardModel

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
