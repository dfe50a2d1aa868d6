"""The official `openai` package's Responses API against the server: three turns chained by
`previous_response_id`, streaming, a function-call round trip, `text.format` json_schema,
input items, cancel, a background response polled to its end, retrieve and delete. Prints one JSON object for tests/api_surfaces.rs to check.

    python responses_client.py BASE_URL MODEL
"""
import json
import sys
import time

import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base.rstrip("/") + "/v1", api_key="unused", max_retries=0)
out = {"turns": []}


def error_status(call, error):
    """None if `call()` succeeds, else the status code of the `error` it raised."""
    try:
        call()
        return None
    except error as e:
        return e.status_code


prev = None
for text in ["My name is Ada and I like tea.", "What do I like to drink?", "And what is my name?"]:
    r = client.responses.create(model=model, input=text, previous_response_id=prev,
                                instructions="You are brief.", max_output_tokens=24, temperature=0)
    out["turns"].append({"id": r.id, "text": r.output_text, "status": r.status,
                         "usage": r.usage.model_dump(), "previous": r.previous_response_id})
    prev = r.id

events = []
with client.responses.create(model=model, input="Count to three.", max_output_tokens=16,
                             temperature=0, stream=True) as stream:
    for ev in stream:
        events.append(ev.type)
        if ev.type in ("response.completed", "response.incomplete"):
            final = ev.response
out["stream_events"] = events
out["stream_text"] = final.output_text
out["stream_id"] = final.id
again = client.responses.create(model=model, input="Count to three.", max_output_tokens=16,
                                temperature=0, store=False)
out["whole_text"] = again.output_text

tools = [{"type": "function", "name": "get_weather", "description": "Current weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                         "required": ["city"]}}]
call = client.responses.create(model=model, input="What is the weather in Paris?", tools=tools,
                               tool_choice="required", max_output_tokens=64, temperature=0)
calls = [o for o in call.output if o.type == "function_call"]
out["call"] = {"name": calls[0].name, "arguments": json.loads(calls[0].arguments)} if calls else None
answer = client.responses.create(
    model=model, previous_response_id=call.id, tools=tools, max_output_tokens=24, temperature=0,
    input=[{"type": "function_call_output", "call_id": calls[0].call_id if calls else "x",
            "output": "18 degrees and sunny"}])
out["answer_text"] = answer.output_text
out["answer_usage"] = answer.usage.model_dump()
out["call_usage"] = call.usage.model_dump()

with client.responses.stream(model=model, input="Weather in Rome?", tools=tools,
                             tool_choice="required", max_output_tokens=64, temperature=0) as s:
    streamed_call = s.get_final_response()
sc = [o for o in streamed_call.output if o.type == "function_call"]
out["streamed_call"] = {"name": sc[0].name, "arguments": json.loads(sc[0].arguments)} if sc else None
one = dict(model=model, input="Weather in Oslo?", tools=tools, tool_choice="required",
           parallel_tool_calls=False, max_output_tokens=64, temperature=0)
out["one_call_items"] = [o.type for o in client.responses.create(**one).output]
with client.responses.stream(**one) as s:
    out["streamed_one_call_items"] = [o.type for o in s.get_final_response().output]

js = client.responses.create(
    model=model, input="Give a city and its country.", max_output_tokens=64, temperature=0,
    text={"format": {"type": "json_schema", "name": "place", "strict": True, "schema": {
        "type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"], "additionalProperties": False}}})
out["json"] = json.loads(js.output_text)

# The third turn's input items: the conversation before its output, paged two at a time.
items = list(client.responses.input_items.list(out["turns"][2]["id"], limit=2, order="asc"))
out["input_items"] = [{"id": i.id, "type": i.type, "role": i.role,
                       "text": "".join(c.text for c in i.content)} for i in items]
newest = client.responses.input_items.list(out["turns"][2]["id"], limit=1)
out["newest_input_item"] = newest.data[0].id
out["newest_has_more"] = newest.has_more
out["answer_input_types"] = [i.type for i in client.responses.input_items.list(answer.id)]
out["cancel"] = error_status(lambda: client.responses.cancel(out["turns"][2]["id"]), openai.BadRequestError)

bg = client.responses.create(model=model, input="Name a color.", background=True,
                             max_output_tokens=8, temperature=0)
out["background_first"] = bg.status
deadline = time.time() + 60
while bg.status in ("queued", "in_progress") and time.time() < deadline:
    time.sleep(0.1)
    bg = client.responses.retrieve(bg.id)
out["background_end"] = bg.status
out["background_text"] = bg.output_text
out["background_cancel"] = error_status(lambda: client.responses.cancel(bg.id), openai.BadRequestError)

# Streamed in the background: a few events, then joined again after the last one read.
seen = []
with client.responses.create(model=model, input="Name a color.", background=True, stream=True,
                             max_output_tokens=8, temperature=0) as events:
    for e in events:
        seen.append(e)
        if len(seen) == 3:
            break
rest = list(client.responses.retrieve(seen[0].response.id, stream=True,
                                      starting_after=seen[-1].sequence_number))
out["background_stream"] = {"first": [e.type for e in seen],
                            "rest": [e.sequence_number for e in rest],
                            "end": rest[-1].type if rest else None}

scored = client.responses.create(model=model, input="Name a color.", max_output_tokens=4,
                                 temperature=0, include=["message.output_text.logprobs"],
                                 top_logprobs=2, store=False)
part = scored.output[0].content[0]
out["logprobs"] = [{"token": lp.token, "top": [t.token for t in lp.top_logprobs]}
                   for lp in part.logprobs]

got = client.responses.retrieve(out["turns"][0]["id"])
out["retrieved_text"] = got.output_text
out["deleted"] = client.responses.delete(out["turns"][0]["id"]) is None
out["after_delete"] = error_status(lambda: client.responses.retrieve(out["turns"][0]["id"]), openai.NotFoundError)
try:
    client.responses.create(model=model, input="hi", previous_response_id="resp_nope")
    out["unknown_previous"] = None
except openai.BadRequestError as e:
    out["unknown_previous"] = [e.status_code, e.code, e.param]
out["orphan_output"] = error_status(lambda: client.responses.create(model=model, input=[
    {"type": "function_call_output", "call_id": "call_nope", "output": "18 C"}]), openai.BadRequestError)
out["unstored"] = error_status(lambda: client.responses.retrieve(again.id), openai.NotFoundError)
print(json.dumps(out))
