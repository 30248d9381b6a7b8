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


def _long_judgebench(path, tokenizer):
    """JudgeBench rows longer than the quickstart's training length (512) and far within its positions (131072),
    plus one whose response alone is over 16384 tokens."""
    filler = "the committee reviewed every clause of the agreement before it voted on the amendments ".split()

    def words(n, offset=0):
        return " ".join(filler[(offset + i) % len(filler)] for i in range(n))

    rows = []
    for k, source in enumerate(["mmlu-pro-law", "livebench-reasoning", "livebench-math", "livecodebench"]):
        rows.append({"pair_id": f"long{k}", "source": source, "label": ["A>B", "B>A"][k % 2],
                     "question": words(700, k), "response_A": words(40, 1), "response_B": words(45, 2)})
    rows.append({"pair_id": "huge", "source": "mmlu-pro-law", "label": "A>B", "question": "Summarise.",
                 "response_A": words(17000), "response_B": "No."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": r["question"]},
                                            {"role": "assistant", "content": r["response_A"]}], tokenize=False)
             for r in rows]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return lengths


@pytest.mark.slow
def test_judgebench_longer_than_training_length_with_default_flags(trained_checkpoint, tmp_path, capsys):
    from transformers import AutoTokenizer

    data = tmp_path / "judgebench.jsonl"
    lengths = _long_judgebench(data, AutoTokenizer.from_pretrained(trained_checkpoint))
    assert all(512 < n < 16384 for n in lengths[:4]) and lengths[4] > 16384
    assert json.loads((trained_checkpoint / "btrm_meta.json").read_text())["max_length"] == 512

    out = tmp_path / "eval"
    assert main(["eval", "--model", str(trained_checkpoint), "--benchmark", "judgebench", "--data", str(data),
                 "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    # the limit used and the training length, both said; nothing silently capped at 512
    assert "max_length 16384 tokens (min(max_position_embeddings 131072, 16384)); trained at 512" in printed
    c = json.loads((out / "judgebench.results.json").read_text())["counts"]
    assert (c["max_length"], c["rows"], c["rows_skipped"], c["over_length"], c["truncated"]) == (16384, 5, 1, 1, 0)
    assert "JudgeBench: " in printed and "(5 rows, 1 skipped; 1 conversations over max_length 16384" in printed

    # under a limit below the prompts' length, prompts are cut from the left and the rows still score
    out2 = tmp_path / "eval600"
    assert main(["eval", "--model", str(trained_checkpoint), "--benchmark", "judgebench", "--data", str(data),
                 "--output-dir", str(out2), "--max-length", "600"]) == 0
    c = json.loads((out2 / "judgebench.results.json").read_text())["counts"]
    assert (c["rows_skipped"], c["truncated"]) == (1, 8)  # 4 rows x 2 responses cut; the huge one skipped

    # every row over the limit: exit 2, one line naming --max-length and the count
    capsys.readouterr()
    assert main(["eval", "--model", str(trained_checkpoint), "--benchmark", "judgebench", "--data", str(data),
                 "--output-dir", str(tmp_path / "e16"), "--max-length", "16"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("btrm eval: error: judgebench: no rows left to score: all 5 rows") and "--max-length" in last
