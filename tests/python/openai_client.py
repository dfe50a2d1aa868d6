"""Drives a running edgeinfer server with the official `openai` package, as a client would.

Usage: python tests/python/openai_client.py BASE_URL MODEL
Prints one JSON object with what it saw; exits non-zero on any failure.
"""
import json
import sys

import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
messages = [{"role": "user", "content": "Name three colors."}]

whole = client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0)
text = whole.choices[0].message.content

parts, usage, finish = [], None, None
stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=20, temperature=0, stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.content:
            parts.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason

# The completions API as evaluation harnesses call it: token ids, echo, logprobs.
ids = [504, 3575, 282, 4649, 314]
scored = client.completions.create(
    model=model, prompt=[ids], echo=True, logprobs=1, max_tokens=1, temperature=0
).choices[0].logprobs
several = client.chat.completions.create(
    model=model, messages=messages, max_tokens=4, temperature=0, n=2
)

models = [m.id for m in client.models.list()]
retrieved = client.models.retrieve(model).id
try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    not_found = None
except openai.NotFoundError as e:
    not_found = e.status_code
try:
    client.chat.completions.create(model=model, messages=messages, temperature=9)
    bad_request = None
except openai.BadRequestError as e:
    bad_request = e.status_code

# The client asks for base64 unless told (and decodes it); floats when asked.
texts = ["The cat sat on the mat.", "Stock markets fell sharply today."]
packed = client.embeddings.create(model=model, input=texts)
floats = client.embeddings.create(model=model, input=texts, encoding_format="float")

print(json.dumps({
    "embeddings": [d.embedding for d in packed.data],
    "float_embeddings": [d.embedding for d in floats.data],
    "embedding_usage": packed.usage.model_dump(),
    "text": text,
    "streamed": "".join(parts),
    "finish_reason": whole.choices[0].finish_reason,
    "stream_finish_reason": finish,
    "usage": whole.usage.model_dump(),
    "stream_usage": usage.model_dump() if usage else None,
    "models": models,
    "retrieved": retrieved,
    "not_found": not_found,
    "bad_request": bad_request,
    "scored": {
        "tokens": len(scored.tokens),
        "token_logprobs": scored.token_logprobs,
        "top_logprobs": len(scored.top_logprobs),
        "text_offset": scored.text_offset,
    },
    "choices": [[c.index, c.message.content] for c in several.choices],
}))
