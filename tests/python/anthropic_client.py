"""The official `anthropic` package against the server: messages, streaming, count_tokens, a
tool round trip (whole and streamed) and errors in Anthropic's envelope. Prints one JSON
object for tests/api_surfaces.rs to check.

    python anthropic_client.py BASE_URL MODEL
"""
import json
import sys
import urllib.error
import urllib.request

import anthropic

base, model = sys.argv[1], sys.argv[2]
client = anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0)
out = {}
# Sampling settings are no longer parameters of the SDK's create(); they go in the body.
T0 = {"temperature": 0}

ask = [{"role": "user", "content": "Name three colours of the rainbow."}]
whole = client.messages.create(
    model=model, max_tokens=24, extra_body=T0, system="You are brief.", messages=ask
)
out["text"] = "".join(b.text for b in whole.content if b.type == "text")
out["stop_reason"] = whole.stop_reason
out["usage"] = whole.usage.model_dump()
out["id"] = whole.id

with client.messages.stream(
    model=model, max_tokens=24, extra_body=T0, system="You are brief.", messages=ask
) as s:
    out["streamed"] = "".join(s.text_stream)
    final = s.get_final_message()
out["stream_stop_reason"] = final.stop_reason
out["stream_usage"] = final.usage.model_dump()

# A stop sequence ends the message and is named, whole and streamed ("e" comes early in
# any English reply; the other never matches).
stops = ["zzz-never", "e"]
stopped = client.messages.create(
    model=model, max_tokens=48, extra_body=T0, stop_sequences=stops, messages=ask
)
out["stop"] = {
    "text": "".join(b.text for b in stopped.content if b.type == "text"),
    "stop_reason": stopped.stop_reason,
    "stop_sequence": stopped.stop_sequence,
}
with client.messages.stream(
    model=model, max_tokens=48, extra_body=T0, stop_sequences=stops, messages=ask
) as s:
    text = "".join(s.text_stream)
    final = s.get_final_message()
out["stream_stop"] = {
    "text": text,
    "stop_reason": final.stop_reason,
    "stop_sequence": final.stop_sequence,
}

out["count"] = client.messages.count_tokens(
    model=model, system="You are brief.", messages=ask
).input_tokens

tools = [{
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}]
weather = [{"role": "user", "content": "What is the weather in Paris?"}]
call = client.messages.create(
    model=model, max_tokens=64, extra_body=T0, tools=tools,
    tool_choice={"type": "tool", "name": "get_weather"}, messages=weather,
)
uses = [b for b in call.content if b.type == "tool_use"]
out["call_stop_reason"] = call.stop_reason
out["call"] = {"name": uses[0].name, "input": uses[0].input, "id": uses[0].id} if uses else None

with client.messages.stream(
    model=model, max_tokens=64, extra_body=T0, tools=tools,
    tool_choice={"type": "tool", "name": "get_weather"}, messages=weather,
) as s:
    streamed_call = s.get_final_message()
su = [b for b in streamed_call.content if b.type == "tool_use"]
out["streamed_call"] = {"name": su[0].name, "input": su[0].input} if su else None

# The round trip: the call and its result go back; the model answers in text.
answer = client.messages.create(
    model=model, max_tokens=32, extra_body=T0, tools=tools,
    messages=weather + [
        {"role": "assistant", "content": [u.model_dump() for u in uses]},
        {"role": "user", "content": [{
            "type": "tool_result", "tool_use_id": uses[0].id if uses else "x",
            "content": "18 degrees and sunny",
        }]},
    ],
)
out["answer_blocks"] = [b.type for b in answer.content]
out["answer_stop_reason"] = answer.stop_reason
out["answer_usage"] = answer.usage.model_dump()

try:
    client.messages.create(model="no-such-model", max_tokens=8, messages=ask)
    out["not_found"] = None
except anthropic.NotFoundError as e:
    out["not_found"] = {"status": e.status_code, "body": e.body}
try:
    client.messages.create(model=model, max_tokens=8, extra_body={"temperature": 3}, messages=ask)
    out["bad_request"] = None
except anthropic.BadRequestError as e:
    out["bad_request"] = {"status": e.status_code, "body": e.body}

req = urllib.request.Request(
    base.rstrip("/") + "/v1/messages", data=b"{not json", method="POST",
    headers={"content-type": "application/json", "x-api-key": "unused"},
)
try:
    urllib.request.urlopen(req)
    out["bad_json"] = None
except urllib.error.HTTPError as e:
    out["bad_json"] = {"status": e.code, "body": json.loads(e.read())}

print(json.dumps(out))
