"""`btrm score`: conversations and pairs, resume, accuracy, bad rows."""

from __future__ import annotations

import json
import re

import pytest
from infhelp import make_conversations

from btrm.cli import main
from btrm.inference.scorer import RewardModel
from btrm.tiny import make_preference_rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def score(model, inp, out, *extra):
    return main(["score", "--model", str(model), "--input", str(inp), "--output", str(out), *extra])


@pytest.fixture(scope="module")
def local(rm_dirs):
    return RewardModel.from_pretrained(rm_dirs["qwen3"])


def test_conversations_and_resume(rm_dirs, local, tmp_path, capsys):
    convs = make_conversations(23, seed=21, max_words=50)
    rows = [{"id": f"c{i}", "messages" if i % 2 else "conversation": c} for i, c in enumerate(convs)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    with inp.open("a") as f:
        f.write("\n")  # a blank line is not a row
    out = tmp_path / "out.jsonl"
    assert score(rm_dirs["qwen3"], inp, out, "--chunk-rows", "5") == 0
    first = read_jsonl(out)
    assert [r["row"] for r in first] == list(range(23)) and [r["id"] for r in first] == [r["id"] for r in rows]
    assert [r["reward"] for r in first] == pytest.approx(local.score(convs), abs=1e-5)
    assert "conversations 23" in capsys.readouterr().out

    # interrupted run: 9 whole lines and a torn tenth -> resumed to the same file
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:9]) + lines[9][:7])
    assert score(rm_dirs["qwen3"], inp, out, "--chunk-rows", "4") == 0
    again = read_jsonl(out)
    assert [r["row"] for r in again] == list(range(23))
    assert [r["reward"] for r in again] == pytest.approx([r["reward"] for r in first], abs=1e-5)
    captured = capsys.readouterr()
    assert "9 rows already scored" in captured.err and "wrote 14 rows" in captured.out
    # complete output: nothing to do
    assert score(rm_dirs["qwen3"], inp, out) == 0
    assert len(read_jsonl(out)) == 23 and "wrote 0 rows" in capsys.readouterr().out


def test_pairs_accuracy(rm_dirs, local, tmp_path, capsys):
    rows = make_preference_rows(12, seed=3)
    rows[4] = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5", "id": 99}  # another trainer format
    inp = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "scores.jsonl"
    assert score(rm_dirs["qwen3"], inp, out) == 0
    got = read_jsonl(out)
    assert got[4]["id"] == 99
    chosen = [r["chosen"] if isinstance(r["chosen"], list) else
              [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}] for r in rows]
    rejected = [r["rejected"] if isinstance(r["rejected"], list) else
                [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["rejected"]}]
                for r in rows]
    want = local.score_pairs(chosen, rejected)
    assert [g["chosen"] for g in got] == pytest.approx([w.chosen for w in want], abs=1e-5)
    assert [g["rejected"] for g in got] == pytest.approx([w.rejected for w in want], abs=1e-5)
    correct = sum(w.chosen > w.rejected for w in want)
    assert f"pair accuracy: {correct / 12:.4f} ({correct}/12" in capsys.readouterr().out


def test_bad_rows_name_file_line_and_field(rm_dirs, tmp_path, capsys):
    rows = make_preference_rows(4)
    rows[2]["rejected"][1]["content"] = None
    inp = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "o.jsonl"
    assert score(rm_dirs["qwen3"], inp, out) == 2
    err = capsys.readouterr().err
    assert f"{inp}:3: field 'rejected[1].content': null_field" in err
    assert len(read_jsonl(out)) == 2  # rows before the bad one are kept, so a resume starts at it
    assert score(rm_dirs["qwen3"], inp, out, "--skip-bad") == 0
    got = read_jsonl(out)
    assert [("error" in r) for r in got] == [False, False, True, False]
    assert "bad 1" in capsys.readouterr().out


def test_overlong_row(rm_dirs, tmp_path, capsys):
    rows = [{"messages": c} for c in make_conversations(3, seed=5, max_words=20)]
    rows.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the ocean " * 200}]})
    inp = write_jsonl(tmp_path / "long.jsonl", rows)
    out = tmp_path / "o.jsonl"
    assert score(rm_dirs["qwen3"], inp, out, "--max-length", "100") == 2
    assert re.search(rf"{re.escape(str(inp))}:4: field 'messages': \d+ tokens > max length 100", capsys.readouterr().err)
    assert score(rm_dirs["qwen3"], inp, out, "--max-length", "100", "--skip-bad") == 0
    assert "error" in read_jsonl(out)[3] and len(read_jsonl(out)) == 4


