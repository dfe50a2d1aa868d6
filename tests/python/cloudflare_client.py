"""The official `cloudflare` package's Workers AI client against the server: `ai.run` with
messages and with a prompt, streaming (through the SDK's raw-response interface), a tool
call, JSON mode, embeddings, and errors in Cloudflare's envelope. Prints one JSON object for
tests/api_surfaces.rs to check.

    python cloudflare_client.py BASE_URL MODEL_ALIAS
"""
import json
import sys

import cloudflare

base, model = sys.argv[1], sys.argv[2]
client = cloudflare.Cloudflare(
    api_token="unused", base_url=base.rstrip("/") + "/client/v4", max_retries=0
)
account = "0123456789abcdef"
out = {}

ask = [{"role": "system", "content": "You are brief."},
       {"role": "user", "content": "Name three colours of the rainbow."}]
r = client.ai.run(model, account_id=account, messages=ask, max_tokens=24, temperature=0)
out["text"] = r["response"]
out["usage"] = r["usage"]

# Streaming: the SDK hands over the raw response; its lines are `data: {...}` events.
with client.ai.with_streaming_response.run(
    model, account_id=account, messages=ask, max_tokens=24, temperature=0, stream=True
) as resp:
    out["stream_content_type"] = resp.headers.get("content-type")
    pieces, events, done = [], [], False
    for line in resp.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
            continue
        ev = json.loads(data)
        events.append(ev)
        pieces.append(ev.get("response", ""))
out["streamed"] = "".join(pieces)
out["stream_done"] = done
out["stream_usage"] = events[-1].get("usage") if events else None

r = client.ai.run(model, account_id=account, prompt="The capital of France is",
                  max_tokens=8, temperature=0)
out["prompt_text"] = r["response"]
r = client.ai.run(model, account_id=account, prompt="The capital of France is",
                  raw=True, max_tokens=8, temperature=0)
out["raw_text"] = r["response"]
out["raw_usage"] = r["usage"]

tools = [{"name": "get_weather", "description": "Current weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                         "required": ["city"]}}]
r = client.ai.run(model, account_id=account, max_tokens=64, temperature=0, tools=tools,
                  messages=[{"role": "user", "content": "What is the weather in Paris? Use the tool."}],
                  extra_body={"tool_choice": "required"})
out["tool_calls"] = r.get("tool_calls")

r = client.ai.run(model, account_id=account, max_tokens=64, temperature=0,
                  messages=[{"role": "user", "content": "Give a city and its country as JSON."}],
                  response_format={"type": "json_schema", "json_schema": {
                      "type": "object",
                      "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
                      "required": ["city", "country"]}})
out["json_response"] = r["response"]

# An embedding model's input: `text` (one string or several).
r = client.ai.run(model, account_id=account, text=["The cat sat on the mat.", "Markets fell."])
out["embedding_shape"] = r["shape"]
out["embedding_pooling"] = r.get("pooling")
out["embeddings"] = r["data"]


def error_of(call):
    try:
        call()
        return None
    except cloudflare.APIStatusError as e:
        return {"status": e.status_code, "body": e.body}


out["unknown_model"] = error_of(lambda: client.ai.run(
    "@cf/nobody/no-such-model", account_id=account, prompt="hi"))
out["bad_temperature"] = error_of(lambda: client.ai.run(
    model, account_id=account, prompt="hi", temperature=7))
out["no_input"] = error_of(lambda: client.ai.run(model, account_id=account, max_tokens=4))
out["bad_pooling"] = error_of(lambda: client.ai.run(
    model, account_id=account, text="hi", extra_body={"pooling": "cls"}))
print(json.dumps(out))
