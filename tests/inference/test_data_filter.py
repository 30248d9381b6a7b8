"""`btrm data filter --server`: the same rewards and verdicts as `--model` on the checkpoint the servers run."""

from __future__ import annotations

import json

from infhelp import make_conversations

from btrm.cli import main


def test_filter_server_equals_model(servers, rm_dirs, tmp_path):
    convs = make_conversations(40, seed=5, max_words=40)
    rows = [{"chosen": c, "rejected": c[:-1] + [{"role": "assistant", "content": c[-1]["content"] + " no"}]}
            for c in convs]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["data", "filter", "--source", str(src), "--max-disagreement", "0", "--num-proc", "2"]
    assert main([*common, "--model", str(rm_dirs["llama3"]), "--output", str(tmp_path / "local.jsonl")]) == 0
    assert main([*common, "--server", servers["a"], servers["b"], "--tokenizer", str(rm_dirs["llama3"]),
                 "--output", str(tmp_path / "remote.jsonl")]) == 0
    local, remote = ([json.loads(x) for x in (tmp_path / f"{n}.scores.jsonl").read_text().splitlines()]
                     for n in ("local", "remote"))
    assert len(local) == len(remote) == 40
    for a, b in zip(local, remote):
        assert a["origin"] == b["origin"] and a["verdict"] == b["verdict"]
        assert abs(a["chosen"] - b["chosen"]) <= 1e-5 and abs(a["rejected"] - b["rejected"]) <= 1e-5
    report = json.loads((tmp_path / "remote.report.json").read_text())
    assert 0 < report["totals"]["removed"] < 40  # the random head contradicts some labels, not all
    assert (tmp_path / "remote.jsonl").read_bytes() == (tmp_path / "local.jsonl").read_bytes()
