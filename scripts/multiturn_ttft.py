#!/usr/bin/env python3
"""Time to first token of an agent's follow-up turn against its cold first turn.

For each run: a fresh multi-turn history of about `--history-tokens` tokens (different per run,
so the first turn is cold), sent as a streaming chat completion; then the same history plus the
assistant's reply and one short user turn. Prints the TTFT of each and the speed-up (cold /
warm), per run and as medians. Works against any OpenAI-compatible server that caches prompt
prefixes (edgeinfer by default, llama.cpp's llama-server with `cache_prompt`). Standard library
only.

  scripts/multiturn_ttft.py --url http://127.0.0.1:8080 --runs 5
"""
import argparse
import http.client
import json
import random
import statistics
import time
import urllib.parse

WORDS = ("river robot harbor library winter door map storm garden engine lantern bridge "
         "market letter mountain signal orchard tower valley window").split()
VERBS = "remembers describes measures collects explains repairs visits paints".split()


def sentence(rng, i):
    return (f"The {rng.choice(WORDS)} {rng.choice(VERBS)} the {rng.choice(WORDS)} "
            f"and the {rng.choice(WORDS)} on day {i}.")


def history(seed, approx_tokens):
    rng = random.Random(seed)
    msgs = [{"role": "system", "content": f"You are agent {seed}. Keep answers short."}]
    i = 0
    # About 14 tokens per sentence; four user/assistant turns.
    per_turn = max(1, approx_tokens // 14 // 5)
    for turn in range(4):
        msgs.append({"role": "user", "content": " ".join(sentence(rng, i + k) for k in range(per_turn))})
        i += per_turn
        msgs.append({"role": "assistant", "content": "Noted. " + sentence(rng, i)})
        i += 1
    msgs.append({"role": "user", "content": " ".join(sentence(rng, i + k) for k in range(per_turn))
                 + " Summarise the notes in one sentence."})
    return msgs


def stream(url, model, messages, max_tokens):
    """Returns (ttft seconds, reply text, usage)."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "cache_prompt": True}
    if model:
        body["model"] = model
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    ttft, text, usage = None, [], None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices", []):
            content = choice.get("delta", {}).get("content")
            if content:
                if ttft is None:
                    ttft = time.perf_counter() - start
                text.append(content)
    conn.close()
    return ttft, "".join(text), usage


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default=None)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--history-tokens", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=int(time.time()), help="first history's seed")
    a = ap.parse_args()
    cold, warm = [], []
    for r in range(a.runs):
        msgs = history(a.seed + r, a.history_tokens)
        t1, reply, u1 = stream(a.url, a.model, msgs, a.max_tokens)
        msgs = msgs + [{"role": "assistant", "content": reply},
                       {"role": "user", "content": "And in three words?"}]
        t2, _, u2 = stream(a.url, a.model, msgs, a.max_tokens)
        cached = lambda u: ((u or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
        print(f"run {r}: cold {t1:.3f} s ({(u1 or {}).get('prompt_tokens')} prompt tokens, "
              f"{cached(u1)} cached) | follow-up {t2:.3f} s ({(u2 or {}).get('prompt_tokens')} "
              f"prompt tokens, {cached(u2)} cached) | {t1 / t2:.1f}x")
        cold.append(t1)
        warm.append(t2)
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"median TTFT: cold {c:.3f} s, follow-up {w:.3f} s, speed-up {c / w:.1f}x")


if __name__ == "__main__":
    main()
