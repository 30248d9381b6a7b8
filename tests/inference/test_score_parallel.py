"""`btrm score` on several ranks (real torchrun, 2 CPU ranks) and on a fleet of `btrm serve` processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from infhelp import SERVER_ARGS, get_json, make_conversations, start_server, stop_server, wait_healthy

from btrm.cli import main
from btrm.inference.score_parallel import Shard, cut_torn_chunk

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def write_rows(path: Path, n: int, seed: int) -> Path:
    convs = make_conversations(n, seed=seed, max_words=60)
    rows = [{"id": i, "messages": c} if i % 3 else
            {"chosen": c, "rejected": c[:-1] + [{"role": "assistant", "content": "no"}]} for i, c in enumerate(convs)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def score_cmd(model, inp, out, nproc: int) -> list[str]:
    args = ["score", "--model", str(model), "--input", str(inp), "--output", str(out), "--chunk-rows", "4"]
    if nproc == 1:
        return [sys.executable, "-m", "btrm.cli", *args]
    return [TORCHRUN, "--nproc-per-node", str(nproc), "--master-port", str(free_port()), "-m", "btrm.cli", *args]


def test_shard_deals_chunks_round_robin():
    s = Shard(rank=1, world=3, chunk=2, base=5)
    mine = [row for row in range(5, 30) if s.index(row) is not None]
    assert mine == [7, 8, 13, 14, 19, 20, 25, 26]
    assert [s.index(r) for r in mine] == list(range(8)) and [s.row(k) for k in range(8)] == mine
    assert s.index(3) is None and Shard().index(9) == 9


def test_torn_chunk_is_cut_to_whole_chunks(tmp_path):
    part = tmp_path / "part.jsonl"
    part.write_text("".join(f'{{"row": {i}, "reward": 0.5}}\n' for i in range(10)) + '{"row": 10, "rew')
    cut_torn_chunk(part, 4)
    assert part.read_text().splitlines() == [f'{{"row": {i}, "reward": 0.5}}' for i in range(8)]
    cut_torn_chunk(part, 4)  # whole chunks stay
    assert part.read_text().count("\n") == 8


def test_two_ranks_byte_identical_and_resume_after_kill(rm_dirs, tmp_path):
    inp = write_rows(tmp_path / "in.jsonl", 96, seed=31)
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    subprocess.run(score_cmd(rm_dirs["llama3"], inp, one, 1), env=ENV, check=True, capture_output=True, timeout=300)
    assert [json.loads(x)["row"] for x in one.read_text().splitlines()] == list(range(96))

    r = subprocess.run(score_cmd(rm_dirs["llama3"], inp, two, 2), env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert two.read_bytes() == one.read_bytes()
    assert "merged 2 parts" in r.stdout and not (tmp_path / "two.jsonl.parts").exists()

    # kill -9 rank 1 once it has written some chunks, then re-run: same bytes, its rows skipped as done
    three = tmp_path / "three.jsonl"
    launcher = subprocess.Popen(score_cmd(rm_dirs["llama3"], inp, three, 2), env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    part = tmp_path / "three.jsonl.parts" / "part-00001-of-00002.c4.jsonl"
    deadline = time.monotonic() + 300
    while not (part.exists() and part.read_text().count("\n") >= 8):
        assert time.monotonic() < deadline and launcher.poll() is None
        time.sleep(0.01)
    victim = rank_pid(launcher.pid, 1)
    os.kill(victim, signal.SIGKILL)
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0 and not three.exists()
    done_before = part.read_text().count("\n")
    assert 8 <= done_before < 48  # killed mid-run: rank 1 holds 12 chunks of 4 rows

    r = subprocess.run(score_cmd(rm_dirs["llama3"], inp, three, 2), env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert three.read_bytes() == one.read_bytes()
    skipped = int(r.stderr.split(f"resuming {part}: ")[1].split()[0])
    assert skipped >= done_before - done_before % 4 and skipped % 4 == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of a torchrun worker by its RANK (read from its environment)."""
    for child in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(child)
    raise AssertionError(f"no rank {rank} under {launcher_pid}")


# ----------------------------------------------------------------------------------------------------------------------
# --server


def test_server_scores_like_local_and_survives_a_kill(servers, rm_dirs, tmp_path):
    inp = write_rows(tmp_path / "in.jsonl", 60, seed=32)
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    base = ["score", "--model", str(rm_dirs["llama3"]), "--input", str(inp), "--chunk-rows", "16"]
    assert main([*base, "--output", str(local)]) == 0
    assert main([*base, "--output", str(remote), "--server", servers["a"], servers["b"]]) == 0
    assert_same_rewards(remote, local)

    victim, url = start_server(rm_dirs["llama3"], *SERVER_ARGS)
    try:
        wait_healthy(victim, url)
        killed = tmp_path / "killed.jsonl"
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("rc", main(
            [*base, "--output", str(killed), "--server", url, servers["a"], "--server-batch-size", "2",
             "--backend", "sglang"])))
        t.start()
        deadline = time.monotonic() + 120
        while get_json(url + "/health")[1]["requests"] < 5:  # the victim is serving its share
            assert time.monotonic() < deadline and t.is_alive()
            time.sleep(0.01)
        victim.send_signal(signal.SIGKILL)
        assert t.is_alive()  # killed mid-run: the rest of its share goes to the other server
        t.join(timeout=300)
        assert result["rc"] == 0
        assert_same_rewards(killed, local)
    finally:
        stop_server(victim)


def assert_same_rewards(got_path: Path, want_path: Path) -> None:
    got, want = ([json.loads(x) for x in p.read_text().splitlines()] for p in (got_path, want_path))
    assert [g["row"] for g in got] == [w["row"] for w in want] == list(range(len(want)))
    for g, w in zip(got, want):
        assert g.keys() == w.keys() and g.get("id") == w.get("id") and g.get("preferred") == w.get("preferred")
        for key in ("reward", "chosen", "rejected"):
            if key in w:
                assert g[key] == pytest.approx(w[key], abs=1e-5)


def test_eval_server_equals_local(servers, rm_dirs, tmp_path):
    data = Path(__file__).parents[1] / "eval" / "fixtures" / "rm-bench.json"
    base = ["eval", "--model", str(rm_dirs["llama3"]), "--benchmark", "rm-bench", "--data", str(data)]
    assert main([*base, "--output-dir", str(tmp_path / "local")]) == 0
    assert main([*base, "--output-dir", str(tmp_path / "remote"), "--server", servers["a"], servers["b"]]) == 0
    local, remote = ([json.loads(x) for x in (tmp_path / d / "rm-bench.rows.jsonl").read_text().splitlines()]
                     for d in ("local", "remote"))
    assert len(local) == len(remote) > 0
    assert remote[0]["counts"] == local[0]["counts"] and remote[0]["model"] == local[0]["model"]
    for a, b in zip(local[1:], remote[1:]):
        assert a["id"] == b["id"] and a["result"] == b["result"] and a["scores"].keys() == b["scores"].keys()
        assert list(b["scores"].values()) == pytest.approx(list(a["scores"].values()), abs=1e-5)
