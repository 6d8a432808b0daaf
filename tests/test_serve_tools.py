"""An agent's tool loop against `pymoe serve` through the openai client, streamed and
whole: tool_choice auto, required and a named function (a constrained call, even from
the 135M demo model), the tool's result in the history, and the answer after it."""
import json

import pytest

from test_chat_template import QWEN25, WEATHER
from test_serve import Server

openai = pytest.importorskip("openai")
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}}, "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(smollm2_path):
    s = Server(smollm2_path, "--chat-template-file", QWEN25, ctx=2048)
    yield s
    code, log = s.stop()
    assert code == 0, log


def streamed_message(chunks):
    """The message a client puts together from stream chunks, and the finish reason."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or ():
            one = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
            one["id"] = one["id"] or call.id
            one["name"] += call.function.name or ""
            one["arguments"] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("choice, name", [("required", "get_weather"),
                                          ({"type": "function", "function": {"name": "get_time"}}, "get_time")])
def test_a_required_or_named_tool_call_is_a_valid_call_streamed_and_whole(server, choice, name):
    args = dict(model="m", messages=ASK, tools=[WEATHER, TIME], tool_choice=choice, temperature=0, max_tokens=80,
                parallel_tool_calls=False)
    whole = server.client.chat.completions.create(**args)
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls" and not message.content
    assert len(message.tool_calls) == 1  # parallel_tool_calls false: one call at most
    assert message.tool_calls[0].function.name == name and message.tool_calls[0].id.startswith("call_")
    assert json.loads(message.tool_calls[0].function.arguments)["city"] in ("Paris", "Rome")
    content, calls, finish = streamed_message(server.client.chat.completions.create(**args, stream=True))
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in message.tool_calls]


def test_the_tool_result_goes_back_and_the_model_answers(server):
    call = server.client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], tool_choice="required",
                                                 temperature=0, max_tokens=80).choices[0].message
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in call.tool_calls]},
                     {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": "sunny, 21 C"}]
    answer = server.client.chat.completions.create(model="m", messages=history, tools=[WEATHER], tool_choice="none",
                                                   temperature=0, max_tokens=24)
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.choices[0].message.content
    assert not answer.choices[0].message.tool_calls
    streamed = server.client.chat.completions.create(model="m", messages=history, tools=[WEATHER], tool_choice="none",
                                                     temperature=0, max_tokens=24, stream=True)
    assert streamed_message(streamed)[0] == answer.choices[0].message.content
    # auto: whatever the model writes comes back as content or calls, never a 4xx/5xx
    auto = server.client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], temperature=0,
                                                 max_tokens=24)
    assert auto.choices[0].message.content or auto.choices[0].message.tool_calls


@pytest.mark.parametrize("choice", [{"type": "function", "function": "get_weather"}, {"type": "function"},
                                    {"type": "code"}, "sometimes", 3])
def test_a_malformed_tool_choice_is_a_400_naming_it(server, choice):
    status, body = server.request("/v1/chat/completions", {"messages": ASK, "tools": [WEATHER],
                                                           "tool_choice": choice})
    assert status == 400 and body["error"]["param"] == "tool_choice"


def test_a_reply_cut_inside_a_call_is_a_partial_call_with_finish_length(server):
    whole = server.client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], tool_choice="required",
                                                  temperature=0, max_tokens=8)
    assert whole.choices[0].finish_reason == "length"
    assert not (whole.choices[0].message.content or "").startswith("<tool_call>")  # not the raw markup
    content, calls, finish = streamed_message(server.client.chat.completions.create(
        model="m", messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=8, stream=True))
    assert finish == "length" and not content.startswith("<tool_call>")


def test_props_say_what_the_template_can_do(server):
    status, props = server.request("/props")
    assert status == 200 and props["chat_template_caps"]["supports_tools"] is True
    assert "<tool_call>" in props["chat_template"]


@pytest.mark.parametrize("origin, allowed", [("http://localhost:3000", True), ("http://127.0.0.1", True),
                                             ("http://[::1]:8080", True), ("http://evil.example", False),
                                             ("http://localhost.evil.example", False)])
def test_browser_pages_on_this_machine_may_call_the_api_others_may_not(server, origin, allowed):
    import urllib.request
    preflight = urllib.request.Request(server.url + "/v1/chat/completions", method="OPTIONS", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "Authorization"})
    with urllib.request.urlopen(preflight, timeout=30) as r:
        assert r.status == 200
        assert (r.headers.get("Access-Control-Allow-Origin") == origin) is allowed
        assert ("Access-Control-Allow-Methods" in r.headers) is allowed
        assert (r.headers.get("Access-Control-Allow-Headers") == "Authorization") is allowed  # "*" would not do
    get = urllib.request.Request(server.url + "/v1/models", headers={"Origin": origin})
    with urllib.request.urlopen(get, timeout=30) as r:
        assert (r.headers.get("Access-Control-Allow-Origin") == origin) is allowed
