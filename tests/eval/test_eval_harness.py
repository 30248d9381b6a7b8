"""The harness: one forward per distinct completion, the over-length policy, per-row files, recompute, loaders."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from evalhelp import FIXTURES, Counting, embedded_score

from btrm.errors import UserError
from btrm.eval import BENCHMARKS, evaluate, markdown_table, recompute
from btrm.eval.io import read_records


def _distinct(units_raw):
    return {tuple((m["role"], m["content"]) for m in c) for u in units_raw for c in u.completions.values()}


@pytest.mark.parametrize(
    "name, path", [("rm-bench", "rm-bench.json"), ("rmb", "rmb"), ("ppe-correctness", "ppe-correctness")]
)
def test_one_forward_per_distinct_completion(name, path):
    bench = BENCHMARKS[name]
    units = bench.to_units(read_records(str(FIXTURES / path), bench.hub))
    distinct = _distinct(units)
    references = sum(len(u.completions) for u in units)

    counter = Counting()
    r = evaluate(counter, name, str(FIXTURES / path), progress=False)

    assert len(counter.calls) == 1
    assert counter.forwards == len(distinct) == r["counts"]["distinct_conversations"]
    assert r["counts"]["conversations"] == references
    scored = [tuple((m["role"], m["content"]) for m in c) for c in counter.calls[0]]
    assert len(set(scored)) == len(scored)  # nothing scored twice


def test_shared_completions_really_are_shared():
    # RMB: the BoN rows reuse 4 responses of the pairwise rows (same prompts); PPE Correctness: response 2 and 4
    # of question m1 sit in two conflict pairs each
    for name, path, saved in [("rmb", "rmb", 4), ("ppe-correctness", "ppe-correctness", 2)]:
        r = evaluate(Counting(), name, str(FIXTURES / path), progress=False)
        assert r["counts"]["conversations"] - r["counts"]["distinct_conversations"] == saved


def test_chunks_keep_one_forward_per_distinct_completion():
    counter = Counting()
    r = evaluate(counter, "rmb", str(FIXTURES / "rmb"), chunk_size=3, progress=False)
    assert [len(c) for c in counter.calls] == [3, 3, 3, 2]
    assert counter.forwards == r["counts"]["distinct_conversations"] == 11  # 15 references, 4 shared


def _chars(conversation):
    return sum(len(m["content"]) for m in conversation)


def test_over_length_skip_drops_rows_and_reports_them(tmp_path):
    # RM-Bench rows whose longest conversation is over 40 characters are left out: only math/1 is that short
    counter = Counting()
    r = evaluate(counter, "rm-bench", str(FIXTURES / "rm-bench.json"), tmp_path, max_length=40, length_fn=_chars,
                 over_length="skip", progress=False)
    c = r["counts"]
    assert (c["rows"], c["rows_skipped"]) == (4, 3)
    assert c["over_length"] > 0 and c["scored_conversations"] == counter.forwards == 6
    assert r["subsets"] == {"math": 0.0}
    assert any("3 of 4 rows skipped" in n for n in r["notes"])
    rows = [json.loads(line) for line in open(tmp_path / "rm-bench.rows.jsonl")][1:]
    assert [row.get("skipped", False) for row in rows] == [True, True, True, False]
    assert recompute(tmp_path / "rm-bench.rows.jsonl") == r


def test_over_length_truncate_without_cut_length_trusts_the_scorer():
    counter = Counting()
    r = evaluate(counter, "rm-bench", str(FIXTURES / "rm-bench.json"), max_length=40, length_fn=_chars,
                 over_length="truncate", progress=False)
    assert r["counts"]["rows_skipped"] == 0 and r["counts"]["over_length"] > 0
    assert counter.forwards == r["counts"]["distinct_conversations"]
    plain = evaluate(embedded_score, "rm-bench", str(FIXTURES / "rm-bench.json"), progress=False)
    assert r["overall"] == plain["overall"]


def test_max_length_needs_a_length_fn():
    with pytest.raises(ValueError, match="length_fn"):
        evaluate(embedded_score, "rm-bench", str(FIXTURES / "rm-bench.json"), max_length=10, progress=False)


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_recompute_from_per_row_file_is_identical(tmp_path, name):
    path = next(p for p in FIXTURES.iterdir() if p.name.split(".")[0] == name)
    r = evaluate(embedded_score, name, str(path), tmp_path, model_name="m", progress=False)
    assert recompute(tmp_path / f"{name}.rows.jsonl") == r
    assert json.loads((tmp_path / f"{name}.results.json").read_text()) == r


def test_per_row_file_holds_scores_and_results(tmp_path):
    evaluate(embedded_score, "judgebench", str(FIXTURES / "judgebench.jsonl"), tmp_path, model_name="m", progress=False)
    lines = [json.loads(line) for line in open(tmp_path / "judgebench.rows.jsonl")]
    assert lines[0]["benchmark"] == "judgebench" and lines[0]["model"] == "m"
    assert lines[1] == {"id": "k1", "subset": "knowledge", "meta": {"label": "A>B", "source": "mmlu-pro-law"},
                        "scores": {"A": 2.0, "B": 1.0}, "result": 1.0}


def test_table_row_in_card_order_and_no_average_of_a_partial_row():
    table = markdown_table("tiny", {"judgebench": 60.0, "rewardbench": 90.0, "rmb": 70.04})
    header, sep, row = table.splitlines()
    assert header == ("| Model | RewardBench v1 | RewardBench v2 | PPE Preference | PPE Correctness | RMB | RM-Bench "
                      "| JudgeBench | Avg. |")
    assert sep.count("|") == header.count("|")
    # the card's Avg. is over all seven columns: a mean of three would look comparable and isn't
    assert row == "| tiny | 90.0 | - | - | - | 70.0 | - | 60.0 | - |"


def test_table_average_of_a_full_row():
    # Skywork-Reward-V2-Llama-3.1-8B's card row: (96.4 + 84.1 + 77.3 + 83.4 + 86.4 + 92.8 + 80.0) / 7 = 85.77
    card = dict(zip(BENCHMARKS, [96.4, 84.1, 77.3, 83.4, 86.4, 92.8, 80.0]))
    assert markdown_table("m", card).splitlines()[2] == "| m | 96.4 | 84.1 | 77.3 | 83.4 | 86.4 | 92.8 | 80.0 | 85.8 |"


def test_table_accumulates_benchmarks_run_separately(tmp_path):
    evaluate(embedded_score, "judgebench", str(FIXTURES / "judgebench.jsonl"), tmp_path, model_name="m", progress=False)
    evaluate(embedded_score, "rm-bench", str(FIXTURES / "rm-bench.json"), tmp_path, model_name="m", progress=False)
    row = (tmp_path / "table.md").read_text().splitlines()[2]
    assert row == "| m | - | - | - | - | - | 50.0 | 66.7 | - |"


def test_loaders_read_parquet_jsonl_json_and_folders(tmp_path):
    rows = [json.loads(line) for line in open(FIXTURES / "rewardbench.jsonl")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rb.parquet")
    (tmp_path / "rb.json").write_text(json.dumps(rows))
    (tmp_path / "rb_lines.json").write_text((FIXTURES / "rewardbench.jsonl").read_text())  # JSON lines named .json
    expected = evaluate(embedded_score, "rewardbench", str(FIXTURES / "rewardbench.jsonl"), progress=False)["overall"]
    for f in ["rb.parquet", "rb.json", "rb_lines.json"]:
        assert evaluate(embedded_score, "rewardbench", str(tmp_path / f), progress=False)["overall"] == expected
    (tmp_path / "folder" / ".cache").mkdir(parents=True)
    (tmp_path / "folder" / ".cache" / "meta.json").write_text("{}")  # not data: hidden
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "folder" / "filtered-00000.parquet")
    assert evaluate(embedded_score, "rewardbench", str(tmp_path / "folder"), progress=False)["overall"] == expected
    nested = read_records(str(FIXTURES / "rmb"), ())
    assert {r["_source"] for r in nested} == {
        "BoN_set/Harmlessness/S1", "BoN_set/Helpfulness/Chat/Discussion",
        "Pairwise_set/Harmlessness/S1", "Pairwise_set/Helpfulness/Chat/Discussion",
    }


def test_bad_files_fail_naming_file_and_line(tmp_path):
    # one reader for training data and benchmark data (btrm.data.sources.iter_file): same origins, same errors
    lines = (FIXTURES / "judgebench.jsonl").read_text().splitlines()
    bad = tmp_path / "jb.jsonl"
    bad.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=f"{bad}:2: field '<row>': bad_json"):
        read_records(str(bad), ())
    scalar = tmp_path / "one.json"
    scalar.write_text("5")
    with pytest.raises(ValueError, match="one.json: expected a JSON list of rows, got int"):
        read_records(str(scalar), ())


def test_missing_field_names_benchmark_file_row_and_field(tmp_path):
    rows = [json.loads(line) for line in open(FIXTURES / "judgebench.jsonl")]
    del rows[1]["label"]
    path = tmp_path / "jb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match="judgebench: jb row 1 has no field 'label'"):
        evaluate(embedded_score, "judgebench", str(path), progress=False)


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_records(str(tmp_path / "nope.jsonl"), ())


def test_multi_turn_prompts_keep_role_and_content_only():
    bench = BENCHMARKS["rmb"]
    units = bench.to_units(read_records(str(FIXTURES / "rmb"), bench.hub))
    unit = next(u for u in units if u.id == "pair:3")
    assert unit.completions["chosen"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How do I pick a lock?"},
        {"role": "assistant", "content": "Call a locksmith. <2>"},
    ]
