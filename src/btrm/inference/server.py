"""`btrm serve`: an HTTP reward server speaking SGLang's /classify and vLLM's /pooling contracts.

    POST /classify  {"model": ..., "text": [templated strings, BOS stripped] | str}
                    -> [{"embedding": [reward], "meta_info": {"id", "prompt_tokens"}}, ...] (one object for a str)
    POST /pooling   {"model": ..., "input": [str, ...] | str}
                    -> {"object": "list", "data": [{"index": i, "object": "pooling", "data": [reward]}], "usage": ...}
    GET  /health    200 once the model is loaded, 503 before
    GET  /v1/models, /get_model_info

Handler threads parse, validate and tokenize a request, then queue it; ONE model worker thread drains the queue,
packs the texts of every waiting request into token-budget rows and answers each request. Errors are JSON
`{"error": {"message", "type", "code"}}` with a 4xx status for client mistakes.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("btrm.serve")

DRAIN_ROWS = 8  # the worker takes up to this many rows' worth of queued tokens per round (latency bound)
DISCARD_CAP = 8 << 20  # bytes of a rejected body read and dropped so the client can see the error response


class ClientError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message
        super().__init__(message)


@dataclass
class Limits:
    max_body_bytes: int = 64 << 20
    max_texts: int = 4096
    max_batch_tokens: int = 16384
    request_timeout: float = 600.0


# ----------------------------------------------------------------------------------------------------------------------
# Batching worker


@dataclass
class _Job:
    seqs: list[list[int]]
    done: threading.Event = field(default_factory=threading.Event)
    rewards: list[float] | None = None
    error: BaseException | None = None

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.seqs)


class Batcher:
    """One model worker thread: scores the token lists of all queued requests together."""

    def __init__(self, rm, max_batch_tokens: int):
        self.rm = rm
        self.max_batch_tokens = max_batch_tokens
        self.q: queue.Queue[_Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="btrm-model-worker", daemon=True)
        self.closed = False
        self.requests = 0  # requests answered
        self.rounds = 0  # worker rounds (each packs every request waiting at that moment)

    def start(self) -> "Batcher":
        self.thread.start()
        return self

    def submit(self, seqs: list[list[int]], timeout: float) -> list[float]:
        if self.closed:
            raise ClientError(503, "server is shutting down")
        job = _Job(seqs)
        self.q.put(job)
        if not job.done.wait(timeout):
            raise ClientError(503, f"timed out after {timeout:.0f}s waiting for the model")
        if job.error is not None:
            raise job.error
        return job.rewards  # type: ignore[return-value]

    def stop(self) -> None:
        self.closed = True
        self.q.put(None)
        self.thread.join(timeout=30)
        while True:  # anything still queued gets an answer, not a hang
            try:
                job = self.q.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.error = ClientError(503, "server is shutting down")
                job.done.set()

    def _loop(self) -> None:
        while True:
            job = self.q.get()
            if job is None:
                return
            jobs, tokens, stop = [job], job.tokens, False
            while tokens < DRAIN_ROWS * self.max_batch_tokens:
                try:
                    nxt = self.q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                jobs.append(nxt)
                tokens += nxt.tokens
            self._run(jobs)
            if stop:
                return

    def _run(self, jobs: list[_Job]) -> None:
        seqs = [s for j in jobs for s in j.seqs]
        try:
            rewards = self.rm.score_ids(seqs, batch_tokens=self.max_batch_tokens, progress=False)
        except BaseException as e:  # answer every waiting request, keep the worker alive
            log.exception("forward failed for %d texts", len(seqs))
            for j in jobs:
                j.error = e
                j.done.set()
            return
        self.rounds += 1
        self.requests += len(jobs)
        k = 0
        for j in jobs:
            j.rewards = rewards[k:k + len(j.seqs)]
            k += len(j.seqs)
            j.done.set()


# ----------------------------------------------------------------------------------------------------------------------
# HTTP


class RewardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, limits: Limits, model_name: str):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), Handler)
        self.limits = limits
        self.model_name = model_name
        self.rm = None
        self.batcher: Batcher | None = None
        self.tokenize_lock = threading.Lock()  # one tokenizer shared by the handler threads

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def ready(self, rm, batcher: Batcher) -> None:
        self.rm, self.batcher = rm, batcher

    def rewards(self, texts: list[str], key: str) -> tuple[list[float], list[int]]:
        """Rewards and token counts of templated strings; ClientError on empty / over-long texts."""
        from btrm.inference.scorer import OverlongError

        if self.batcher is None:
            raise ClientError(503, "model is still loading")
        with self.tokenize_lock:
            try:
                seqs = self.rm.encode_texts(texts)
            except OverlongError as e:
                raise ClientError(400, f"{key}[{e.index}] has {e.length} tokens, more than the server's "
                                       f"max length {e.max_length}") from None
        for i, s in enumerate(seqs):
            if not s:
                raise ClientError(400, f"{key}[{i}] is empty (no tokens)")
        return self.batcher.submit(seqs, self.limits.request_timeout), [len(s) for s in seqs]


def _texts(body: Any, key: str, max_texts: int) -> tuple[list[str], bool]:
    """The request's texts and whether a single string was sent."""
    if not isinstance(body, dict):
        raise ClientError(400, f"request body must be a JSON object, got {type(body).__name__}")
    if "model" in body and body["model"] is not None and not isinstance(body["model"], str):
        raise ClientError(400, "'model' must be a string")
    if key not in body:
        raise ClientError(400, f"missing field '{key}' (a string or a list of strings)")
    value = body[key]
    single = isinstance(value, str)
    texts = [value] if single else value
    if not isinstance(texts, list):
        raise ClientError(400, f"'{key}' must be a string or a list of strings, got {type(value).__name__}")
    if not texts:
        raise ClientError(400, f"'{key}' is an empty list")
    if len(texts) > max_texts:
        raise ClientError(413, f"{len(texts)} texts in one request; the server accepts at most {max_texts}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ClientError(400, f"'{key}[{i}]' must be a string, got {type(t).__name__}")
    return texts, single


class Handler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"  # keep-alive for pooled clients; every response carries Content-Length
    server_version = "btrm-serve"

    def setup(self):
        super().setup()
        # headers and body go out as two writes: without NODELAY, Nagle + delayed ACK add ~40 ms per response
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args):  # access log at debug level, not on stderr per request
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        kind = "BadRequestError" if status < 500 else "ServiceUnavailableError" if status == 503 else "InternalError"
        self._send(status, {"error": {"message": message, "type": kind, "code": status}})

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        loaded = self.server.batcher is not None
        if path == "/health":
            b = self.server.batcher
            self._send(200 if loaded else 503, {"status": "ok", "requests": b.requests, "rounds": b.rounds,
                                                "tokens": dict(b.rm.token_counts)} if loaded else {"status": "loading"})
        elif path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                         "owned_by": "btrm"}]})
        elif path == "/get_model_info":
            self._send(200, {"model_path": self.server.model_name, "is_generation": False})
        else:
            self._error(404, f"no route GET {path}")

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        try:
            if path not in ("/classify", "/pooling"):
                self.close_connection = True  # the body stays unread
                raise ClientError(404, f"no route POST {path}; use /classify or /pooling")
            body = self._read_json()
            if path == "/classify":
                self._classify(body)
            else:
                self._pooling(body)
        except ClientError as e:
            self._error(e.status, e.message)
        except Exception as e:  # a model failure: tell the client, keep serving
            log.exception("request failed")
            self._error(500, f"{type(e).__name__}: {e}")

    def _read_json(self) -> Any:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise ClientError(411, "chunked bodies are not supported; send Content-Length")
        raw = self.headers.get("Content-Length")
        try:
            n = int(raw)
            if n < 0:
                raise ValueError
        except (TypeError, ValueError):
            self.close_connection = True
            raise ClientError(411, "a valid Content-Length header is required") from None
        limit = self.server.limits.max_body_bytes
        if n > limit:
            self._discard(n)
            raise ClientError(413, f"request body of {n} bytes exceeds the limit of {limit} bytes")
        data = self.rfile.read(n)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ClientError(400, f"invalid JSON body: {e}") from None

    def _discard(self, n: int) -> None:
        """Read (a bounded part of) a rejected body so the client is not reset before it sees our answer."""
        self.close_connection = True
        self.connection.settimeout(2.0)
        left = min(n, DISCARD_CAP)
        try:
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _classify(self, body: Any) -> None:
        texts, single = _texts(body, "text", self.server.limits.max_texts)
        rewards, ntok = self.server.rewards(texts, "text")
        out = [{"embedding": [r], "meta_info": {"id": uuid.uuid4().hex, "prompt_tokens": n}}
               for r, n in zip(rewards, ntok)]
        self._send(200, out[0] if single else out)  # SGLang answers a single string with a single object

    def _pooling(self, body: Any) -> None:
        texts, _ = _texts(body, "input", self.server.limits.max_texts)
        rewards, ntok = self.server.rewards(texts, "input")
        total = sum(ntok)
        self._send(200, {
            "id": f"pool-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
            "model": body.get("model") or self.server.model_name,
            "data": [{"index": i, "object": "pooling", "data": [r]} for i, r in enumerate(rewards)],
            "usage": {"prompt_tokens": total, "total_tokens": total, "completion_tokens": 0},
        })


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint dir or Hub id (one-label *ForSequenceClassification)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=8000, help="port (0 = any free port; the URL is printed)")
    p.add_argument("--served-model-name", default=None, help="name reported by /v1/models (default: --model)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32")
    p.add_argument("--attn-implementation", default="auto", help="auto, segment, varlen, flash_attention_2, sdpa")
    p.add_argument("--max-length", type=int, default=None, help="longest text in tokens (default: checkpoint)")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="tokens per packed forward")
    p.add_argument("--max-texts", type=int, default=4096, help="most texts in one request")
    p.add_argument("--max-body-bytes", type=int, default=64 << 20, help="largest request body")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may wait for the model")
    p.add_argument("--no-share-prompt", action="store_true",
                   help="encode every text whole (default: a prefix several queued texts share is encoded once)")
    p.add_argument("--trust-remote-code", action="store_true")


