#!/usr/bin/env python3
"""Slowloris: --sockets connections (1,000) each trickle one header byte per second and
never finish their header, while --clients (16) ordinary streaming clients run; the same
16-client run goes first without them, as the baseline.

Verdict: every trickling socket is closed by the server (the header-read timeout) within
its timeout plus 5 s; the 16 clients' TTFT p99 under the attack within 1.5x the baseline's;
no client request fails.

  edgeinfer serve --port 8093 &        # --header-read-timeout 10 by default
  scripts/slowloris.py --url http://127.0.0.1:8093 --header-timeout 10
"""
import argparse
import asyncio
import json
import sys
import time

sys.path.insert(0, __import__("os").path.dirname(__file__))
from loadkit import clients, host_port, pct  # noqa: E402


async def trickle(host, port, limit_s):
    """Returns seconds until the server closed the socket, or None if it never did."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as e:
        return ("connect_failed", repr(e))
    start = time.monotonic()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    try:
        while time.monotonic() - start < limit_s:
            writer.write(b"a")
            await writer.drain()
            try:
                data = await asyncio.wait_for(reader.read(4096), 1.0)
                if not data:
                    return time.monotonic() - start
            except asyncio.TimeoutError:
                pass
    except (ConnectionResetError, BrokenPipeError):
        return time.monotonic() - start
    finally:
        writer.close()
    return None


async def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--sockets", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=6,
                    help="requests per client; enough to outlast the header timeout")
    ap.add_argument("--header-timeout", type=float, default=10.0,
                    help="the server's --header-read-timeout")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--api-key", default=None)
    args = ap.parse_args()
    host, port = host_port(args.url)

    await clients(args.url, args.clients, 1, 8, args.api_key)  # warm-up, not counted
    base = await clients(args.url, args.clients, args.rounds, args.max_tokens, args.api_key)
    limit = args.header_timeout + 5
    stop = asyncio.Event()
    closed = []

    async def attacker():
        # Like a real slowloris: a socket the server closed is opened again at once.
        while True:
            closed.append(await trickle(host, port, limit + 10))
            if stop.is_set():
                return

    attack = [asyncio.create_task(attacker()) for _ in range(args.sockets)]
    await asyncio.sleep(1.0)  # every socket is open and trickling
    loaded = await clients(args.url, args.clients, args.rounds, args.max_tokens, args.api_key)
    stop.set()
    await asyncio.gather(*attack)

    def ttft_p99(rs):
        return pct([r["ttft"] for r in rs if r["ttft"] is not None], 99)

    failed = [r for r in base + loaded if r["status"] != 200 or not r["done"]]
    never = sum(1 for c in closed if c is None)
    late = sum(1 for c in closed if isinstance(c, float) and c > limit)
    refused = [c for c in closed if isinstance(c, tuple)]
    times = [c for c in closed if isinstance(c, float)]
    ratio = ttft_p99(loaded) / ttft_p99(base)
    print(json.dumps({
        "sockets": args.sockets, "trickling_connections": len(closed), "closed_by_server": len(times), "never_closed": never,
        "closed_late": late, "connect_failed": len(refused),
        "closed_after_s_p50": round(pct(times, 50), 2), "closed_after_s_max": round(max(times, default=float("nan")), 2),
        "baseline_ttft_p99_s": round(ttft_p99(base), 3), "attack_ttft_p99_s": round(ttft_p99(loaded), 3),
        "client_failures": len(failed)}))
    problems = []
    if never or late or refused:
        problems.append(f"{never} sockets never closed, {late} closed after {limit} s, "
                        f"{len(refused)} could not connect")
    if failed:
        problems.append(f"{len(failed)} client requests failed, e.g. {failed[:2]}")
    if not ratio <= 1.5:
        problems.append(f"TTFT p99 {ratio:.2f}x the baseline")
    print(f"VERDICT: {'PASS' if not problems else 'FAIL'} slowloris: {len(times)}/{len(closed)} "
          f"trickling connections ({args.sockets} at a time) closed by the header timeout, 16-client TTFT p99 {ratio:.2f}x baseline"
          + ("" if not problems else " | " + "; ".join(problems)))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
