#!/usr/bin/env python3
"""Soak: --minutes at --clients streaming clients against a running server, one request
after another, 10% of them disconnecting on purpose in a random phase (right after
sending: queued; at the response headers: prefill; after a few tokens: decode). The
server's RSS is sampled every 10 s (--pid).

Verdict: no failed request besides the clients' own disconnects; RSS slope after warm-up
(the first --warmup-minutes) under 1 MiB per 10 minutes; once the clients stop, running =
waiting = 0 and every KV block free again (edgeinfer_kv_cache_usage_ratio 0).

  edgeinfer serve --port 8092 &
  scripts/soak.py --url http://127.0.0.1:8092 --pid $! --minutes 30
"""
import argparse
import asyncio
import json
import random
import sys
import time

sys.path.insert(0, __import__("os").path.dirname(__file__))
from loadkit import PROMPTS, chat_stream, metrics, rss_mib  # noqa: E402


def slope_per_10min(samples):
    """Least-squares slope of (seconds, MiB) samples, in MiB per 10 minutes."""
    n = len(samples)
    if n < 3:
        return float("nan")
    mx = sum(t for t, _ in samples) / n
    my = sum(m for _, m in samples) / n
    num = sum((t - mx) * (m - my) for t, m in samples)
    den = sum((t - mx) ** 2 for t, _ in samples)
    return num / den * 600 if den else float("nan")


async def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--pid", type=int, required=True, help="the server's process id (RSS)")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--warmup-minutes", type=float, default=5)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--disconnect-share", type=float, default=0.10)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    t0 = time.monotonic()
    end = t0 + args.minutes * 60
    counts = {"ok": 0, "disconnected": 0, "failed": 0, "tokens": 0}
    failures = []
    rss = []

    async def client(i):
        r = 0
        while time.monotonic() < end:
            mode = None
            if rng.random() < args.disconnect_share:
                mode = rng.choice(["queued", "prefill", "decode"])
            res = await chat_stream(args.url, PROMPTS[(i + r) % len(PROMPTS)],
                                    rng.randint(8, args.max_tokens), args.api_key, mode,
                                    rng.randint(1, 8))
            r += 1
            counts["tokens"] += res["tokens"]
            if mode:
                # Our own disconnect: fine unless the server refused or failed first.
                if res["status"] == "self" or (res["status"] == 200 and not res["error"]):
                    counts["disconnected"] += 1
                else:
                    counts["failed"] += 1
                    failures.append(res)
            elif res["status"] == 200 and res["done"] and not res["error"]:
                counts["ok"] += 1
            else:
                counts["failed"] += 1
                failures.append(res)

    async def sampler():
        while time.monotonic() < end:
            rss.append((time.monotonic() - t0, rss_mib(args.pid)))
            elapsed = time.monotonic() - t0
            if len(rss) % 6 == 1:
                print(json.dumps({"minute": round(elapsed / 60, 1), "rss_mib": round(rss[-1][1], 1),
                                  **counts}), flush=True)
            await asyncio.sleep(10)

    await asyncio.gather(sampler(), *(client(i) for i in range(args.clients)))
    # Idle: everything released.
    idle = None
    for _ in range(100):
        m = metrics(args.url)
        idle = {k: m.get(k) for k in ("edgeinfer_requests_running", "edgeinfer_requests_waiting",
                                      "edgeinfer_kv_cache_usage_ratio")}
        if all(v == 0 for v in idle.values()):
            break
        await asyncio.sleep(0.1)
    warm = [(t, m) for t, m in rss if t >= args.warmup_minutes * 60]
    slope = slope_per_10min(warm)
    problems = []
    if counts["failed"]:
        problems.append(f"{counts['failed']} failed requests, e.g. {failures[:2]}")
    if not slope < 1.0:
        problems.append(f"RSS slope {slope:.2f} MiB per 10 min")
    if not all(v == 0 for v in idle.values()):
        problems.append(f"not idle after the run: {idle}")
    print(json.dumps({"minutes": args.minutes, **counts, "rss_first_mib": round(rss[0][1], 1),
                      "rss_last_mib": round(rss[-1][1], 1),
                      "rss_slope_mib_per_10min_after_warmup": round(slope, 3), "idle": idle}))
    print(f"VERDICT: {'PASS' if not problems else 'FAIL'} soak {args.minutes} min: "
          f"{counts['ok']} ok, {counts['disconnected']} own disconnects, {counts['failed']} failed, "
          f"RSS slope {slope:.2f} MiB/10 min" + ("" if not problems else " | " + "; ".join(problems)))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
