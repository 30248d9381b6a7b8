"""Fleet client: score conversations on several SGLang (/classify) or vLLM (/pooling) servers.

    scorer = RemoteScorer(["http://127.0.0.1:8000", "http://127.0.0.1:8001"], tokenizer="Skywork/...-8B")
    rewards = scorer.score(conversations)

Conversations are rendered like the seed (chat template, leading BOS string stripped: `btrm.render.render_text`),
cut into batches, and the batches are sent to the servers concurrently. A failed batch is retried with exponential
backoff on the next server (servers that just failed are tried last). The result is complete and in input order,
or a RemoteScoringError is raised: never a partial list or None placeholders.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any, Literal, Sequence

from btrm.errors import UserError
from btrm.render import render_text

ROUTES = {"sglang": "/classify", "vllm": "/pooling"}
RETRYABLE_STATUS = {408, 429}  # and every 5xx
DOWN_FOR = 10.0  # seconds a server that failed is tried after the others


class RemoteScoringError(RuntimeError, UserError):
    """A batch failed for good (after retries, or with a client error that retrying cannot fix)."""


class _Fatal(Exception):
    """Not worth retrying: the request itself is wrong (4xx) or the answer has the wrong shape."""


class RemoteScorer:
    def __init__(self, urls: str | Sequence[str], backend: Literal["sglang", "vllm"] = "sglang", tokenizer=None,
                 model: str | None = None, chat_template_kwargs: dict[str, Any] | None = None, batch_size: int = 64,
                 max_retries: int = 4, timeout: float = 600.0, backoff: float = 0.5, max_backoff: float = 30.0,
                 concurrency: int = 4):
        """
        urls: server base URLs ("http://host:port"; a trailing /classify or /pooling is dropped).
        tokenizer: a path / Hub id or a loaded tokenizer; needed by `score` (not by `score_texts`).
        model: the "model" field sent with each request (omitted when None; vLLM then uses its only model).
        max_retries: extra attempts per batch; attempt k waits backoff * 2**(k-1) seconds (jittered, capped).
        timeout: seconds per HTTP request.  concurrency: requests in flight per server.
        """
        if backend not in ROUTES:
            raise ValueError(f"backend={backend!r}: expected one of {sorted(ROUTES)}")
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("no server URLs")
        self.urls = [self._base(u) for u in urls]
        self.backend = backend
        self.route = ROUTES[backend]
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer = tokenizer
        self.model = model
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.batch_size = int(batch_size)
        self.max_retries = int(max_retries)
        self.timeout = float(timeout)
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.concurrency = int(concurrency)
        self._down_until: dict[str, float] = {}

    @staticmethod
    def _base(url: str) -> str:
        url = url.rstrip("/")
        for route in ROUTES.values():
            if url.endswith(route):
                url = url[: -len(route)]
        return url

    # ------------------------------------------------------------------------------------------------------------------
    # Public API

    def render(self, conversations: Sequence[Sequence[dict]]) -> list[str]:
        if self.tokenizer is None:
            raise ValueError("RemoteScorer needs tokenizer= to render conversations (or call score_texts)")
        return [render_text(self.tokenizer, c, self.chat_template_kwargs) for c in conversations]

    def score(self, conversations: Sequence[Sequence[dict]], progress: bool | None = None) -> list[float]:
        """One reward per conversation, in input order."""
        return self.score_texts(self.render(conversations), progress)

    def score_pairs(self, chosen, rejected, progress: bool | None = None):
        from btrm.inference.scorer import pair_scores

        if len(chosen) != len(rejected):
            raise ValueError(f"{len(chosen)} chosen vs {len(rejected)} rejected conversations")
        r = self.score(list(chosen) + list(rejected), progress)
        return pair_scores(r[:len(chosen)], r[len(chosen):])

    def score_texts(self, texts: Sequence[str], progress: bool | None = None) -> list[float]:
        """Rewards of templated strings (BOS stripped), in input order; RemoteScoringError if any batch fails."""
        texts = list(texts)
        starts = list(range(0, len(texts), self.batch_size))
        if not starts:
            return []
        out: list[float] = [0.0] * len(texts)
        abort = threading.Event()
        bar = None
        if (len(texts) > 256) if progress is None else progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc="scoring (remote)", unit="conv")
        workers = min(len(starts), self.concurrency * len(self.urls))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="btrm-remote")
        try:
            futures = {pool.submit(self._batch, k, texts[s:s + self.batch_size], abort): s
                       for k, s in enumerate(starts)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in done:
                    if f.exception() is not None:
                        abort.set()
                        raise f.exception()
                    s = futures[f]
                    rewards = f.result()
                    out[s:s + len(rewards)] = rewards
                    if bar is not None:
                        bar.update(len(rewards))
        finally:
            abort.set()  # queued batches are cancelled; running ones stop after their current request
            pool.shutdown(wait=False, cancel_futures=True)
            if bar is not None:
                bar.close()
        return out

    # ------------------------------------------------------------------------------------------------------------------
    # One batch: pick a server, retry elsewhere with backoff

    def _order(self, k: int) -> list[str]:
        """Servers for batch k: round robin, healthy first."""
        n, now = len(self.urls), time.monotonic()
        rot = [self.urls[(k + j) % n] for j in range(n)]
        return sorted(rot, key=lambda u: self._down_until.get(u, 0.0) > now)  # stable: keeps the rotation

    def _batch(self, k: int, texts: list[str], abort: threading.Event) -> list[float]:
        tried: list[str] = []
        errors: list[str] = []
        for attempt in range(self.max_retries + 1):
            if abort.is_set():
                raise RemoteScoringError("aborted: another batch failed")
            if attempt:
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                if abort.wait(delay):
                    raise RemoteScoringError("aborted: another batch failed")
            order = self._order(k)
            url = next((u for u in order if u not in tried), order[0])
            tried.append(url)
            try:
                rewards = self._parse(self._post(url, texts), len(texts))
            except _Fatal as e:
                raise RemoteScoringError(f"batch {k} ({len(texts)} texts) failed on {url}: {e}") from None
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
                self._down_until[url] = time.monotonic() + DOWN_FOR
                errors.append(f"{url}: {type(e).__name__}: {e}")
                continue
            self._down_until.pop(url, None)
            return rewards
        raise RemoteScoringError(f"batch {k} ({len(texts)} texts, first index {k * self.batch_size}) failed after "
                                 f"{len(tried)} attempts: " + "; ".join(errors))

    def _post(self, base: str, texts: list[str]) -> Any:
        key = "text" if self.backend == "sglang" else "input"
        payload: dict[str, Any] = {key: texts}
        if self.model is not None:
            payload["model"] = self.model
        req = urllib.request.Request(base + self.route, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            if 400 <= e.code < 500 and e.code not in RETRYABLE_STATUS:
                raise _Fatal(f"HTTP {e.code}: {detail}") from None
            raise urllib.error.URLError(f"HTTP {e.code}: {detail}") from None

    def _parse(self, body: Any, n: int) -> list[float]:
        if self.backend == "sglang":
            items = body
            if not isinstance(items, list) or len(items) != n:
                raise _Fatal(f"expected a list of {n} results, got {_describe(items)}")
            values = [it.get("embedding") if isinstance(it, dict) else None for it in items]
        else:
            data = body.get("data") if isinstance(body, dict) else None
            if not isinstance(data, list) or len(data) != n:
                raise _Fatal(f"expected 'data' with {n} results, got {_describe(data)}")
            by_index = {it.get("index"): it.get("data") for it in data if isinstance(it, dict)}
            if sorted(by_index, key=str) != sorted(range(n), key=str):
                raise _Fatal(f"result indices are not 0..{n - 1}")
            values = [by_index[i] for i in range(n)]
        out = []
        for i, v in enumerate(values):
            # one-label reward models give exactly one number per text
            if not isinstance(v, list) or len(v) != 1 or isinstance(v[0], bool) or not isinstance(v[0], (int, float)):
                raise _Fatal(f"result {i}: expected [reward], got {_describe(v)} (is this a one-label reward model "
                             f"served for sequence classification?)")
            out.append(float(v[0]))
        return out


def _describe(x: Any) -> str:
    s = json.dumps(x)[:200] if not isinstance(x, (bytes, bytearray)) else repr(x[:200])
    return f"{type(x).__name__} {s}"


def detect_backend(url: str, timeout: float = 30.0) -> str:
    """"sglang" when the server answers SGLang's GET /get_model_info (SGLang, `btrm serve`), else "vllm" when it
    answers GET /v1/models (vLLM has no /get_model_info); RemoteScoringError when it answers neither."""
    base = RemoteScorer._base(url)
    for route, backend in (("/get_model_info", "sglang"), ("/v1/models", "vllm")):
        try:
            with urllib.request.urlopen(base + route, timeout=timeout) as resp:
                if resp.status == 200:
                    return backend
        except (urllib.error.URLError, http.client.HTTPException, OSError):
            continue
    raise RemoteScoringError(f"{base}: neither GET /get_model_info (SGLang, btrm serve) nor GET /v1/models (vLLM) "
                             "answered; is the server up? (or pass --backend)")


class _Rendered(list):
    """Token ids that keep the text they were tokenized from: the text is what a server is sent."""

    text: str


def remote_reward_model(urls: Sequence[str], checkpoint, backend: str = "auto", max_length: int | None = None,
                        chat_template_kwargs: dict[str, Any] | None = None, trust_remote_code: bool = False,
                        **scorer_options):
    """A `RewardModel` whose forward runs on servers: rendered, length-checked and tokenized by the checkpoint's
    tokenizer exactly as local scoring does (its btrm_meta.json template kwargs unless given, one BOS stripped);
    the servers get the templated texts. Over-long conversations are errors (OverlongError), never cut: a server
    tokenizes what it is sent, so truncation='left' is local-only."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from btrm import calibration
    from btrm.inference.scorer import OverlongError, RewardModel, read_meta, usable_length
    from btrm.render import tokenize_texts

    class RemoteRewardModel(RewardModel):
        def __init__(self):  # RewardModel's encoding, length and reporting; no weights
            self.model = None
            self.tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
            config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
            meta = read_meta(checkpoint)
            self.chat_template_kwargs = dict(meta.get("chat_template_kwargs") or {} if chat_template_kwargs is None
                                             else chat_template_kwargs)
            self.max_length = int(max_length or usable_length(config))
            self.length_rule = "as given" if max_length else "min(max_position_embeddings, 16384)"
            self.train_max_length = meta.get("max_length")
            self.calibration, self.name = calibration.load(meta, config), str(checkpoint)  # for normalize=True
            self.token_counts = {"forward": 0, "sequences": 0}  # the servers' forwards are not ours to count
            self.truncation, self.batch_tokens = "error", 0
            self.device = torch.device("cpu")  # the client only renders and tokenizes
            chosen = backend if backend != "auto" else detect_backend(list(urls)[0])
            self.scorer = RemoteScorer(urls, backend=chosen, tokenizer=self.tokenizer,
                                       chat_template_kwargs=self.chat_template_kwargs, **scorer_options)

        def encode_each(self, conversations):
            texts = [render_text(self.tokenizer, c, self.chat_template_kwargs) for c in conversations]
            out = []
            for i, (text, ids) in enumerate(zip(texts, tokenize_texts(self.tokenizer, texts))):
                if len(ids) > self.max_length:
                    out.append(OverlongError(i, len(ids), self.max_length, "servers get whole conversations: "
                                             "prompts are cut only when scoring locally"))
                else:
                    out.append(_Rendered(ids))
                    out[-1].text = text
            return out

        def score_ids(self, seqs, batch_tokens=None, progress=None, normalize=False):
            if normalize and not self.calibration:
                self.normalize([])  # fail before any request
            rewards = self.scorer.score_texts([s.text for s in seqs], progress)
            return self.normalize(rewards) if normalize else rewards

        def token_report(self, since=None) -> str:
            return "forward passes ran on the servers (their token counts are theirs)"

        def length_note(self) -> str:
            return f"{super().length_note()}; scored by {len(self.scorer.urls)} {self.scorer.backend} server(s)"

        def __repr__(self) -> str:
            return f"RemoteRewardModel({self.scorer.urls}, backend={self.scorer.backend}, max_length={self.max_length})"

    return RemoteRewardModel()
