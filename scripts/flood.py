#!/usr/bin/env python3
"""Flood: ten times a node's capacity, against a running server.

  1. baseline: --clients (16) streaming clients, unloaded, --rounds requests each;
  2. a burst of 10x --clients concurrent streams (160), all at once;
  3. --burst (1,000) requests spread over one second.

Verdict: only 200 or 429 (with Retry-After) and no 5xx, resets or timeouts; 429s answered
in < 20 ms p99 (send to status line, measured by --procs client processes); the admitted requests' time to first token p99
within 2x of the baseline's. Start the server with the queue it should run with, e.g.

  edgeinfer serve --port 8091 --max-queue 0
  scripts/flood.py --url http://127.0.0.1:8091
"""
import argparse
import asyncio
import json
import multiprocessing
import sys
import time

sys.path.insert(0, __import__("os").path.dirname(__file__))
from loadkit import PROMPTS, chat_stream, clients, pct  # noqa: E402


async def _share(url, indices, n, start_at, spread_s, max_tokens, api_key):
    async def one(i):
        await asyncio.sleep(max(0.0, start_at + spread_s * i / n - time.time()))
        return await chat_stream(url, PROMPTS[i % len(PROMPTS)], max_tokens, api_key)

    return await asyncio.gather(*(one(i) for i in indices))


def _run_share(args):
    return asyncio.run(_share(*args))


async def burst(url, n, spread_s, max_tokens, api_key, procs):
    """`n` requests from `procs` client processes (one event loop cannot read 160 answers
    at once without adding its own delay to the latencies it measures), starting together
    and spread evenly over `spread_s` seconds."""
    start_at = time.time() + 1.0
    shares = [(url, list(range(p, n, procs)), n, start_at, spread_s, max_tokens, api_key)
              for p in range(procs)]
    loop = asyncio.get_running_loop()
    with multiprocessing.Pool(procs) as pool:
        parts = await loop.run_in_executor(None, pool.map, _run_share, shares)
    return [r for part in parts for r in part]


def summary(name, results):
    by = {}
    for r in results:
        by[str(r["status"])] = by.get(str(r["status"]), 0) + 1
    ok = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] == 429]
    s = {
        "phase": name,
        "requests": len(results),
        "statuses": by,
        "admitted_ttft_p50_s": round(pct([r["ttft"] for r in ok if r["ttft"]], 50), 3),
        "admitted_ttft_p99_s": round(pct([r["ttft"] for r in ok if r["ttft"]], 99), 3),
        "refused_latency_p50_ms": round(pct([r["latency"] * 1e3 for r in refused], 50), 2),
        "refused_latency_p99_ms": round(pct([r["latency"] * 1e3 for r in refused], 99), 2),
        "refused_without_retry_after": sum(1 for r in refused if not r["retry_after"]),
        "incomplete_streams": sum(1 for r in ok if not r["done"]),
    }
    print(json.dumps(s), flush=True)
    return s


async def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--clients", type=int, default=16, help="the node's capacity")
    ap.add_argument("--rounds", type=int, default=2, help="baseline requests per client")
    ap.add_argument("--burst", type=int, default=1000, help="requests in the one-second burst")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--procs", type=int, default=4, help="client processes for the bursts")
    args = ap.parse_args()

    await clients(args.url, args.clients, 1, 8, args.api_key)  # warm-up, not counted
    base = summary("baseline", await clients(args.url, args.clients, args.rounds,
                                             args.max_tokens, args.api_key))
    flood = summary("concurrent", await burst(args.url, 10 * args.clients, 0.0,
                                              args.max_tokens, args.api_key, args.procs))
    await asyncio.sleep(5)
    spike = summary("one_second", await burst(args.url, args.burst, 1.0, args.max_tokens,
                                              args.api_key, args.procs))
    problems = []
    if base["statuses"] != {"200": base["requests"]} or base["incomplete_streams"]:
        problems.append(f"the baseline itself failed: {base['statuses']}")
    for s in (flood, spike):
        bad = {k: v for k, v in s["statuses"].items() if k not in ("200", "429")}
        if bad:
            problems.append(f"{s['phase']}: statuses other than 200/429: {bad}")
        if s["refused_without_retry_after"]:
            problems.append(f"{s['phase']}: {s['refused_without_retry_after']} 429s without Retry-After")
        if s["incomplete_streams"]:
            problems.append(f"{s['phase']}: {s['incomplete_streams']} admitted streams did not finish")
        if s["refused_latency_p99_ms"] >= 20:
            problems.append(f"{s['phase']}: 429 p99 {s['refused_latency_p99_ms']} ms >= 20 ms")
        if s["admitted_ttft_p99_s"] > 2 * base["admitted_ttft_p99_s"]:
            problems.append(f"{s['phase']}: admitted TTFT p99 {s['admitted_ttft_p99_s']} s > 2x "
                            f"baseline {base['admitted_ttft_p99_s']} s")
    ratio = max(flood["admitted_ttft_p99_s"], spike["admitted_ttft_p99_s"]) / base["admitted_ttft_p99_s"]
    print(f"VERDICT: {'PASS' if not problems else 'FAIL'} flood: admitted TTFT p99 {ratio:.2f}x "
          f"baseline, 429 p99 {max(flood['refused_latency_p99_ms'], spike['refused_latency_p99_ms'])} ms"
          + ("" if not problems else " | " + "; ".join(problems)))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
