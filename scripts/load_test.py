#!/usr/bin/env python3
"""Load test for any OpenAI-compatible server: N concurrent streaming clients.

Each client sends `--requests` streaming chat completions one after another (temperature 0,
`--max-tokens` each, a request may stop early at an end-of-turn token) and
records time to first token and per-token arrival times. Prints aggregate generated tok/s
over the whole run, TTFT p50/p95, and per-stream decode tok/s p50. Standard library only.
`--response-format json_object|json_schema|gbnf` constrains every request (structured output;
`gbnf`: the same report as a llama.cpp GBNF `grammar`);
`--api-key KEY` sends a key (for a server with keys on); `--priority low` sends
`x-edgeinfer-priority: low` (background work, as the Batch API's requests run);
`--prompt-words N` lengthens each prompt with N words (a document to work on).

  scripts/load_test.py --url http://127.0.0.1:8080 --concurrency 16 --requests 2
"""
import argparse
import os
import sys
import http.client
import json
import statistics
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(__file__))
from loadkit import PROMPTS  # noqa: E402


# A schema whose replies run long (free strings and a list), like an agent's report.
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string"}, "summary": {"type": "string"},
    "points": {"type": "array", "items": {"type": "string"}}},
    "required": ["title", "summary", "points"], "additionalProperties": False}
FORMATS = {
    "json_object": {"type": "json_object"},
    "json_schema": {"type": "json_schema", "json_schema": {"name": "report", "strict": True, "schema": SCHEMA}},
    "gbnf": None,
}
# Common words (about a token each) for --prompt-words.
WORDS = ("the of and to in is was for on that with as by at from his her an were which are this "
         "be has had one their not but new its after first two who also they other been more "
         "city year time people world state part used known many some would").split()
# SCHEMA's report in GBNF, in the layout the server writes JSON.
GBNF = r"""root ::= "{\"title\": " str ", \"summary\": " str ", \"points\": [" (str (", " str)*)? "]}"
str ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4}) )* "\""
"""


def one_request(url, model, prompt, max_tokens, response_format=None, api_key=None,
                priority=None):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    if model:
        body["model"] = model
    if response_format == "gbnf":
        body["grammar"] = GBNF
    elif response_format:
        body["response_format"] = FORMATS[response_format]
    start = time.perf_counter()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    if priority:
        headers["x-edgeinfer-priority"] = priority
    conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    times = []
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        for choice in chunk.get("choices", []):
            if choice.get("delta", {}).get("content"):
                times.append(time.perf_counter())
    conn.close()
    return start, times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default=None)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--response-format", choices=sorted(FORMATS), default=None,
                    help="constrain every request to this format")
    ap.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer KEY`")
    ap.add_argument("--priority", choices=["low", "normal"], default=None,
                    help="sent as `x-edgeinfer-priority`")
    ap.add_argument("--prompt-words", type=int, default=0,
                    help="append this many words to each prompt (each client its own)")
    args = ap.parse_args()

    results, errors = [], []
    lock = threading.Lock()

    def client(i):
        for r in range(args.requests):
            prompt = PROMPTS[(i + r) % len(PROMPTS)]
            if args.prompt_words:
                words = (WORDS[(k * 7 + i * 13 + r) % len(WORDS)] for k in range(args.prompt_words))
                prompt = " ".join(words) + "\n\n" + prompt
            try:
                start, times = one_request(args.url, args.model, prompt, args.max_tokens,
                                           args.response_format, args.api_key, args.priority)
                with lock:
                    results.append((start, times))
            except Exception as e:  # report, keep going
                with lock:
                    errors.append(str(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0

    tokens = sum(len(t) for _, t in results)
    ttft = sorted(t[0] - s for s, t in results if t)
    decode = sorted((len(t) - 1) / (t[-1] - t[0]) for _, t in results if len(t) > 2 and t[-1] > t[0])

    def pct(xs, p):
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")

    print(json.dumps({
        "concurrency": args.concurrency,
        "response_format": args.response_format,
        "requests": len(results),
        "errors": len(errors),
        "generated_tokens": tokens,
        "wall_seconds": round(wall, 2),
        "aggregate_tok_s": round(tokens / wall, 1),
        "ttft_p50_s": round(pct(ttft, 50), 3),
        "ttft_p95_s": round(pct(ttft, 95), 3),
        "decode_tok_s_per_stream_p50": round(statistics.median(decode), 1) if decode else None,
    }))
    if errors:
        print("errors:", errors[:3])


if __name__ == "__main__":
    main()
