"""RemoteScorer against real `btrm serve` processes: order, both backends, retries, loud failures."""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest
from infhelp import get_json, make_conversations

from btrm.inference.remote import RemoteScorer, RemoteScoringError
from btrm.inference.scorer import RewardModel


@pytest.fixture(scope="module")
def local(rm_dirs):
    return RewardModel.from_pretrained(rm_dirs["llama3"])


def dead_url() -> str:
    with socket.socket() as s:  # a port nobody listens on (just released)
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("backend", ["sglang", "vllm"])
def test_two_servers_match_local_in_input_order(servers, local, rm_dirs, backend):
    convs = make_conversations(50, seed=11, max_words=60)
    scorer = RemoteScorer([servers["a"], servers["b"] + ("/classify" if backend == "sglang" else "/pooling")],
                          backend=backend, tokenizer=str(rm_dirs["llama3"]), model="rm", batch_size=7)
    assert scorer.score(convs) == pytest.approx(local.score(convs), abs=1e-5)
    pairs = scorer.score_pairs(convs[:3], convs[3:6])
    assert [p.chosen for p in pairs] == pytest.approx(local.score(convs[:3]), abs=1e-5)


def test_dead_server_is_retried_elsewhere(servers, local, rm_dirs):
    convs = make_conversations(20, seed=12, max_words=40)
    scorer = RemoteScorer([dead_url(), servers["a"]], tokenizer=local.tokenizer, batch_size=3, backoff=0.01)
    assert scorer.score(convs) == pytest.approx(local.score(convs), abs=1e-5)


def test_all_servers_down_raises_a_clear_error():
    scorer = RemoteScorer([dead_url(), dead_url()], batch_size=2, max_retries=2, backoff=0.01)
    with pytest.raises(RemoteScoringError, match=r"failed after 3 attempts: http://127\.0\.0\.1:\d+: URLError"):
        scorer.score_texts(["a", "b", "c"])


def test_client_error_is_not_retried(servers):
    scorer = RemoteScorer([servers["a"], servers["b"]], max_retries=5, backoff=1.0)
    t0 = time.monotonic()
    with pytest.raises(RemoteScoringError, match=r"HTTP 400: .*text\[0\] has \d+ tokens"):
        scorer.score_texts(["the ocean " * 400])  # over the servers' --max-length 512
    assert time.monotonic() - t0 < 1.0  # no backoff: retrying cannot fix a bad request


def test_server_killed_mid_run_never_leaves_gaps(servers, local, rm_dirs):
    convs = make_conversations(240, seed=13, max_words=30)
    want = local.score(convs)
    victim = servers["procs"]["spare"]
    scorer = RemoteScorer([servers["spare"], servers["a"]], tokenizer=local.tokenizer, batch_size=4,
                          backoff=0.05, concurrency=2)
    result = {}

    def run():
        try:
            result["rewards"] = scorer.score(convs)
        except RemoteScoringError as e:
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 60
    while get_json(servers["spare"] + "/health")[1]["requests"] < 5:  # the victim is serving its share
        assert time.monotonic() < deadline and t.is_alive()
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    t.join(timeout=120)
    assert not t.is_alive()
    if "error" in result:  # allowed: a clear error; never a partial list
        assert "failed after" in str(result["error"])
    else:
        assert len(result["rewards"]) == len(convs)
        assert result["rewards"] == pytest.approx(want, abs=1e-5)
        assert servers["spare"] in scorer._down_until  # the kill did hit the run: some batches were retried
    assert victim.wait(timeout=10) == -signal.SIGKILL


def test_malformed_answers_are_errors_not_placeholders():
    scorer = RemoteScorer(["http://x"], backend="vllm")
    with pytest.raises(Exception, match="expected 'data' with 2 results"):
        scorer._parse({"data": [{"index": 0, "data": [1.0]}]}, 2)
    with pytest.raises(Exception, match=r"expected \[reward\]"):
        scorer._parse({"data": [{"index": 0, "data": [[1.0, 2.0]]}]}, 1)
    assert scorer._parse({"data": [{"index": 1, "data": [2.0]}, {"index": 0, "data": [1.0]}]}, 2) == [1.0, 2.0]
    sg = RemoteScorer(["http://x"])
    with pytest.raises(Exception, match=r"expected \[reward\]"):
        sg._parse([{"embedding": None}], 1)
