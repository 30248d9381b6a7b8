"""`btrm eval` end to end on the fixtures, with a deterministic scorer standing in for the model."""

import hashlib
import json
import subprocess
import sys

import pytest
from evalhelp import FIXTURES, Counting, embedded_score

from btrm.cli import main
from btrm.eval import BENCHMARKS, evaluate, find_data, harness, recompute
from btrm.eval import cli as eval_cli
from btrm.eval.io import read_records

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
    last_turn = lambda conversation: len(conversation[-1]["content"].split())  # noqa: E731  what a cut leaves
    monkeypatch.setattr(eval_cli, "load_scorer", lambda args: (counter, token_count, last_turn,
                                                                args.max_length or 16384))
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


def test_model_is_required_without_recompute(capsys):
    assert main(["eval", "--benchmark", "rmb", "--data", str(FIXTURES / "rmb")]) == 2
    assert capsys.readouterr().err == "btrm eval: error: --model is required (except with --recompute or --fetch)\n"


def test_cli_import_stays_light():
    # `btrm eval --recompute` and --help must not pay for torch: the model stack loads only in load_scorer
    code = "import sys, btrm.eval.cli; sys.exit(any(m in sys.modules for m in ('torch', 'transformers', 'datasets')))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------------------------------------------------------
# Over-length policies, errors and the Hub (issue #20)


def test_truncate_is_the_default_and_skips_rows_whose_last_turn_is_too_long(tmp_path, scorer, capsys):
    # judgebench fixture: words per response ("<x>" counts as one); at --max-length 3 every conversation is over,
    # and only rows whose both responses have at most 3 words are kept (their prompt is cut)
    rows = [json.loads(line) for line in open(FIXTURES / "judgebench.jsonl")]
    fits = [max(len(r["response_A"].split()), len(r["response_B"].split())) <= 3 for r in rows]
    assert 0 < sum(fits) < len(rows)
    out = tmp_path / "out"
    argv = ["eval", "--model", "tiny", "--benchmark", "judgebench", "--data", str(FIXTURES / "judgebench.jsonl"),
            "--output-dir", str(out), "--max-length", "3"]
    assert main(argv) == 0
    c = json.loads((out / "judgebench.results.json").read_text())["counts"]
    assert c["over_length_policy"] == "truncate" and c["rows_skipped"] == len(rows) - sum(fits)
    convs = [(r["question"], r[k]) for r in rows for k in ("response_A", "response_B")]
    words = [(len(q.split()) + len(a.split()), len(a.split())) for q, a in convs]
    assert c["over_length"] == sum(total > 3 for total, _ in words)
    assert c["truncated"] == sum(total > 3 and last <= 3 for total, last in words) > 0
    printed = capsys.readouterr().out
    assert f"{len(rows) - sum(fits)} skipped" in printed and "cut from the left" in printed


@pytest.mark.parametrize("policy", ["truncate", "skip"])
def test_every_row_over_the_limit_exits_2_naming_max_length(policy, scorer, capsys):
    argv = ["eval", "--model", "tiny", "--benchmark", "judgebench", "--data", str(FIXTURES / "judgebench.jsonl"),
            "--max-length", "1", "--over-length", policy]
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # above it: the token-count progress bar
    assert "Traceback" not in err and last.startswith("btrm eval: error: judgebench: no rows left to score: all 7 ")
    assert "raise --max-length" in last


def test_over_length_error_names_the_row(scorer, capsys):
    argv = ["eval", "--model", "tiny", "--benchmark", "judgebench", "--data", str(FIXTURES / "judgebench.jsonl"),
            "--max-length", "4", "--over-length", "error"]
    assert main(argv) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("btrm eval: error: judgebench: row ") and "> --max-length 4" in last
    assert scorer.forwards == 0  # stopped before scoring anything


def test_suite_from_the_hub_offline_fails_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # no --data-dir: every benchmark's Hub datasets; the data is read before the model, so no model is needed
    assert main(["eval", "--model", "no/such-model", "--suite", "all"]) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # above it, at most the log line saying how to get RMB (GitHub only)
    assert "Traceback" not in err and last.startswith("btrm eval: error: cannot read allenai/reward-bench, ")
    hub_ids = [d for b in BENCHMARKS.values() for d, _ in b.hub]
    assert len(hub_ids) == 10 and all(d in last for d in hub_ids)
    assert "--fetch" in last and "--data-dir" in last


def test_rmb_without_data_says_how_to_get_it(capsys):
    assert main(["eval", "--model", "tiny", "--benchmark", "rmb"]) == 2
    err = capsys.readouterr().err
    assert "rmb: not on the Hub" in err and "github.com/Zhou-Zoey/RMB-Reward-Model-Benchmark" in err


def test_fetch_writes_the_data_dir_layout(tmp_path, scorer, monkeypatch):
    # a stand-in Hub serving the fixture rows: the layout written must load back to the same results
    fixture_of = {d: name for name, b in BENCHMARKS.items() for d, _ in b.hub}
    served = []

    def hub(dataset_id, split):
        served.append((dataset_id, split))
        name = fixture_of[dataset_id]
        path = find_data(FIXTURES, name)
        if name == "ppe-correctness":  # each set served from the fixture's mmlu-pro file
            path = path / "mmlu-pro.jsonl"
        return read_records(str(path), ())

    monkeypatch.setattr(harness, "read_hub", hub)
    data = tmp_path / "bench"
    assert main(["eval", "--fetch", str(data)]) == 0
    assert sorted(served) == sorted((d, s) for b in BENCHMARKS.values() for d, s in b.hub)
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*.parquet")) == sorted(
        [f"{n}.parquet" for n in ("rewardbench", "rewardbench2", "ppe-preference", "rm-bench", "judgebench")]
        + [f"ppe-correctness/PPE-{s}-Best-of-K.parquet" for s in ("MMLU-Pro", "MATH", "GPQA", "IFEval", "MBPP-Plus")])
    for name in ("rewardbench", "rewardbench2", "ppe-preference", "rm-bench", "judgebench"):
        fetched = evaluate(embedded_score, name, str(find_data(data, name)), progress=False)
        assert fetched["overall"] == evaluate(embedded_score, name, str(find_data(FIXTURES, name)),
                                              progress=False)["overall"]
    corr = evaluate(embedded_score, "ppe-correctness", str(find_data(data, "ppe-correctness")), progress=False)
    assert sorted(corr["subsets"]) == ["GPQA", "IFEval", "MATH", "MBPP-Plus", "MMLU-Pro"]
