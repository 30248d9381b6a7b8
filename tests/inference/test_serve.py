"""`btrm serve`: SGLang /classify and vLLM /pooling contracts, request validation, batching, shutdown."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
import urllib.parse

import pytest
from infhelp import SERVER_ARGS, get_json, make_conversations, post, start_server, stop_server, wait_healthy

from btrm.inference.scorer import RewardModel
from btrm.inference.server import Batcher
from btrm.render import render_text


@pytest.fixture(scope="module")
def local(rm_dirs):
    return RewardModel.from_pretrained(rm_dirs["llama3"])


def test_classify_matches_local_scoring(servers, local):
    convs = make_conversations(12, seed=7, max_words=60)
    texts = [render_text(local.tokenizer, c) for c in convs]
    status, out = post(servers["a"] + "/classify", {"model": "rm", "text": texts})
    assert status == 200 and len(out) == len(texts)
    assert [o["embedding"][0] for o in out] == pytest.approx(local.score(convs), abs=1e-5)
    assert [o["meta_info"]["prompt_tokens"] for o in out] == [len(x) for x in local.encode(convs)]
    # a single string gets a single object, as SGLang answers
    status, one = post(servers["a"] + "/classify", {"text": texts[0]})
    assert status == 200 and one["embedding"][0] == pytest.approx(out[0]["embedding"][0], abs=1e-5)


def test_pooling_matches_local_scoring(servers, local):
    convs = make_conversations(5, seed=8, max_words=60)
    texts = [render_text(local.tokenizer, c) for c in convs]
    status, out = post(servers["b"] + "/pooling", {"model": "rm", "input": texts})
    assert status == 200 and out["object"] == "list" and out["model"] == "rm"
    assert [d["index"] for d in out["data"]] == list(range(5))
    assert [d["data"][0] for d in out["data"]] == pytest.approx(local.score(convs), abs=1e-5)
    assert out["usage"]["prompt_tokens"] == sum(len(x) for x in local.encode(convs))
    status, one = post(servers["b"] + "/pooling", {"input": texts[0]})
    assert status == 200 and len(one["data"]) == 1


def test_health_and_info(servers):
    status, body = get_json(servers["a"] + "/health")
    assert status == 200 and body["status"] == "ok"
    status, body = get_json(servers["a"] + "/v1/models")
    assert status == 200 and len(body["data"]) == 1


@pytest.mark.parametrize("path,body,status,message", [
    ("/classify", b"{not json", 400, "invalid JSON"),
    ("/classify", b"\xff\xfe", 400, "invalid JSON"),
    ("/classify", [1, 2], 400, "must be a JSON object"),
    ("/classify", {"input": ["x"]}, 400, "missing field 'text'"),
    ("/classify", {"text": 5}, 400, "'text' must be a string or a list of strings"),
    ("/classify", {"text": ["ok", 3]}, 400, "'text[1]' must be a string"),
    ("/classify", {"text": []}, 400, "empty list"),
    ("/classify", {"text": ["x"], "model": 3}, 400, "'model' must be a string"),
    ("/classify", {"text": ["x"] * 65}, 413, "at most 64"),
    ("/classify", {"text": ["the ocean " * 400]}, 400, "text[0] has"),
    ("/pooling", {"input": [{"role": "user"}]}, 400, "'input[0]' must be a string"),
    ("/pooling", {"text": ["x"]}, 400, "missing field 'input'"),
    ("/pooling", {"input": ["the ocean " * 400]}, 400, "input[0] has"),
    ("/generate", {"text": ["x"]}, 404, "no route"),
])
def test_bad_requests_get_4xx_with_a_message(servers, path, body, status, message):
    raw = isinstance(body, bytes)
    got, out = post(servers["a"] + path, body, raw=raw)
    assert got == status
    assert message in out["error"]["message"]


def test_oversize_body_is_refused_before_reading(servers):
    got, out = post(servers["a"] + "/classify", {"text": ["x" * 250_000]})
    assert got == 413 and "exceeds the limit of 200000 bytes" in out["error"]["message"]
    # and a body with no Content-Length at all
    u = urllib.parse.urlsplit(servers["a"])
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.putrequest("POST", "/classify")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 411 and "Content-Length" in json.loads(resp.read())["error"]["message"]
    conn.close()
    assert get_json(servers["a"] + "/health")[0] == 200  # still serving


def test_concurrent_requests_all_answered_correctly(servers, local):
    convs = make_conversations(16, seed=9, max_words=60)
    texts = [render_text(local.tokenizer, c) for c in convs]
    want = local.score(convs)
    got = [None] * 8

    def one(k):
        got[k] = post(servers["b"] + "/classify", {"text": texts[2 * k:2 * k + 2]})

    threads = [threading.Thread(target=one, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, (status, out) in enumerate(got):
        assert status == 200
        assert [o["embedding"][0] for o in out] == pytest.approx(want[2 * k:2 * k + 2], abs=1e-5)


class SlowModel:
    """Stands in for RewardModel in the batcher: records how many texts each forward got."""

    def __init__(self, fail: bool = False):
        self.calls, self.fail = [], fail

    def score_ids(self, seqs, batch_tokens=None, progress=None):
        self.calls.append(len(seqs))
        time.sleep(0.3)
        if self.fail:
            raise RuntimeError("device on fire")
        return [float(len(s)) for s in seqs]


def test_batcher_packs_waiting_requests_together():
    rm = SlowModel()
    b = Batcher(rm, max_batch_tokens=100).start()
    results = {}

    def submit(k):
        results[k] = b.submit([[1] * k, [2] * (k + 10)], timeout=10)

    first = threading.Thread(target=submit, args=(1,))
    first.start()
    time.sleep(0.1)  # the worker is now busy with request 1; the next five queue up behind it
    rest = [threading.Thread(target=submit, args=(k,)) for k in range(2, 7)]
    for t in rest:
        t.start()
    for t in [first, *rest]:
        t.join()
    b.stop()
    assert rm.calls == [2, 10]  # request 1 alone, then the five waiting ones in one round
    assert results == {k: [float(k), float(k + 10)] for k in range(1, 7)}
    assert (b.requests, b.rounds) == (6, 2)


def test_batcher_reports_model_errors_and_keeps_running():
    b = Batcher(SlowModel(fail=True), max_batch_tokens=100).start()
    with pytest.raises(RuntimeError, match="device on fire"):
        b.submit([[1, 2]], timeout=10)
    with pytest.raises(RuntimeError, match="device on fire"):
        b.submit([[1, 2]], timeout=10)
    b.stop()


def test_sigterm_shuts_down_cleanly(rm_dirs):
    proc, url = start_server(rm_dirs["llama3"], *SERVER_ARGS)
    try:
        assert url.startswith("http://127.0.0.1:")  # loopback by default
        wait_healthy(proc, url)
    finally:
        rc = stop_server(proc, signal.SIGTERM)
    assert rc == 0
    assert "shutting down" in proc.stdout.read()
