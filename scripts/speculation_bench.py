#!/usr/bin/env python3
"""Speculative decoding by prompt lookup, measured: one binary, two servers on one model (the
first with `--speculate 0`, the second with `--speculate K`), the same single-stream
requests sent to each in turn, round after round (interleaved, so host drift hits both).
Per workload: the decode speed of each (tokens after the first over the time from first to
last token, streamed), their ratio (median over rounds after a warm-up round), the replies'
equality, and the drafts offered and kept. Standard library only.

  scripts/speculation_bench.py --binary target/release/edgeinfer --rounds 4 --speculate 4 \\
      [--model models/SmolLM2-135M-Instruct.Q4_1.gguf] [--threads 2] [--max-tokens 200]

`--baseline OLD_BINARY` makes the first server that binary with the same `--speculate K`
(two builds compared, "off" then reads as the old build and "on" as the new one).
"""
import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
from loadkit import metrics  # noqa: E402

PASSAGE = (
    "The node keeps a shared cache of keys and values in blocks of sixteen positions. When a "
    "request arrives, its prompt is split into blocks and each full block is looked up by the "
    "hash of its tokens and of the blocks before it. A block that is found is taken as it is, "
    "and the request starts computing after it. A block that is not found is computed and then "
    "registered, so the next request with the same start finds it. Blocks nobody holds stay in "
    "the cache until their memory is needed, and the oldest of them go first."
)
RECORD = {"id": "ord_1042", "customer": {"name": "Ada Moreau", "email": "ada@example.org",
          "city": "Lyon"}, "items": [{"sku": "KB-88", "qty": 2, "price": 49.5},
          {"sku": "MS-12", "qty": 1, "price": 19.0}], "status": "pending",
          "notes": "Leave the parcel at the front desk."}
CODE = '''def merge_intervals(intervals):
    intervals = sorted(intervals, key=lambda x: x[0])
    merged = []
    for start, end in intervals:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged
'''
WORKLOADS = {
    "copy text": f"Copy this text exactly, word for word:\n\n{PASSAGE}",
    "edit JSON": "Return this JSON object with `status` changed to \"shipped\" and nothing "
                 f"else changed:\n\n{json.dumps(RECORD, indent=2)}",
    "edit code": f"Add type hints to this Python function and return the whole function:\n\n{CODE}",
    # A reply that does not repeat itself (this prompt's greedy reply on the default model
    # does not loop within 200 tokens): what failed drafts cost.
    "free text": "Write a story about a dragon.",
    # A JSON schema whose keys the grammar forces (drafted from the grammar, not the context).
    "JSON schema": "Describe a made-up city for a travel guide.",
    # The story again, with OpenAI's `prediction`: its own greedy reply with a sentence put
    # in the middle (a client revising a text it holds), set from the warm-up round's
    # "free text" reply. Nothing in the prompt to copy: drafts come from the prediction.
    "predicted story": "Write a story about a dragon.",
}
SCHEMA = {"type": "object", "properties": {
    "city_name": {"type": "string", "maxLength": 40},
    "country_of_location": {"type": "string", "maxLength": 40},
    "estimated_population_in_millions": {"type": "number"},
    "best_season_to_visit": {"enum": ["spring", "summer", "autumn", "winter"]},
    "three_things_to_see": {"type": "array", "items": {"type": "string", "maxLength": 60},
                            "minItems": 3, "maxItems": 3}},
    "required": ["city_name", "country_of_location", "estimated_population_in_millions",
                 "best_season_to_visit", "three_things_to_see"],
    "additionalProperties": False}
EXTRA = {"JSON schema": {"response_format": {"type": "json_schema", "json_schema": {
    "name": "city", "strict": True, "schema": SCHEMA}}}}


def start(binary, model, port, speculate, threads, data):
    cmd = [binary, "--threads", str(threads), "serve", "--model", model, "--port", str(port),
           "--speculate", str(speculate), "--data-dir", data]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    sys.exit(f"server on port {port} did not become ready")


def stream(port, prompt, max_tokens, extra):
    """Returns (text, decode tok/s) of one greedy streamed reply."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, **extra}
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"content-type": "application/json"})
    resp = conn.getresponse()
    times, text = [], []
    for line in resp:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
        if delta:
            times.append(time.perf_counter())
            text.append(delta)
    conn.close()
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 2 else float("nan")
    return "".join(text), rate


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="target/release/edgeinfer")
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--speculate", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--baseline", default=None, help="an older binary, run with --speculate K")
    a = ap.parse_args()
    ports = (18311, 18312)
    with tempfile.TemporaryDirectory() as d0, tempfile.TemporaryDirectory() as d1:
        first = (a.baseline, a.speculate) if a.baseline else (a.binary, 0)
        procs = [start(first[0], a.model, ports[0], first[1], a.threads, d0),
                 start(a.binary, a.model, ports[1], a.speculate, a.threads, d1)]
        try:
            rates = {w: ([], []) for w in WORKLOADS}
            same = {w: True for w in WORKLOADS}
            drafts = {w: [0.0, 0.0] for w in WORKLOADS}
            for r in range(a.rounds + 1):
                for w, prompt in WORKLOADS.items():
                    before = metrics(f"http://127.0.0.1:{ports[1]}")
                    texts = []
                    for i, port in enumerate(ports):
                        text, rate = stream(port, prompt, a.max_tokens, EXTRA.get(w, {}))
                        texts.append(text)
                        if r > 0:  # round 0 warms up (and fills the prefix cache)
                            rates[w][i].append(rate)
                    after = metrics(f"http://127.0.0.1:{ports[1]}")
                    same[w] &= texts[0] == texts[1]
                    if w == "free text" and "predicted story" not in EXTRA:
                        half = len(texts[0]) // 2
                        edited = (texts[0][:half] + " Nobody in the village had ever seen "
                                  "anything like it." + texts[0][half:])
                        EXTRA["predicted story"] = {
                            "prediction": {"type": "content", "content": edited}}
                    for j, name in enumerate(["edgeinfer_draft_tokens_total",
                                              "edgeinfer_draft_tokens_accepted_total"]):
                        drafts[w][j] += after.get(name, 0) - before.get(name, 0)
            print(f"model {a.model}, --speculate {a.speculate}, {a.rounds} rounds, "
                  f"{a.max_tokens} tokens, decode tok/s (median)"
                  + (f"; 'off' is {a.baseline}" if a.baseline else ""))
            for w in WORKLOADS:
                base, spec = rates[w]
                ratios = [s / b for b, s in zip(base, spec)]
                offered, kept = drafts[w]
                print(f"  {w:10s} off {statistics.median(base):7.1f}  on "
                      f"{statistics.median(spec):7.1f}  ratio {statistics.median(ratios):.2f}x "
                      f"(rounds {' '.join(f'{x:.2f}' for x in ratios)})  drafts kept "
                      f"{kept:.0f}/{offered:.0f}  same replies: {'yes' if same[w] else 'NO'}")
        finally:
            for p in procs:
                p.terminate()
                p.wait()


if __name__ == "__main__":
    main()
