"""Data errors under the real launcher (2 CPU ranks): one line from rank 0 naming file, row and field or columns,
exit code 2, no traceback unless --debug; a non-UTF-8 jsonl line is a counted skip, or a named error when strict."""

import json
import subprocess

import pytest

from btrm.tiny import make_preference_rows, write_preference_jsonl

from trainhelp import REPO, env, launcher_cmd, metrics, train, write_config


def _launch(config, *extra):
    return subprocess.run(launcher_cmd(config, 2, *extra), cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=600)


def _bad_row(tmp_path):
    rows = make_preference_rows(4, seed=2)
    rows[2].pop("rejected")
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, {"strict": True}, ["pairs.jsonl:3", "field 'rejected'", "missing_field"]


def _non_utf8(tmp_path):
    path = write_preference_jsonl(tmp_path / "pairs.jsonl", 4, seed=2)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:1] + [lines[1][:20] + b"\xff" + lines[1][20:]] + lines[2:]))
    return path, {"strict": True}, ["pairs.jsonl:2", "bad_encoding", "0xff"]


def _empty(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    return path, {}, ["no valid training pairs in", "empty.jsonl"]


def _missing(tmp_path):
    return tmp_path / "missing.jsonl", {}, ["data source not found", "missing.jsonl"]


def _no_data_dir(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("x")
    return tmp_path / "d", {}, ["/d: no [", "files in directory"]


def _parquet_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"question": ["a"], "good": ["b"], "bad": ["c"]}), path)
    return path, {}, ["pairs.parquet", "expected ['chosen', 'rejected']", "found ['question', 'good', 'bad']"]


CASES = {"strict_bad_row": _bad_row, "strict_non_utf8": _non_utf8, "empty_file": _empty, "missing_file": _missing,
         "dir_without_data": _no_data_dir, "parquet_columns": _parquet_columns}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_data_error_is_one_line_from_rank0(tmp_path, tiny_llama_dir, case):
    data, data_cfg, names = CASES[case](tmp_path)
    config = write_config(tmp_path, tiny_llama_dir, data, data=data_cfg, train={"max_steps": 1})
    p = _launch(config)
    out = p.stdout + p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode != 0, out[-3000:]
    assert last.startswith("train.py: error: "), out[-3000:]
    for name in names:
        assert name in last, (name, last)
    assert out.count("Traceback (most recent call last)") == 0, out[-3000:]
    assert out.count("train.py: error: ") == 1, out[-3000:]  # rank 0 only


@pytest.mark.slow
def test_data_error_debug_shows_traceback(tmp_path, tiny_llama_dir):
    data, data_cfg, names = _missing(tmp_path)
    config = write_config(tmp_path, tiny_llama_dir, data, data=data_cfg, train={"max_steps": 1})
    p = _launch(config, "--debug")
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert out.count("Traceback (most recent call last)") == 1, out[-3000:]  # rank 0's; rank 1 exits quietly
    assert "FileNotFoundError: data source not found" in out


@pytest.mark.slow
def test_non_utf8_line_is_a_counted_skip(tmp_path, tiny_llama_dir):
    data, _, _ = _non_utf8(tmp_path)
    config = write_config(tmp_path, tiny_llama_dir, data, train={"max_steps": 1, "global_batch_pairs": 2})
    p = train(config, 2)
    assert '"bad_encoding": 1' in p.stdout, p.stdout[-3000:]
    assert metrics(tmp_path / "out")[1]["data/train_skipped/bad_encoding"] == 1
