"""Structured output from `pymoe serve` through the openai client: response_format
json_schema (what LangChain and the OpenAI Agents SDK send) and json_object, streamed
and whole, from a plain server and a speculative one, every sampled answer valid;
llama-server's grammar field; a required tool call with a draft; bad constraints are
400s naming what is wrong."""
import json

import pytest

from test_chat_template import QWEN25, WEATHER
from test_serve_tools import ASK as TOOL_ASK
from test_constrained import conforms
from test_serve import Server

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

CITY = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 20},
    "country": {"enum": ["France", "Italy", "Spain"]},
    "population_millions": {"type": "number"},
    "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 3}},
    "required": ["city", "country", "population_millions", "landmarks"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Describe Paris as JSON."}]
FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}


@pytest.fixture(scope="module", params=["plain", "ngram", "draft model"])
def server(request, smollm2_path):
    draft = {"plain": (), "ngram": ("-d", "ngram"), "draft model": ("-d", smollm2_path)}[request.param]
    s = Server(smollm2_path, "--chat-template-file", QWEN25, *draft, ctx=2048)
    s.draft = request.param
    yield s
    code, log = s.stop()
    assert code == 0, log


def streamed_text(chunks):
    text, finish = "", None
    for chunk in chunks:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


def test_every_sampled_answer_to_a_json_schema_is_valid_streamed_and_whole(server):
    for seed in range(3):
        args = dict(model="m", messages=ASK, response_format=FORMAT, temperature=1.0, seed=seed, max_tokens=300)
        whole = server.client.chat.completions.create(**args)
        assert whole.choices[0].finish_reason == "stop"
        assert conforms(json.loads(whole.choices[0].message.content), CITY), whole.choices[0].message.content
        text, finish = streamed_text(server.client.chat.completions.create(**args, stream=True))
        assert finish == "stop" and conforms(json.loads(text), CITY), text
        if server.draft == "plain":  # same seed, same answer (a loop's rounds also follow what auto learned)
            assert text == whole.choices[0].message.content


def test_json_object_is_a_json_object_and_a_completion_follows_a_gbnf_grammar(server):
    reply = server.client.chat.completions.create(model="m", messages=ASK, response_format={"type": "json_object"},
                                                  temperature=0, max_tokens=200)
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    status, body = server.request("/v1/completions", {"prompt": "Is Paris in France? Answer:", "temperature": 0.7,
                                                      "grammar": 'root ::= (" yes" | " no") "."', "max_tokens": 20})
    assert status == 200 and body["choices"][0]["text"] in (" yes.", " no."), body
    status, body = server.request("/v1/completions", {"prompt": "A number:", "json_schema": {"type": "integer"},
                                                      "max_tokens": 30})
    assert status == 200 and isinstance(json.loads(body["choices"][0]["text"]), int), body


def test_the_openai_clients_parse_helper_gets_its_pydantic_model(server):
    pydantic = pytest.importorskip("pydantic")

    class City(pydantic.BaseModel):
        city: str
        country: str

    parsed = server.client.chat.completions.parse(model="m", messages=ASK, response_format=City, temperature=0,
                                                  max_tokens=200)
    assert isinstance(parsed.choices[0].message.parsed, City)


def test_a_required_tool_call_is_made_with_a_draft_too(server):
    reply = server.client.chat.completions.create(model="m", messages=TOOL_ASK, tools=[WEATHER],
                                                  tool_choice="required", temperature=0, max_tokens=80,
                                                  parallel_tool_calls=False)
    call = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in ("Paris", "Rome")


@pytest.mark.parametrize("body, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}},
     "cannot resolve $ref"),
    ({"grammar": "root ::= ("}, "grammar"),
    ({"grammar": 7}, "grammar must be GBNF"),
    ({"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, "one constraint"),
    ({"response_format": {"type": "json_object"}, "tools": [WEATHER]}, "tools")])
def test_a_bad_constraint_is_a_400_naming_it(server, body, words):
    status, answer = server.request("/v1/chat/completions", {"messages": ASK, "max_tokens": 8, **body})
    assert status == 400 and words in answer["error"]["message"], answer
    status, _ = server.request("/v1/chat/completions", {"messages": ASK, "max_tokens": 2})
    assert status == 200  # and the server goes on
