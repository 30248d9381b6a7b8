"""`btrm serve`: an HTTP reward server speaking SGLang's /classify and vLLM's /pooling contracts.

    POST /classify  {"model": ..., "text": [templated strings, BOS stripped] | str}
                    -> [{"embedding": [reward], "meta_info": {"id", "prompt_tokens"}}, ...] (one object for a str)
    POST /pooling   {"model": ..., "input": [str, ...] | str}
                    -> {"object": "list", "data": [{"index": i, "object": "pooling", "data": [reward]}], "usage": ...}
    GET  /health    200 once the model is loaded, 503 before
    GET  /v1/models, /get_model_info

HTTP runs on uvicorn (h11) + Starlette in one asyncio event loop: an open connection costs a socket, not a thread.
A request is read, validated, tokenized on ONE tokenizer thread, then queued; ONE model worker thread drains the
queue, packs the texts of every waiting request into token-budget rows and answers each request. Errors are JSON
`{"error": {"message", "type", "code"}}` with a 4xx status for client mistakes.

Limits that keep a fleet's load from taking the process down:
  - listen backlog --backlog (2048): bursts of connects queue in the kernel instead of being reset;
  - at most --max-connections open connections; a connection over the bound is answered 503 + Retry-After;
  - at most --max-queued requests admitted (read, waiting for the tokenizer or the model); more get 503 +
    Retry-After, after their body was read, so the client sees the answer rather than a reset;
  - --read-timeout: a request's headers must arrive within it of the connection opening (or of the first byte of a
    keep-alive request), its body within it of the headers; otherwise 408 and the connection is closed;
  - --keep-alive-timeout: an idle keep-alive connection is closed after it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import queue
import signal
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("btrm.serve")

DRAIN_ROWS = 8  # the worker takes up to this many rows' worth of queued tokens per round (latency bound)
DISCARD_CAP = 8 << 20  # bytes of a rejected body read and dropped so the client can see the error response
RETRY_AFTER = "1"  # seconds, in the Retry-After header of every 503


class ClientError(Exception):
    def __init__(self, status: int, message: str, close: bool = False):
        self.status, self.message, self.close = status, message, close
        super().__init__(message)


@dataclass
class Limits:
    max_body_bytes: int = 64 << 20
    max_texts: int = 4096
    max_batch_tokens: int = 16384
    request_timeout: float = 600.0  # seconds a request may wait for the model
    read_timeout: float = 30.0  # seconds for a request's headers, and again for its body
    max_queued: int = 1024  # requests admitted at once (waiting for the tokenizer or the model)
    max_connections: int = 4096  # open connections


# ----------------------------------------------------------------------------------------------------------------------
# Batching worker


@dataclass
class _Job:
    seqs: list[list[int]]
    done: threading.Event = field(default_factory=threading.Event)
    rewards: list[float] | None = None
    error: BaseException | None = None
    notify: Callable[[], None] | None = None  # called from the worker thread once done is set

    def finish(self) -> None:
        self.done.set()
        if self.notify is not None:
            self.notify()

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.seqs)


class Batcher:
    """One model worker thread: scores the token lists of all queued requests together.

    `submit` blocks the calling thread; `score` awaits the answer in an asyncio event loop."""

    def __init__(self, rm, max_batch_tokens: int, normalize: bool = False):
        self.rm = rm
        self.max_batch_tokens = max_batch_tokens
        self.normalize = normalize  # answer (r - mean) / std with the checkpoint's stored calibration
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

    async def score(self, seqs: list[list[int]], timeout: float) -> list[float]:
        if self.closed:
            raise ClientError(503, "server is shutting down")
        loop = asyncio.get_running_loop()
        answered = loop.create_future()

        def notify() -> None:  # worker thread -> event loop
            try:
                loop.call_soon_threadsafe(lambda: answered.done() or answered.set_result(None))
            except RuntimeError:  # the loop is already closed: nobody waits any more
                pass

        job = _Job(seqs, notify=notify)
        self.q.put(job)
        try:
            await asyncio.wait_for(answered, timeout)
        except asyncio.TimeoutError:
            raise ClientError(503, f"timed out after {timeout:.0f}s waiting for the model") from None
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
                job.finish()

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
            if self.normalize:
                rewards = self.rm.normalize(rewards)
        except BaseException as e:  # answer every waiting request, keep the worker alive
            log.exception("forward failed for %d texts", len(seqs))
            for j in jobs:
                j.error = e
                j.finish()
            return
        self.rounds += 1
        self.requests += len(jobs)
        k = 0
        for j in jobs:
            j.rewards = rewards[k:k + len(j.seqs)]
            k += len(j.seqs)
            j.finish()


# ----------------------------------------------------------------------------------------------------------------------
# HTTP


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


def _error_payload(status: int, message: str) -> dict:
    kind = "BadRequestError" if status < 500 else "ServiceUnavailableError" if status == 503 else "InternalError"
    return {"error": {"message": message, "type": kind, "code": status}}


def _headers(status: int, close: bool) -> dict[str, str]:
    return {**({"Retry-After": RETRY_AFTER} if status == 503 else {}), **({"Connection": "close"} if close else {})}


def _json(status: int, payload: Any, close: bool = False):
    from starlette.responses import Response

    # json.dumps as it is (not Starlette's JSONResponse, which refuses NaN): the contract the clients already parse
    return Response(json.dumps(payload), status, _headers(status, close), media_type="application/json")


class Service:
    """What the routes share: the limits, the model once loaded, the tokenizer thread and the admission count."""

    def __init__(self, limits: Limits, model_name: str):
        self.limits = limits
        self.model_name = model_name
        self.rm = None
        self.batcher: Batcher | None = None
        # one tokenizer thread: the event loop never blocks on tokenization, and the thread count stays fixed
        self.tokenizer = ThreadPoolExecutor(1, thread_name_prefix="btrm-tokenizer")
        self.queued = 0  # requests admitted and not yet answered (touched by the event loop only)

    def ready(self, rm, batcher: Batcher) -> None:
        self.rm, self.batcher = rm, batcher

    async def rewards(self, texts: list[str], key: str) -> tuple[list[float], list[int]]:
        """Rewards and token counts of templated strings; ClientError on empty / over-long texts."""
        from btrm.inference.scorer import OverlongError

        if self.batcher is None:
            raise ClientError(503, "model is still loading")
        try:
            seqs = await asyncio.get_running_loop().run_in_executor(self.tokenizer, self.rm.encode_texts, texts)
        except OverlongError as e:
            raise ClientError(400, f"{key}[{e.index}] has {e.length} tokens, more than the server's "
                                   f"max length {e.max_length}") from None
        for i, s in enumerate(seqs):
            if not s:
                raise ClientError(400, f"{key}[{i}] is empty (no tokens)")
        return await self.batcher.score(seqs, self.limits.request_timeout), [len(s) for s in seqs]


async def _read_body(request, limits: Limits) -> bytes:
    """The body, within --read-timeout of the headers; 411 / 413 / 408 (closing the connection) otherwise."""
    headers = request.headers
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise ClientError(411, "chunked bodies are not supported; send Content-Length", close=True)
    try:
        n = int(headers.get("content-length"))
        if n < 0:
            raise ValueError
    except (TypeError, ValueError):
        raise ClientError(411, "a valid Content-Length header is required", close=True) from None
    if n > limits.max_body_bytes:
        # read (a bounded part of) the rejected body so the client is not reset before it sees our answer
        await _drain(request.receive, min(n, DISCARD_CAP), timeout=2.0)
        raise ClientError(413, f"request body of {n} bytes exceeds the limit of {limits.max_body_bytes} bytes",
                          close=True)

    async def read() -> bytes:
        return b"".join([chunk async for chunk in request.stream()])

    try:
        return await asyncio.wait_for(read(), limits.read_timeout)
    except asyncio.TimeoutError:
        raise ClientError(408, f"the {n}-byte body announced by Content-Length did not arrive within "
                               f"{limits.read_timeout:g}s", close=True) from None


async def _drain(receive, left: int, timeout: float) -> None:
    async def drain():
        nonlocal left
        while left > 0:
            message = await receive()
            left -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    try:
        await asyncio.wait_for(drain(), timeout)
    except asyncio.TimeoutError:
        pass


async def _post(request, answer: Callable) -> Any:
    from starlette.requests import ClientDisconnect

    service: Service = request.app.state.service
    limits = service.limits
    try:
        raw = await _read_body(request, limits)
        if service.queued >= limits.max_queued:  # bounded work: a quick 503 the client can retry elsewhere
            raise ClientError(503, f"server busy: {service.queued} requests waiting (--max-queued "
                                   f"{limits.max_queued}); retry")
        service.queued += 1
        try:
            try:
                body = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ClientError(400, f"invalid JSON body: {e}") from None
            return _json(200, await answer(service, body))
        finally:
            service.queued -= 1
    except ClientError as e:
        return _json(e.status, _error_payload(e.status, e.message), close=e.close)
    except ClientDisconnect:  # nobody left to answer
        return _json(400, _error_payload(400, "client disconnected"), close=True)
    except Exception as e:  # a model failure: tell the client, keep serving
        log.exception("request failed")
        return _json(500, _error_payload(500, f"{type(e).__name__}: {e}"))


async def _classify(service: Service, body: Any) -> Any:
    texts, single = _texts(body, "text", service.limits.max_texts)
    rewards, ntok = await service.rewards(texts, "text")
    out = [{"embedding": [r], "meta_info": {"id": uuid.uuid4().hex, "prompt_tokens": n}}
           for r, n in zip(rewards, ntok)]
    return out[0] if single else out  # SGLang answers a single string with a single object


async def _pooling(service: Service, body: Any) -> Any:
    texts, _ = _texts(body, "input", service.limits.max_texts)
    rewards, ntok = await service.rewards(texts, "input")
    total = sum(ntok)
    return {
        "id": f"pool-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
        "model": body.get("model") or service.model_name,
        "data": [{"index": i, "object": "pooling", "data": [r]} for i, r in enumerate(rewards)],
        "usage": {"prompt_tokens": total, "total_tokens": total, "completion_tokens": 0},
    }


def build_app(service: Service):
    """The Starlette app: the routes of the module docstring, JSON errors for everything else."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    async def classify(request):
        return await _post(request, _classify)

    async def pooling(request):
        return await _post(request, _pooling)

    async def health(request):
        b = service.batcher
        return _json(200, {"status": "ok", "requests": b.requests, "rounds": b.rounds,
                           "tokens": dict(b.rm.token_counts) if b.rm is not None else {}}) if b is not None else \
            _json(503, {"status": "loading"})

    async def models(request):
        return _json(200, {"object": "list", "data": [{"id": service.model_name, "object": "model",
                                                       "owned_by": "btrm"}]})

    async def model_info(request):
        return _json(200, {"model_path": service.model_name, "is_generation": False})

    async def no_route(request):  # an unread body is read and dropped by uvicorn after the answer
        hint = "; use /classify or /pooling" if request.method == "POST" else ""
        return _json(404, _error_payload(404, f"no route {request.method} {request.url.path}{hint}"))

    app = Starlette(routes=[
        Route("/classify", classify, methods=["POST"]),
        Route("/pooling", pooling, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/get_model_info", model_info, methods=["GET"]),
        Route("/{path:path}", no_route, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
    ])
    app.state.service = service
    return app


def _over_connection_limit(max_connections: int):
    """An ASGI app answering 503 + Retry-After (after reading the body) on connections over the bound."""
    message = json.dumps(_error_payload(503, f"server busy: more than {max_connections} open connections "
                                             "(--max-connections); retry")).encode()

    async def app(scope, receive, send) -> None:
        await _drain(receive, DISCARD_CAP, timeout=2.0)
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(message)).encode()),
            (b"retry-after", RETRY_AFTER.encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": message})

    return app


def _protocol(limits: Limits):
    """uvicorn's h11 protocol plus what it lacks: a read timeout for request headers, a bound on connections."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    busy = _over_connection_limit(limits.max_connections)

    class Protocol(H11Protocol):
        _timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            # asyncio sets TCP_NODELAY only on sockets made with proto=IPPROTO_TCP, not on ours (proto 0): without
            # it, Nagle + delayed ACK add ~40 ms to every answer (measured: 1-client p50 44 ms instead of ~2 ms)
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if len(self.connections) > limits.max_connections:
                self.app = busy  # this connection's requests get the 503
            self._arm()  # the first request's headers are due within --read-timeout

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # first byte of a keep-alive connection's next request
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # a request's headers are complete: the app's body timeout takes over
                self._disarm()

        def _arm(self) -> None:
            self._disarm()
            self._timer = self.loop.call_later(limits.read_timeout, self._timed_out)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _timed_out(self) -> None:
            self._timer = None
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return
            if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:  # half a request came in
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.close()

    return Protocol


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)  # connects queue in the kernel from now on, also while the model loads
    return sock


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint dir or Hub id (one-label *ForSequenceClassification)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=8000, help="port (0 = any free port; the URL is printed)")
    p.add_argument("--served-model-name", default=None, help="name reported by /v1/models (default: --model)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32")
    from btrm import attention

    p.add_argument("--attn-implementation", default="auto", choices=attention.CHOICES, help=attention.help_text())
    p.add_argument("--max-length", type=int, default=None,
                   help="longest text in tokens (default: the model's usable length, min(max_position_embeddings, "
                        "16384); the training length is shown, not used)")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="tokens per packed forward")
    p.add_argument("--max-texts", type=int, default=4096, help="most texts in one request")
    p.add_argument("--max-body-bytes", type=int, default=64 << 20, help="largest request body")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may wait for the model")
    p.add_argument("--normalize", action="store_true",
                   help="answer (r - mean) / std with the checkpoint's stored calibration (default: raw rewards)")
    p.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds for a request's headers to arrive, and again for its body (else 408 and close)")
    p.add_argument("--keep-alive-timeout", type=float, default=5.0, help="seconds an idle connection stays open")
    p.add_argument("--max-queued", type=int, default=1024,
                   help="requests admitted at once; more get 503 with Retry-After")
    p.add_argument("--max-connections", type=int, default=4096,
                   help="open connections; requests on more get 503 with Retry-After")
    p.add_argument("--backlog", type=int, default=2048, help="listen backlog (connects waiting to be accepted)")
    p.add_argument("--no-share-prompt", action="store_true",
                   help="encode every text whole (default: a prefix several queued texts share is encoded once)")
    p.add_argument("--trust-remote-code", action="store_true")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    limits = Limits(args.max_body_bytes, args.max_texts, args.max_batch_tokens, args.request_timeout,
                    args.read_timeout, args.max_queued, args.max_connections)
    service = Service(limits, args.served_model_name or str(args.model))
    sock = _listen(args.host, args.port, args.backlog)
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    server = uvicorn.Server(uvicorn.Config(
        build_app(service), http=_protocol(limits), lifespan="off", log_config=None, access_log=False,
        server_header=False, backlog=args.backlog, timeout_keep_alive=args.keep_alive_timeout,
        timeout_graceful_shutdown=30))
    # uvicorn handles SIGINT/SIGTERM while it serves and raises the signal again once it has shut down: this handler
    # then only asks for the exit that is already under way (exit status 0), and covers a signal before it starts
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    print(f"btrm serve: listening on {url} (loading {args.model})", flush=True)
    failed: list[BaseException] = []
    loader = threading.Thread(target=_load, args=(args, service, url, server, failed), name="btrm-load", daemon=True)
    loader.start()
    try:
        server.run(sockets=[sock])
        print("btrm serve: shutting down", flush=True)
    finally:
        sock.close()
        if service.batcher is not None:
            service.batcher.stop()
        service.tokenizer.shutdown(wait=False, cancel_futures=True)
    if failed:
        raise failed[0]
    return 0


def _load(args: argparse.Namespace, service: Service, url: str, server, failed: list) -> None:
    """Load the model while the server already answers /health with 503; stop the server if loading fails."""
    from btrm.inference.scorer import load_in_owned_process

    try:
        # Texts arrive templated: the chat template (and its kwargs) is the client's business.
        rm = load_in_owned_process(args.model, device=args.device, dtype=args.dtype,
                                   attn_implementation=args.attn_implementation, max_length=args.max_length,
                                   trust_remote_code=args.trust_remote_code, batch_tokens=args.max_batch_tokens,
                                   share_prompt=not args.no_share_prompt)
        if args.normalize:
            rm.normalize([])  # no stored calibration: stop with its one-line error before serving
        service.ready(rm, Batcher(rm, args.max_batch_tokens, args.normalize).start())
        print(f"btrm serve: ready at {url} (POST /classify, POST /pooling, GET /health; {rm.length_note()}"
              + (f"; normalized rewards, mean {rm.calibration['mean']:.6g} std {rm.calibration['std']:.6g}"
                 if args.normalize else "") + ")", flush=True)
    except BaseException as e:
        failed.append(e)
        server.should_exit = True
