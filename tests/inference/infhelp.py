"""Helpers shared by the inference tests: synthetic conversations and the seed's plain-transformers reward."""

from __future__ import annotations

import math
import random

import torch

WORDS = ("the ocean is calm today and many people say music helps when you read a book about trains and rain "
         "what is two plus three please help me with my homework of course here is a short answer").split()


def make_conversations(n: int, seed: int = 0, max_words: int = 200) -> list[list[dict]]:
    """Mixed lengths (log-uniform word counts), some multi-turn and some with a system prompt."""
    rng = random.Random(seed)

    def text():
        k = int(round(2 ** rng.uniform(0, math.log2(max_words))))
        return " ".join(rng.choice(WORDS) for _ in range(k))

    convs = []
    for i in range(n):
        conv = [{"role": "system", "content": text()}] if i % 5 == 0 else []
        for _ in range(1 + (i % 3 == 0)):
            conv += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        convs.append(conv)
    return convs


def hf_reward(model, tokenizer, conversation) -> float:
    """The seed's recipe, written out with plain transformers (independent of btrm.render)."""
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    if tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token):
        text = text[len(tokenizer.bos_token):]
    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits[0][0].item()


# ----------------------------------------------------------------------------------------------------------------------
# `btrm serve` subprocesses


# limits the request-validation tests rely on
SERVER_ARGS = ("--max-length", "512", "--max-texts", "64", "--max-body-bytes", "200000", "--max-batch-tokens", "1024")


def start_server(model_dir, *extra: str):
    """Popen a `btrm serve` on a free loopback port; returns (process, base url) without waiting for the model."""
    import os
    import subprocess
    import sys

    # one intra-op thread: several servers and the test share a few cores, and spinning OpenMP threads on an
    # oversubscribed CPU turn a 2 ms forward into hundreds of ms
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "btrm.cli", "serve", "--model", str(model_dir), "--port", "0",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = proc.stdout.readline()  # "btrm serve: listening on http://127.0.0.1:PORT (loading ...)"
    if "listening on " not in line:
        proc.kill()
        raise RuntimeError(f"btrm serve did not start: {line!r}")
    return proc, line.split("listening on ")[1].split()[0]


def wait_healthy(proc, url: str, timeout: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"btrm serve exited with {proc.returncode}")
        try:
            if get_json(url + "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not healthy after {timeout}s")


def get_json(url: str):
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post(url: str, body, raw: bool = False):
    """(status, parsed JSON answer); `raw` sends body bytes as they are."""
    import json
    import urllib.error
    import urllib.request

    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def stop_server(proc, sig=None) -> int:
    import signal

    if proc.poll() is None:
        proc.send_signal(sig or signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except Exception:
        proc.kill()
        return proc.wait()
