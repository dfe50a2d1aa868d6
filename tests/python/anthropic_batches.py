"""The official `anthropic` package's Message Batches client against the server: create,
retrieve until it ends, results (JSONL), list, delete; and the same requests sent directly,
to compare. Prints one JSON object for tests/anthropic_batches.rs to check.

    python anthropic_batches.py BASE_URL MODEL
"""
import json
import sys
import time

import anthropic

base, model = sys.argv[1], sys.argv[2]
client = anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0)
out = {}

asks = {
    "colour": "Name a colour of the rainbow.",
    "count": "Count from one to five.",
}
params = {
    cid: {
        "model": model,
        "max_tokens": 16,
        "temperature": 0,
        "messages": [{"role": "user", "content": ask}],
    }
    for cid, ask in asks.items()
}
requests = [{"custom_id": cid, "params": p} for cid, p in params.items()]
# A model this server does not serve: the request errors, the batch goes on.
requests.append(
    {
        "custom_id": "nope",
        "params": {
            "model": "claude-nope",
            "max_tokens": 4,
            "messages": [{"role": "user", "content": "Hi"}],
        },
    }
)
batch = client.messages.batches.create(requests=requests)
out["created"] = json.loads(batch.model_dump_json())
deadline = time.time() + 180
while batch.processing_status != "ended":
    assert time.time() < deadline, batch
    time.sleep(0.2)
    batch = client.messages.batches.retrieve(batch.id)
out["ended"] = json.loads(batch.model_dump_json())

results = {}
for r in client.messages.batches.results(batch.id):
    entry = {"type": r.result.type}
    if r.result.type == "succeeded":
        m = r.result.message
        entry["text"] = "".join(b.text for b in m.content if b.type == "text")
        entry["usage"] = m.usage.model_dump()
        entry["stop_reason"] = m.stop_reason
    elif r.result.type == "errored":
        entry["error_type"] = r.result.error.error.type
    results[r.custom_id] = entry
out["results"] = results

direct = {}
for cid, p in params.items():
    m = client.messages.create(**{k: v for k, v in p.items() if k != "temperature"},
                               extra_body={"temperature": 0})
    direct[cid] = {
        "text": "".join(b.text for b in m.content if b.type == "text"),
        "usage": m.usage.model_dump(),
        "stop_reason": m.stop_reason,
    }
out["direct"] = direct

out["listed"] = [b.id for b in client.messages.batches.list(limit=20)]
deleted = client.messages.batches.delete(batch.id)
out["deleted"] = json.loads(deleted.model_dump_json())
try:
    client.messages.batches.retrieve(batch.id)
    out["after_delete"] = "found"
except anthropic.NotFoundError as e:
    out["after_delete"] = e.status_code
print(json.dumps(out))
