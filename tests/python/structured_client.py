"""Structured output and tools through the official `openai` package, as agent code uses them.

Usage: python tests/python/structured_client.py BASE_URL MODEL
Prints one JSON object with what it saw; exits non-zero on any failure.
"""
import json
import sys
from enum import Enum
from typing import List

import jsonschema
import openai
from pydantic import BaseModel, Field

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base + "/v1", api_key="unused")


class Genre(str, Enum):
    drama = "drama"
    comedy = "comedy"
    documentary = "documentary"


class Person(BaseModel):
    name: str
    age: int


class Film(BaseModel):
    title: str = Field(max_length=60)
    year: int
    genre: Genre
    director: Person
    # Bounded: a 135M model repeats list items until max_tokens otherwise.
    tags: List[str] = Field(max_length=3)


# 1. chat.completions.parse with a pydantic model (strict schema built by the client).
parsed = client.chat.completions.parse(
    model=model,
    messages=[{"role": "user", "content": "Describe a film as JSON."}],
    response_format=Film,
    max_tokens=160,
    temperature=0,
)
film = parsed.choices[0].message.parsed
assert isinstance(film, Film), parsed

# 2. A strict schema with nested objects, arrays, enums and required fields, 20 prompts at
# temperature 1, each reply checked with jsonschema.
# Every string, list and number is bounded, so each reply fits in max_tokens and all 20 are
# checked (a 135M model at temperature 1 otherwise rambles inside strings).
schema = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100},
                   "maxItems": 4},
        "active": {"type": "boolean"},
    },
    "required": ["name", "role", "address", "scores", "active"],
    "additionalProperties": False,
}
subjects = ["a teacher", "a pilot", "a chef", "a child", "an astronaut", "a farmer", "a poet",
            "a nurse", "a judge", "a painter", "a sailor", "a baker", "a miner", "a dancer",
            "a coder", "a monk", "a tailor", "a singer", "a doctor", "a guard"]
valid, cut = 0, 0
for i, who in enumerate(subjects):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Make up a user record for {who}."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "user", "strict": True, "schema": schema}},
        temperature=1, seed=i, max_tokens=300,
    )
    c = r.choices[0]
    if c.finish_reason == "length":
        cut += 1
        continue
    jsonschema.validate(json.loads(c.message.content), schema)
    valid += 1

# 3. json_object output parses.
objects = 0
for i in range(3):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Give me a JSON object about a dog."}],
        response_format={"type": "json_object"}, temperature=1, seed=i, max_tokens=120,
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
        objects += 1

# 4. Tools: a required call validates against its schema, streamed deltas add up to it.
params = {"type": "object", "properties": {"city": {"type": "string"},
          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
          "required": ["city", "unit"], "additionalProperties": False}
tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
          "parameters": params, "strict": True}}]
msgs = [{"role": "user", "content": "What is the weather in Oslo?"}]
r = client.chat.completions.create(model=model, messages=msgs, tools=tools, tool_choice="required",
                                   parallel_tool_calls=False, temperature=0, max_tokens=80)
call = r.choices[0].message.tool_calls[0]
jsonschema.validate(json.loads(call.function.arguments), params)
streamed = {"name": "", "arguments": ""}
for chunk in client.chat.completions.create(model=model, messages=msgs, tools=tools,
                                             tool_choice="required", parallel_tool_calls=False,
                                             temperature=0, max_tokens=80, stream=True):
    for d in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
        if d.function and d.function.name:
            streamed["name"] += d.function.name
        if d.function and d.function.arguments:
            streamed["arguments"] += d.function.arguments

# 5. The round trip: the result goes back as a `tool` message, the model answers in text.
final = client.chat.completions.create(
    model=model, tools=tools, tool_choice="none", temperature=0, max_tokens=40,
    messages=msgs + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "{\"temperature\": -3, \"unit\": \"celsius\"}"},
    ],
)

# 6. Fail closed: an unsupported keyword is a 400 naming the field.
try:
    client.chat.completions.create(
        model=model, messages=msgs, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}})
    refused = None
except openai.BadRequestError as e:
    refused = e.body.get("param") if isinstance(e.body, dict) else str(e.body)

print(json.dumps({
    "film": film.model_dump(mode="json"),
    "valid": valid, "cut": cut, "objects": objects,
    "call": {"name": call.function.name, "arguments": call.function.arguments},
    "finish_reason": r.choices[0].finish_reason,
    "streamed": streamed,
    "final_text": final.choices[0].message.content,
    "final_calls": final.choices[0].message.tool_calls,
    "refused_param": refused,
}))
