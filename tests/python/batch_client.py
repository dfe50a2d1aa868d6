"""Drives the Batch API with the official `openai` package: upload, create, poll, download,
list, cancel. Usage: python tests/python/batch_client.py BASE_URL MODEL
Prints one JSON object with what it saw; exits non-zero on any failure.
"""
import io
import json
import sys
import time

import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base + "/v1", api_key="unused")


def jsonl(asks, max_tokens):
    lines = [
        {"custom_id": f"ask-{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": model, "messages": [{"role": "user", "content": a}],
                  "max_tokens": max_tokens, "temperature": 0}}
        for i, a in enumerate(asks)
    ]
    return io.BytesIO("".join(json.dumps(l) + "\n" for l in lines).encode())


def wait(batch_id):
    deadline = time.time() + 120
    while time.time() < deadline:
        b = client.batches.retrieve(batch_id)
        if b.status in ("completed", "failed", "cancelled", "expired"):
            return b
        time.sleep(0.2)
    raise SystemExit(f"batch {batch_id} did not end")


asks = ["Name a fruit.", "Name a river."]
uploaded = client.files.create(file=("asks.jsonl", jsonl(asks, 6)), purpose="batch",
                               expires_after={"anchor": "created_at", "seconds": 3600})
batch = client.batches.create(
    input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
    metadata={"job": "nightly"}, output_expires_after={"anchor": "created_at", "seconds": 7200},
)
done = wait(batch.id)
output_file = client.files.retrieve(done.output_file_id)
output = client.files.content(done.output_file_id).text
results = {}
for line in output.splitlines():
    row = json.loads(line)
    results[row["custom_id"]] = row["response"]["body"]["choices"][0]["message"]["content"]
direct = {
    f"ask-{i}": client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": a}], max_tokens=6, temperature=0
    ).choices[0].message.content
    for i, a in enumerate(asks)
}

# A long batch, cancelled.
long = client.files.create(file=("long.jsonl", jsonl([f"Tell a story {i}" for i in range(30)], 64)),
                           purpose="batch")
second = client.batches.create(input_file_id=long.id, endpoint="/v1/chat/completions",
                               completion_window="24h")
cancelling = client.batches.cancel(second.id)
cancelled = wait(second.id)
listed = [b.id for b in client.batches.list(limit=10)]

print(json.dumps({
    "status": done.status,
    "counts": done.request_counts.model_dump(),
    "usage": done.usage.model_dump() if done.usage else None,
    "metadata": done.metadata,
    "results": results,
    "direct": direct,
    "file": {"purpose": uploaded.purpose, "filename": uploaded.filename, "bytes": uploaded.bytes},
    "expiry": [uploaded.expires_at - uploaded.created_at,
               output_file.expires_at - output_file.created_at],
    "cancel_status": cancelling.status,
    "cancelled": cancelled.status,
    "cancelled_counts": cancelled.request_counts.model_dump(),
    "listed": listed,
    "ids": [batch.id, second.id],
}))
