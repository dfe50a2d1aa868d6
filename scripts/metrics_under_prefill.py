#!/usr/bin/env python3
"""Scrapes /metrics every 50 ms (as an inference scheduler does) while the node runs one long
prefill, and prints the scrape latencies: p50, p99, max.

    scripts/metrics_under_prefill.py --base http://127.0.0.1:8080 [--prompt-tokens 2000] [--key K]

Exit status 1 if p99 is above --p99-ms (default 20)."""
import argparse, json, threading, time, urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("--base", default="http://127.0.0.1:8080")
ap.add_argument("--prompt-tokens", type=int, default=2000)
ap.add_argument("--key")
ap.add_argument("--p99-ms", type=float, default=20.0)
ap.add_argument("--interval", type=float, default=0.05)
args = ap.parse_args()

def post(path, body):
    req = urllib.request.Request(args.base + path, json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    if args.key:
        req.add_header("authorization", "Bearer " + args.key)
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)

# A prompt of about the asked length: distinct numbers, so the prefix cache cannot help.
seed = int(time.time() * 1000) % 100000
words, n = [], 0
while True:
    words.append(str(seed + len(words)))
    if len(words) % 50 == 0:
        n = len(post("/tokenize", {"content": " ".join(words)})["tokens"])
        if n >= args.prompt_tokens:
            break
prompt = " ".join(words)
done = threading.Event()
result = {}

def run():
    try:
        t = time.perf_counter()
        r = post("/v1/completions", {"prompt": prompt, "max_tokens": 1, "temperature": 0})
        result["seconds"] = time.perf_counter() - t
        result["prompt_tokens"] = r["usage"]["prompt_tokens"]
    except Exception as e:  # noqa: BLE001 - reported, and the scrape loop must end
        result["error"] = repr(e)
    finally:
        done.set()

threading.Thread(target=run, daemon=True).start()
lat = []
deadline = time.time() + 600
while not done.is_set():
    if time.time() > deadline:
        raise SystemExit("the prefill did not finish within 600 s")
    t = time.perf_counter()
    with urllib.request.urlopen(args.base + "/metrics", timeout=10) as r:
        body = r.read()
    lat.append((time.perf_counter() - t) * 1000)
    assert b"vllm:num_requests_running" in body
    time.sleep(max(0.0, args.interval - (time.perf_counter() - t)))
if "error" in result:
    raise SystemExit(f"the completion failed: {result['error']}")
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
print(json.dumps({"prompt_tokens": result["prompt_tokens"], "prefill_seconds": round(result["seconds"], 3),
                  "scrapes": len(lat), "p50_ms": round(q(0.5), 2), "p99_ms": round(q(0.99), 2),
                  "max_ms": round(lat[-1], 2)}))
raise SystemExit(0 if q(0.99) <= args.p99_ms else 1)