def test_conversation_ending_with_the_user_is_refused(rm_dirs, tmp_path):
    """No response to read a reward from: an error naming file, line and field (real CLI), or a counted skip."""
    import subprocess
    import sys

    rows = [{"messages": c} for c in make_conversations(3, seed=6, max_words=20)]
    rows[1]["messages"] = rows[1]["messages"][:-1]  # ends with the user's turn
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "o.jsonl"
    cmd = [sys.executable, "-m", "btrm.cli", "score", "--model", str(rm_dirs["qwen3"]), "--input", str(inp),
           "--output", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == (f"btrm score: error: {inp}:2: field 'messages': last_not_assistant "
                                                 "(last role is 'user') (or pass --skip-bad)")
    p = subprocess.run([*cmd, "--skip-bad"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "bad 1" in p.stdout
    got = read_jsonl(out)
    assert [("error" in r) for r in got] == [False, True, False] and "last_not_assistant" in got[1]["error"]


def test_non_utf8_line_is_named_or_skipped(rm_dirs, tmp_path):
    """A byte that is not UTF-8 in one jsonl line: an error naming file and line (real CLI), or with --skip-bad
    that row's {row, error} while the others are scored."""
    import subprocess
    import sys

    inp = write_jsonl(tmp_path / "in.jsonl", [{"messages": c} for c in make_conversations(3, seed=6, max_words=20)])
    lines = inp.read_bytes().splitlines(keepends=True)
    inp.write_bytes(lines[0] + lines[1].replace(b'"content": "', b'"content": "\xe9', 1) + lines[2])
    out = tmp_path / "o.jsonl"
    cmd = [sys.executable, "-m", "btrm.cli", "score", "--model", str(rm_dirs["qwen3"]), "--input", str(inp),
           "--output", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(f"btrm score: error: {inp}:2: field '<row>': bad_encoding")
    p = subprocess.run([*cmd, "--skip-bad"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "bad 1" in p.stdout
    got = read_jsonl(out)
    assert [("error" in r) for r in got] == [False, True, False] and "bad_encoding" in got[1]["error"]


def test_resume_gives_identical_output_in_bf16(rm_dirs, tmp_path, monkeypatch):
    """Chunks start at fixed rows, so a resume packs every row with the same neighbours as an uninterrupted run:
    the model sees the same sequence lists (recorded on their way in) and the output is equal bytes, not approx."""
    forwards = []
    score_ids = RewardModel.score_ids

    def recorded(self, seqs, *a, **k):
        forwards.append([tuple(s) for s in seqs])
        return score_ids(self, seqs, *a, **k)

    monkeypatch.setattr(RewardModel, "score_ids", recorded)
    rows = [{"messages": c} for c in make_conversations(40, seed=23, max_words=80)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    args = ("--dtype", "bf16", "--chunk-rows", "16", "--batch-tokens", "512")
    assert score(rm_dirs["qwen3"], inp, full, *args) == 0
    want = forwards[:]
    assert len(want) == 3  # rows 0-15, 16-31, 32-39
    for k in (7, 16, 29):  # inside a chunk, on a boundary, inside the last one
        forwards.clear()
        cut.write_text("".join(full.read_text().splitlines(keepends=True)[:k]))
        assert score(rm_dirs["qwen3"], inp, cut, *args) == 0
        assert forwards == want[k // 16:]
        assert cut.read_text() == full.read_text()


def test_group_rows(rm_dirs, local, tmp_path, capsys):
    from btrm.tiny import make_group_rows

    rows = make_group_rows(5, seed=4)
    rows[1] = {"prompt": rows[1]["prompt"], "responses": rows[1]["responses"][:3]}  # no labels: just ranked
    rows[2] = {"prompt": rows[2]["prompt"], "responses": rows[2]["responses"], "ranking": [3, 1, 0, 2], "id": "g2"}
    inp = write_jsonl(tmp_path / "groups.jsonl", [*rows, make_preference_rows(1)[0]])
    out = tmp_path / "scores.jsonl"
    assert score(rm_dirs["qwen3"], inp, out) == 0
    got = read_jsonl(out)
    assert got[2]["id"] == "g2" and "chosen" in got[5]
    labelled = 0
    for row, rec in zip(rows, got):
        convs = [[{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": r}]
                 for r in row["responses"]]
        want = local.score(convs)  # input order
        assert rec["rewards"] == pytest.approx(want, abs=1e-5)
        assert rec["ranking"] == sorted(range(len(want)), key=lambda i: -want[i])
        assert ("top1_correct" in rec) == ("scores" in row or "ranking" in row)
        if "scores" in row:
            assert rec["top1_correct"] == (row["scores"][rec["ranking"][0]] == 3)
        if "ranking" in row:
            assert rec["top1_correct"] == (rec["ranking"][0] == 3)
        labelled += "top1_correct" in rec
    assert labelled == 4 and "groups 5" in capsys.readouterr().out
