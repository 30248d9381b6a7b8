"""`btrm serve` under a fleet's load and hostile clients, on loopback: no resets, bounded threads, timeouts that bite.

The guarded server runs with a 2 s --read-timeout and --max-queued 2, so the 503 path and the timeouts are reached
quickly; the plain one ("a", shared with the other tests) runs with the defaults.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.parse

import pytest
from infhelp import SERVER_ARGS, make_conversations, post, start_server, stop_server, wait_healthy

from btrm.inference.scorer import RewardModel
from btrm.render import render_text

READ_TIMEOUT = 2.0
THREAD_BOUND = 24  # main + event loop's helpers + tokenizer + model worker + torch's own: far below one per socket


@pytest.fixture(scope="module")
def guarded(rm_dirs):
    proc, url = start_server(rm_dirs["llama3"], *SERVER_ARGS, "--read-timeout", str(READ_TIMEOUT),
                             "--max-queued", "2")
    try:
        wait_healthy(proc, url)
        post(url + "/classify", {"text": ["warm-up"]})  # the first forward sets up kernels; not what is timed here
        yield proc, url
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def local(rm_dirs):
    return RewardModel.from_pretrained(rm_dirs["llama3"])


def hostport(url: str) -> tuple[str, int]:
    u = urllib.parse.urlsplit(url)
    return u.hostname, u.port


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


@pytest.mark.parametrize("which", ["default", "guarded"])
def test_256_concurrent_requests_answered_200_or_503_never_reset(servers, guarded, local, which):
    url = servers["a"] if which == "default" else guarded[1]
    convs = make_conversations(16, seed=21, max_words=40)
    texts = [render_text(local.tokenizer, c) for c in convs]
    want = local.score(convs)
    n = 256
    got: list = [None] * n
    start = threading.Barrier(n)

    def one(k: int) -> None:
        conn = http.client.HTTPConnection(*hostport(url), timeout=60)
        try:
            start.wait()
            conn.request("POST", "/classify", json.dumps({"text": [texts[k % 16]]}),
                         {"Content-Type": "application/json"})
            r = conn.getresponse()
            got[k] = (r.status, r.getheader("Retry-After"), json.loads(r.read()))
        except Exception as e:  # a reset or a timeout: what this test forbids
            got[k] = ("error", repr(e), None)
        finally:
            conn.close()

    threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    errors = [g for g in got if g is None or g[0] not in (200, 503)]
    assert not errors, errors[:3]
    for k, (status, retry_after, body) in enumerate(got):
        if status == 200:
            assert body[0]["embedding"][0] == pytest.approx(want[k % 16], abs=1e-5)
        else:
            assert int(retry_after) >= 1 and "server busy" in body["error"]["message"]
    busy = sum(g[0] == 503 for g in got)
    assert busy < n  # work got done
    if which == "guarded":
        assert busy > 0  # --max-queued 2 against 256 at once: the 503 path is taken


def test_lying_content_length_is_answered_within_the_read_timeout(guarded):
    _, url = guarded
    with socket.create_connection(hostport(url), timeout=READ_TIMEOUT + 5) as s:
        t0 = time.monotonic()
        s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000\r\n\r\n{\"text\": [\"hel")
        answer = b""
        while chunk := s.recv(65536):  # until the server closes
            answer += chunk
        elapsed = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 2s" in answer
    assert READ_TIMEOUT - 0.5 < elapsed < READ_TIMEOUT + 2.0


def test_300_stalled_connections_bounded_threads_and_all_closed(guarded, local):
    proc, url = guarded
    text = render_text(local.tokenizer, make_conversations(1, seed=22, max_words=40)[0])
    socks = []
    try:
        t0 = time.monotonic()
        for _ in range(300):  # slowloris: half a request line, then nothing
            s = socket.create_connection(hostport(url), timeout=10)
            s.sendall(b"POST /classify HT")
            socks.append(s)
        time.sleep(0.3)  # let the server accept them all
        assert threads_of(proc.pid) < THREAD_BOUND
        # a normal request still gets through, quickly
        t1 = time.monotonic()
        conn = http.client.HTTPConnection(*hostport(url), timeout=10)
        conn.request("POST", "/classify", json.dumps({"text": [text]}), {"Content-Type": "application/json"})
        r = conn.getresponse()
        out = json.loads(r.read())
        assert r.status == 200, out
        reward = out[0]["embedding"][0]
        assert r.status == 200 and reward == pytest.approx(local.score_texts([text])[0], abs=1e-5)
        assert time.monotonic() - t1 < 1.0
        conn.close()
        assert threads_of(proc.pid) < THREAD_BOUND
        # every stalled connection is closed once its headers are overdue (a 408 first is allowed)
        for s in socks:
            s.settimeout(max(0.1, t0 + READ_TIMEOUT + 5 - time.monotonic()))
            answer = b""
            try:
                while chunk := s.recv(4096):  # a socket.timeout here means the server left it open
                    answer += chunk
            except ConnectionResetError:
                pass
            assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer[:80]
        assert time.monotonic() - t0 < READ_TIMEOUT + 5
    finally:
        for s in socks:
            s.close()
