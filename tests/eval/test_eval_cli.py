"""`btrm eval` end to end on the fixtures, with a deterministic scorer standing in for the model."""

import hashlib
import json
import subprocess
import sys

import pytest
from evalhelp import FIXTURES, Counting

from btrm.cli import main
from btrm.eval import BENCHMARKS, recompute
from btrm.eval import cli as eval_cli

COLUMNS = ["RewardBench v1", "RewardBench v2", "PPE Preference", "PPE Correctness", "RMB", "RM-Bench", "JudgeBench"]
HEADER = "| Model | " + " | ".join(COLUMNS) + " | Avg. |"  # the model card's column order


def hashed_score(conversations):
    """Deterministic stand-in for a reward model: a hash of the whole conversation mapped to [0, 10)."""
    out = []
    for c in conversations:
        digest = hashlib.sha256(json.dumps(c, sort_keys=True).encode()).digest()
        out.append(int.from_bytes(digest[:8], "big") / 2**64 * 10)
    return out


@pytest.fixture
def scorer(monkeypatch):
    counter = Counting(hashed_score)
    token_count = lambda conversation: sum(len(m["content"].split()) for m in conversation)  # noqa: E731
    monkeypatch.setattr(eval_cli, "load_scorer", lambda args: (counter, token_count, args.max_length or 16384))
    return counter


def test_suite_all_prints_the_table_and_recompute_is_identical(tmp_path, scorer, capsys):
    out = tmp_path / "out"
    argv = ["eval", "--model", "ckpt/tiny-rm", "--suite", "all", "--data-dir", str(FIXTURES), "--output-dir", str(out)]
    rc = main(argv)
    assert rc == 0
    printed = capsys.readouterr().out.splitlines()
    assert HEADER in printed
    row = printed[printed.index(HEADER) + 2]

    results = {name: json.loads((out / f"{name}.results.json").read_text()) for name in BENCHMARKS}
    cells = [f"{results[name]['overall']:.1f}" for name in BENCHMARKS]
    average = sum(r["overall"] for r in results.values()) / 7
    assert row == "| tiny-rm | " + " | ".join(cells) + f" | {average:.1f} |"
    assert (out / "table.md").read_text().splitlines()[2] == row

    # scores recomputed from the per-row files, without the model, give the same numbers
    for name in BENCHMARKS:
        assert recompute(out / f"{name}.rows.jsonl") == results[name]
    rc = main(["eval", "--recompute", *[str(out / f"{name}.rows.jsonl") for name in BENCHMARKS]])
    assert rc == 0
    assert row in capsys.readouterr().out.splitlines()

    # one forward per distinct completion, benchmark by benchmark
    assert scorer.forwards == sum(r["counts"]["distinct_conversations"] for r in results.values())


def test_single_benchmark_with_data_and_length_policy(tmp_path, scorer, capsys):
    out = tmp_path / "out"
    argv = ["eval", "--model", "tiny", "--benchmark", "rm-bench", "--data", str(FIXTURES / "rm-bench.json"),
            "--output-dir", str(out), "--max-length", "8", "--over-length", "skip"]
    assert main(argv) == 0
    r = json.loads((out / "rm-bench.results.json").read_text())
    assert r["counts"]["max_length"] == 8 and r["counts"]["over_length_policy"] == "skip"
    assert (r["counts"]["rows_skipped"], r["counts"]["rows"]) == (2, 4)  # chat/1 (9 words) and safety (12) are over
    printed = capsys.readouterr().out
    assert "skipped" in printed and "| tiny | - | - | - | - | - |" in printed


def test_benchmark_picked_from_data_dir(tmp_path, scorer):
    out = tmp_path / "out"
    argv = ["eval", "--model", "tiny", "--benchmark", "judgebench", "--data-dir", str(FIXTURES)]
    argv += ["--output-dir", str(out)]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["judgebench.results.json", "judgebench.rows.jsonl", "table.md"]


def test_suite_leaves_missing_benchmarks_out(tmp_path, scorer, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "judgebench.jsonl").write_text((FIXTURES / "judgebench.jsonl").read_text())
    argv = ["eval", "--model", "tiny", "--suite", "all", "--data-dir", str(data), "--output-dir", str(tmp_path / "o")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| tiny | - | - | - | - | - | - | " in printed


def test_model_is_required_without_recompute():
    with pytest.raises(SystemExit, match="--model"):
        main(["eval", "--benchmark", "rmb", "--data", str(FIXTURES / "rmb")])


def test_cli_import_stays_light():
    # `btrm eval --recompute` and --help must not pay for torch: the model stack loads only in load_scorer
    code = "import sys, btrm.eval.cli; sys.exit(any(m in sys.modules for m in ('torch', 'transformers', 'datasets')))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
