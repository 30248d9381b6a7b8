"""Every bad-row kind: skipped and counted by default, raised with file/row/field under strict."""

import json

import pytest

from btrm.config import SourceConfig
from btrm.data.sources import BadRow, DataReport, load_pairs

U = {"role": "user", "content": "hi"}


def A(text):
    return {"role": "assistant", "content": text}


GOOD = {"chosen": [U, A("good")], "rejected": [U, A("bad")]}
BAD_ROWS = {
    "missing_field": ({"chosen": [U, A("x")]}, "rejected"),
    "null_field": ({"chosen": [U, A("x")], "rejected": None}, "rejected"),
    "empty_response": ({"chosen": [U, A("  ")], "rejected": [U, A("x")]}, "chosen"),
    "non_string_content": ({"chosen": [U, A("x")], "rejected": [U, {"role": "assistant", "content": 3}]},
                           "rejected[1].content"),
    "unknown_role": ({"chosen": [{"role": "wizard", "content": "q"}, A("x")], "rejected": [U, A("y")]},
                     "chosen[0].role"),
    "last_not_assistant": ({"chosen": [U, A("x"), U], "rejected": [U, A("y"), U]}, "chosen"),
    "identical_responses": ({"chosen": [U, A("same")], "rejected": [U, A("same")]}, "rejected"),
    "prompt_mismatch": ({"chosen": [U, A("x")], "rejected": [{"role": "user", "content": "other"}, A("y")]},
                        "rejected"),
    "bad_margin": ({**GOOD, "margin": "big"}, "margin"),
}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("reason", sorted(BAD_ROWS) + ["bad_json"])
def test_bad_row_skipped_and_counted(tmp_path, reason):
    bad = "{not json" if reason == "bad_json" else BAD_ROWS[reason][0]
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD, bad, GOOD])
    report = DataReport()
    pairs = load_pairs([SourceConfig(path=str(f), name="s")], report)
    assert len(pairs) == 2
    assert report.skipped["s"] == {reason: 1}
    assert report.read["s"] == 3 and report.kept["s"] == 2


@pytest.mark.parametrize("reason", sorted(BAD_ROWS) + ["bad_json"])
def test_bad_row_strict_names_file_row_field(tmp_path, reason):
    bad, field = ("{not json", "<row>") if reason == "bad_json" else BAD_ROWS[reason]
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD, bad])
    with pytest.raises(BadRow) as e:
        load_pairs([SourceConfig(path=str(f))], DataReport(), strict=True)
    msg = str(e.value)
    assert f"{f}:2" in msg and f"'{field}'" in msg and e.value.reason == reason


def test_formats_columns_swap_weights(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": f"q{i}", "good": f"yes {i}", "bad": f"no {i}"} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "s.parquet")
    src = SourceConfig(path=str(tmp_path / "s.parquet"), columns={"prompt": "question", "chosen": "good",
                                                                  "rejected": "bad"}, swap=True, weight=1.5)
    pairs = load_pairs([src], DataReport(), seed=0)
    assert len(pairs) == 6  # 4 + round(0.5 * 4)
    p = pairs[0]
    assert p.chosen == [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "no 0"}]  # swapped
    write_jsonl(tmp_path / "pm.jsonl", [{"prompt": [U], "chosen": "a", "rejected": "b", "category": "c"},
                                        {"prompt": [U], "chosen": "a", "rejected": "b", "source": "helpsteer"}])
    pm, own = load_pairs([SourceConfig(path=str(tmp_path / "pm.jsonl"))], DataReport())
    assert pm.chosen == [U, A("a")] and pm.rejected == [U, A("b")] and pm.category == "c"
    assert pm.source == "pm" and own.source == "helpsteer"  # a row's own source column wins over the file name


def test_json_lines_named_json_and_column_json(tmp_path):
    # the reader benchmark data uses too: JSON lines saved as .json, {"data": [...]}, and columns all read
    (tmp_path / "lines.json").write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": [GOOD]}))
    (tmp_path / "columns.json").write_text(json.dumps({"chosen": [GOOD["chosen"]], "rejected": [GOOD["rejected"]]}))
    for name, n in [("lines.json", 2), ("wrapped.json", 1), ("columns.json", 1)]:
        assert len(load_pairs([SourceConfig(path=str(tmp_path / name))], DataReport())) == n


def test_null_chosen_is_null_field_on_the_cli(tmp_path):
    """`btrm data clean`: a null chosen (beside a message-list rejected) is null_field, named on stderr's last line."""
    import subprocess
    import sys

    f = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"chosen": None, "rejected": [U, A("x")]}])
    out = tmp_path / "clean.jsonl"
    cmd = [sys.executable, "-m", "btrm.cli", "data", "clean", "--source", str(f), "--output", str(out)]
    proc = subprocess.run([*cmd, "--strict"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith(f"{f}:2: field 'chosen': null_field")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    report = json.loads((tmp_path / "clean.report.json").read_text())
    assert report["invalid_rows"] == {"d": {"null_field": 1}}


def test_report_round_trips_and_formats_itself(tmp_path):
    # two sources: a has 1 null_field + 1 bad_json, b has 1 null_field; b also had a pair dropped as over-long
    a = write_jsonl(tmp_path / "a.jsonl", [GOOD, BAD_ROWS["null_field"][0], "{not json"])
    b = write_jsonl(tmp_path / "b.jsonl", [BAD_ROWS["null_field"][0], GOOD])
    report = DataReport()
    load_pairs([SourceConfig(path=str(a), name="a"), SourceConfig(path=str(b), name="b")], report)
    report.overlong_dropped["b"] += 1
    again = DataReport.from_dict(json.loads(json.dumps(report.as_dict())))  # as the tokenized cache keeps it
    assert again.as_dict() == report.as_dict()
    assert again.metrics("train") == {"data/train_skipped/null_field": 2, "data/train_skipped/bad_json": 1,
                                      "data/train_overlong_dropped": 1, "data/train_overlong_truncated": 0}
    lines = again.log_lines("train")
    assert lines[0] == ('  train skipped invalid rows: {"a": {"null_field": 1, "bad_json": 1}, '
                        '"b": {"null_field": 1}}')
    assert len(lines) == 4 and lines[-1] == '  train over-long pairs dropped: {"b": 1}'
    assert DataReport().log_lines("eval") == []
