#!/usr/bin/env python3
"""Embeddings against any OpenAI-compatible server (`POST /v1/embeddings`).

Load: `--concurrency` clients each send `--requests` requests of `--batch` passages (about
80 tokens each, like retrieval chunks) one after another. Prints inputs/s and prompt
tokens/s over the whole run and the request latency p50/p95. Standard library only.

  scripts/embed_load.py --url http://127.0.0.1:8080 --concurrency 4 --requests 8 --batch 16

Compare: `--compare URL2` embeds a fixed set of texts (prose, code, accents and CJK, a
300-word passage) on both servers and prints each text's cosine similarity and token
counts, e.g. edgeinfer against `llama-server --embeddings --pooling mean`.
"""
import argparse
import http.client
import json
import math
import os
import sys
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(__file__))
from loadkit import PROMPTS, pct  # noqa: E402

COMPARED = [
    "The cat sat on the mat.",
    "A cat was sitting on a mat.",
    "Stock markets fell sharply today.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "Café, naïve, 東京, emoji 🎉 and numbers 12345.",
    " ".join(["word"] * 300),
]


def passage(i):
    """About 80 tokens of prose, different for each i."""
    return f"Passage {i}. " + " ".join(PROMPTS[(i + k) % len(PROMPTS)] for k in range(7))


def embed(url, inputs, model=None):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = {"input": inputs}
    if model:
        body["model"] = model
    conn.request("POST", "/v1/embeddings", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
    d = json.loads(data)
    vectors = [e["embedding"] for e in sorted(d["data"], key=lambda e: e["index"])]
    return vectors, d["usage"]["prompt_tokens"]


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def compare(a, b, model):
    va, ta = embed(a, COMPARED, model)
    vb, tb = embed(b, COMPARED, model)
    sims = [cosine(x, y) for x, y in zip(va, vb)]
    for text, s in zip(COMPARED, sims):
        print(f"{s:.6f}  {text[:40]!r}")
    print(json.dumps({"min_cosine": round(min(sims), 6), "tokens": [ta, tb],
                      "dimensions": [len(va[0]), len(vb[0])]}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default=None)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--requests", type=int, default=8, help="requests per client")
    ap.add_argument("--batch", type=int, default=16, help="inputs per request")
    ap.add_argument("--compare", default=None, metavar="URL2")
    args = ap.parse_args()
    if args.compare:
        return compare(args.url, args.compare, args.model)

    latencies, tokens, errors = [], [], []
    lock = threading.Lock()

    def client(c):
        for r in range(args.requests):
            first = (c * args.requests + r) * args.batch
            inputs = [passage(first + k) for k in range(args.batch)]
            start = time.perf_counter()
            try:
                _, n = embed(args.url, inputs, args.model)
                with lock:
                    latencies.append(time.perf_counter() - start)
                    tokens.append(n)
            except Exception as e:  # report, keep going
                with lock:
                    errors.append(str(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    inputs = len(latencies) * args.batch
    print(json.dumps({
        "concurrency": args.concurrency,
        "batch": args.batch,
        "requests": len(latencies),
        "errors": len(errors),
        "inputs": inputs,
        "prompt_tokens": sum(tokens),
        "wall_seconds": round(wall, 2),
        "inputs_per_s": round(inputs / wall, 1),
        "tokens_per_s": round(sum(tokens) / wall, 1),
        "latency_p50_s": round(pct(latencies, 50), 3),
        "latency_p95_s": round(pct(latencies, 95), 3),
    }))
    if errors:
        print("errors:", errors[:3])


if __name__ == "__main__":
    main()
