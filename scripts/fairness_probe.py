#!/usr/bin/env python3
"""Fair admission, measured: key A floods the node (`--burst` concurrent streaming requests,
more than `--max-batch-size` runs), then key B sends one request; B's time to first token
and total time are printed, per server, round by round. Give two servers (an older build
and a newer one, both started with the same `--master-key` and flags) to compare them
interleaved. Standard library only.

  scripts/fairness_probe.py --master-key KEY --url http://127.0.0.1:8080 [--url ...] \\
      [--burst 48] [--rounds 3] [--max-tokens 128]

With `--weights WA,WB`, keys of those weights each send `--burst` requests at once instead,
and each round prints the tokens each key received while both still had requests waiting
(until either key had half of its burst answered) and their ratio, A's over B's: what the
weights buy.
"""
import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse


def call(url, key, path, body):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    conn.request("POST", path, json.dumps(body), {"content-type": "application/json",
                                                  "authorization": f"Bearer {key}"})
    return conn, conn.getresponse()


def key(url, master, weight=None):
    conn, r = call(url, master, "/key/generate", {} if weight is None else {"weight": weight})
    k = json.loads(r.read())["key"]
    conn.close()
    return k


def stream(url, key, max_tokens, out=None):
    """Streams one chat completion; returns (ttft, total) seconds."""
    body = {"messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "logit_bias": {"0": -100, "1": -100, "2": -100}}
    t0 = time.perf_counter()
    conn, r = call(url, key, "/v1/chat/completions", body)
    ttft, times = None, []
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        choices = json.loads(line[6:]).get("choices") or [{}]
        if choices[0].get("delta", {}).get("content"):
            times.append(time.perf_counter())
            ttft = ttft if ttft is not None else time.perf_counter() - t0
    conn.close()
    res = (ttft, time.perf_counter() - t0, times)
    if out is not None:
        out.append(res)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", action="append", required=True)
    ap.add_argument("--master-key", required=True)
    ap.add_argument("--burst", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--weights", default=None, metavar="WA,WB")
    a = ap.parse_args()
    if a.weights:
        return weighted(a)
    keys = {u: (key(u, a.master_key), key(u, a.master_key)) for u in a.url}
    results = {u: [] for u in a.url}
    for r in range(a.rounds):
        for u in a.url:
            ka, kb = keys[u]
            threads = [threading.Thread(target=stream, args=(u, ka, a.max_tokens))
                       for _ in range(a.burst)]
            for t in threads:
                t.start()
            time.sleep(0.5)  # A's burst is queued
            ttft, total, _ = stream(u, kb, a.max_tokens)
            for t in threads:
                t.join()
            results[u].append((ttft, total))
            print(f"round {r + 1} {u}: B's TTFT {ttft:.2f} s, B's total {total:.2f} s",
                  flush=True)
    for u in a.url:
        ttfts = [x for x, _ in results[u]]
        print(f"{u}: B's TTFT median {statistics.median(ttfts):.2f} s")


def weighted(a):
    wa, wb = (int(w) for w in a.weights.split(","))
    keys = {u: (key(u, a.master_key, wa), key(u, a.master_key, wb)) for u in a.url}
    ratios = {u: [] for u in a.url}
    for r in range(a.rounds):
        for u in a.url:
            got = {k: [] for k in keys[u]}
            threads = [threading.Thread(target=stream, args=(u, k, a.max_tokens, got[k]))
                       for _ in range(a.burst) for k in keys[u]]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            # Until either key had half its burst answered, both had requests waiting.
            end = min(sorted(ts[-1] for _, _, ts in got[k] if ts)[a.burst // 2 - 1]
                      for k in keys[u])
            n = [sum(sum(1 for t in ts if t <= end) for _, _, ts in got[k]) for k in keys[u]]
            ratios[u].append(n[0] / max(n[1], 1))
            print(f"round {r + 1} {u}: weights {wa}:{wb}, tokens while both busy "
                  f"{n[0]} : {n[1]} = {ratios[u][-1]:.2f}", flush=True)
    for u in a.url:
        print(f"{u}: ratio median {statistics.median(ratios[u]):.2f}")


if __name__ == "__main__":
    main()
