"""`btrm serve` under load: requests/s and p50/p99 latency at 1, 16 and 256 concurrent clients.

    python scripts/bench_serve.py [--clients 1,16,256 --seconds 8 --texts 1 --hidden 64 --layers 2 --markdown]
    python scripts/bench_serve.py --url http://127.0.0.1:8000   # an already running server

Starts `btrm serve` on a tiny random-init Llama reward model on a free loopback port (unless --url is given), then
for each client count runs that many client threads for --seconds: each holds one keep-alive connection and sends
POST /classify with --texts short templated texts, one request after the other. A connection the server resets or
closes is counted as an error and reopened. Latency is per request (send to full answer), over the answered ones;
requests/s counts 200 answers only. 503s (the server's "busy, retry after") are counted apart. Server CPU ms per
request (all its threads, from /proc, over the answered requests) is the figure least moved by other load.

The clients run on the same machine as the server (Python threads), so at 256 clients part of the time is the
client's own; compare servers with the same script on the same machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

WORDS = "the ocean is calm today and many people say music helps when you read a book about trains".split()


def build_model(work: str, hidden: int, layers: int) -> str:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from btrm.modeling import ensure_pad_token
    from btrm.tiny import build_tiny_model

    base = build_tiny_model("llama3", os.path.join(work, "base"), hidden_size=hidden, num_layers=layers, num_heads=4,
                            num_kv_heads=2, intermediate_size=2 * hidden)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, pad_token_id=ensure_pad_token(tok))
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    out = os.path.join(work, "rm")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def start_server(model: str, extra: list[str], threads: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "btrm.cli", "serve", "--model", model, "--port", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    line = proc.stdout.readline()
    if "listening on " not in line:
        proc.kill()
        raise SystemExit(f"btrm serve did not start: {line!r}")
    url = line.split("listening on ")[1].split()[0]
    for line in proc.stdout:  # "ready at ..." once the model is loaded
        if "ready at" in line:
            return proc, url
    raise SystemExit(f"btrm serve exited with {proc.wait()}")


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc; nan elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, TypeError, ValueError):
        return float("nan")


def run_clients(host: str, port: int, body: bytes, clients: int, seconds: float, pid: int | None) -> dict:
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    busy = [0] * clients
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client(k: int) -> None:
        conn = None
        start.wait()
        while time.monotonic() < deadline[0]:
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, port, timeout=60)
                t0 = time.perf_counter()
                conn.request("POST", "/classify", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    lat[k].append(time.perf_counter() - t0)
                elif resp.status == 503:
                    busy[k] += 1
                    time.sleep(float(resp.getheader("Retry-After", "1")))
                else:
                    errors[k] += 1
                if resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                errors[k] += 1
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.01)
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    cpu0 = cpu_seconds(pid)
    t0 = time.monotonic()
    deadline[0] = t0 + seconds
    start.wait()
    for t in threads:
        t.join(timeout=seconds + 120)
    elapsed = time.monotonic() - t0
    cpu = cpu_seconds(pid) - cpu0
    ms = np.array([x for xs in lat for x in xs] or [float("nan")]) * 1000
    ok = sum(map(len, lat))
    return {"clients": clients, "ok": ok, "rps": ok / elapsed, "errors": sum(errors), "busy": sum(busy),
            "cpu_ms": 1000 * cpu / max(ok, 1), "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="bench this running server instead of starting one")
    ap.add_argument("--clients", default="1,16,256")
    ap.add_argument("--seconds", type=float, default=8.0, help="load time per client count")
    ap.add_argument("--texts", type=int, default=1, help="texts per request")
    ap.add_argument("--words", type=int, default=24, help="words per text")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="the server's OMP_NUM_THREADS (the clients share the CPUs)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("server_args", nargs="*", help="extra `btrm serve` flags (after --)")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    texts = ["<|start_header_id|>user<|end_header_id|>\n\n" + " ".join(rng.choice(WORDS, size=args.words))
             + "<|eot_id|>" for _ in range(args.texts)]
    body = json.dumps({"model": "rm", "text": texts}).encode()
    proc = None
    with tempfile.TemporaryDirectory() as work:
        url = args.url
        if url is None:
            proc, url = start_server(build_model(work, args.hidden, args.layers), args.server_args, args.threads)
        host, port = url.split("//")[1].rsplit(":", 1)
        try:
            rows = [run_clients(host, int(port), body, int(c), args.seconds, proc and proc.pid)
                    for c in args.clients.split(",")]
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
    print(f"# {args.texts} text(s) of {args.words} words per request, {args.seconds:.0f} s per row, "
          f"model hidden {args.hidden} x {args.layers} layers, server OMP_NUM_THREADS={args.threads}, "
          f"{os.cpu_count()} CPUs")
    if args.markdown:
        print("| clients | requests/s | p50 ms | p99 ms | server CPU ms / request | answered 200 | 503 busy "
              "| resets/errors |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['clients']} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['cpu_ms']:.2f} "
                  f"| {r['ok']} | {r['busy']} | {r['errors']} |")
    else:
        for r in rows:
            print(r)


if __name__ == "__main__":
    main()