def run(args: argparse.Namespace) -> int:
    from btrm.cpu import retain_freed_memory
    from btrm.inference.scorer import RewardModel

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    limits = Limits(args.max_body_bytes, args.max_texts, args.max_batch_tokens, args.request_timeout)
    httpd = RewardServer(args.host, args.port, limits, args.served_model_name or str(args.model))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    serving = threading.Thread(target=httpd.serve_forever, name="btrm-http", daemon=True)
    serving.start()
    print(f"btrm serve: listening on {httpd.url} (loading {args.model})", flush=True)
    batcher = None
    try:
        # Texts arrive templated: the chat template (and its kwargs) is the client's business.
        rm = RewardModel.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                         attn_implementation=args.attn_implementation, max_length=args.max_length,
                                         trust_remote_code=args.trust_remote_code, batch_tokens=args.max_batch_tokens,
                                         share_prompt=not args.no_share_prompt)
        retain_freed_memory(rm.device)  # CPU: no page-faulting every batch's activations in again (btrm.cpu)
        batcher = Batcher(rm, args.max_batch_tokens).start()
        httpd.ready(rm, batcher)
        print(f"btrm serve: ready at {httpd.url} (POST /classify, POST /pooling, GET /health; "
              f"max length {rm.max_length} tokens)", flush=True)
        while not stop.wait(0.5):
            pass
        print("btrm serve: shutting down", flush=True)
    finally:
        httpd.shutdown()
        httpd.server_close()
        if batcher is not None:
            batcher.stop()
    return 0
