"""Scores and score changes in `pymoe serve` through the openai client: a
chat's logprobs.content and a completion's tokens / token_logprobs /
top_logprobs / text_offset, whole and streamed, from a plain server and a
speculative one (the tokens are the text, greedy picks the most likely, a
speculative server reports what a plain one does); logit_bias and the
penalties change the answer the same way on both."""
import json
import math

import pytest

from pymoe.cli.serve_api import LogprobsWriter
from pymoe.cli.serve_engine import Scored
from test_serve import Server

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

ASK = [{"role": "user", "content": "Name three colours."}]
# SmolLM2's Q4_1 rows differ by up to ~0.1 in log probability between a batch and one token (a second request
# feeds only its prompt's last token again, a verify batch holds several): the exact comparison is
# tests/test_logprobs.py's, on F32 models
QUANTIZED = 0.25
SCHEMA = {"type": "object", "properties": {"colours": {"type": "array", "items": {"type": "string",
                                                                                  "maxLength": 10},
                                                       "maxItems": 3}},
          "required": ["colours"], "additionalProperties": False}


@pytest.fixture(scope="module", params=["plain", "draft model"])
def server(request, smollm2_path):
    draft = {"plain": (), "draft model": ("-d", smollm2_path)}[request.param]
    s = Server(smollm2_path, *draft, ctx=1024)
    yield s
    code, log = s.stop()
    assert code == 0, log


SAME_REQUESTS = {  # sent to a plain, a lookup and a draft-model server: the answers must agree
    "logprobs": ("/v1/chat/completions", {"messages": ASK, "temperature": 0, "max_tokens": 40, "logprobs": True,
                                          "top_logprobs": 2}),
    "penalized": ("/v1/completions", {"prompt": "List fruits: apple, pear, apple, plum, apple,", "temperature": 0,
                                      "max_tokens": 30, "frequency_penalty": 1.0, "presence_penalty": 0.5,
                                      "repeat_penalty": 1.2, "repeat_last_n": 16, "logit_bias": {"28": 3}})}


@pytest.fixture(scope="module")
def three_servers(smollm2_path):
    """Each of SAME_REQUESTS' replies from each server, by server and request name."""
    got = {}
    for name, draft in (("plain", ()), ("ngram", ("-d", "ngram")), ("draft model", ("-d", smollm2_path))):
        s = Server(smollm2_path, *draft, ctx=1024)
        try:
            got[name] = {}
            for what, (path, body) in SAME_REQUESTS.items():
                status, reply = s.request(path, body)
                assert status == 200, reply
                got[name][what] = reply
        finally:
            s.stop()
    return got


def check_greedy_entry(entry, n_top):
    """A chat entry: its bytes are its token, its alternatives the most likely first, greedy chose the first."""
    assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
    assert entry.logprob <= 0 and len(entry.top_logprobs) == n_top
    values = [t.logprob for t in entry.top_logprobs]
    assert values == sorted(values, reverse=True) and sum(math.exp(v) for v in values) <= 1 + 1e-5
    assert entry.top_logprobs[0].bytes == entry.bytes and entry.top_logprobs[0].logprob == entry.logprob


def test_a_chats_logprobs_are_its_tokens_whole_and_streamed(server):
    args = dict(model="m", messages=ASK, temperature=0, max_tokens=40, logprobs=True, top_logprobs=3)
    whole = server.client.chat.completions.create(**args)
    choice = whole.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == whole.usage.completion_tokens
    assert b"".join(bytes(e.bytes) for e in entries).decode() == choice.message.content
    for e in entries:
        check_greedy_entry(e, 3)
    streamed = []
    for chunk in server.client.chat.completions.create(**args, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content
    assert [e.bytes for e in streamed] == [e.bytes for e in entries]
    assert all(abs(a.logprob - b.logprob) < QUANTIZED for a, b in zip(streamed, entries))
    plain = server.client.chat.completions.create(model="m", messages=ASK, temperature=0, max_tokens=40)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == choice.message.content
    only = server.client.chat.completions.create(model="m", messages=ASK, temperature=0, max_tokens=5,
                                                 logprobs=True)
    assert all(e.top_logprobs == [] for e in only.choices[0].logprobs.content)


def test_a_completions_logprobs_are_its_tokens_whole_and_streamed(server):
    args = dict(model="m", prompt="The colours of the rainbow are", temperature=0, max_tokens=30, logprobs=2)
    whole = server.client.completions.create(**args)
    lp, text = whole.choices[0].logprobs, whole.choices[0].text
    assert "".join(lp.tokens) == text and len(lp.tokens) == whole.usage.completion_tokens > 5
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 2 and max(top.values()) == value and top[token] == value  # greedy: the likeliest
    tokens, values = [], []
    for chunk in server.client.completions.create(**args, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            tokens += chunk.choices[0].logprobs.tokens
            values += chunk.choices[0].logprobs.token_logprobs
            assert chunk.choices[0].logprobs.text_offset[0] == len("".join(tokens[:-len(
                chunk.choices[0].logprobs.tokens)]))
    assert tokens == lp.tokens and all(abs(a - b) < QUANTIZED for a, b in zip(values, lp.token_logprobs))


def test_logprobs_of_a_constrained_answer_and_of_sampled_tokens(server):
    reply = server.client.chat.completions.create(
        model="m", messages=ASK, max_tokens=80, logprobs=True, top_logprobs=1, temperature=1.0, seed=4,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}})
    content = reply.choices[0].message.content
    assert isinstance(json.loads(content), dict)
    entries = reply.choices[0].logprobs.content
    # every generated token is reported: here the template's format wrote the JSON in a fenced block, which
    # the reply's parser took off the content
    assert content in b"".join(bytes(e.bytes) for e in entries).decode()
    # reported from the model's own distribution: the constraint and the sampling choose, they do not rescale
    assert all(e.logprob <= e.top_logprobs[0].logprob for e in entries)


def test_a_speculative_server_reports_what_a_plain_one_does(three_servers):
    got = {name: replies["logprobs"]["choices"][0]["logprobs"]["content"] for name, replies in three_servers.items()}
    for name in ("ngram", "draft model"):
        assert [e["token"] for e in got[name]] == [e["token"] for e in got["plain"]]
        worst = max(abs(a["logprob"] - b["logprob"]) for a, b in zip(got[name], got["plain"]))
        assert worst < QUANTIZED, (name, worst)


def test_logit_bias_and_the_penalties_shape_the_answer(server):
    prompt = "Repeat after me: apple apple apple apple apple"
    args = dict(model="m", prompt=prompt, temperature=0, max_tokens=12)
    base = server.client.completions.create(**args).choices[0].text
    bang = server.client.completions.create(**args, logit_bias={"17": 100}).choices[0].text
    assert bang == "!" * 12  # token 17 is "!" in SmolLM2's vocabulary
    banned = server.client.completions.create(**dict(args, max_tokens=40), logit_bias={"17": -100}).choices[0].text
    assert "!" not in banned
    tokens = server.request("/tokenize", {"content": base})[1]["tokens"]
    never = {str(t): False for t in tokens}  # llama-server's false: never
    status, body = server.request("/v1/completions", {"prompt": prompt, "temperature": 0, "max_tokens": 12,
                                                      "logit_bias": never})
    assert status == 200 and not set(server.request("/tokenize", {"content": body["choices"][0]["text"]})[1][
        "tokens"]) & set(tokens)
    penalized = server.client.completions.create(**args, frequency_penalty=2, presence_penalty=2).choices[0].text
    assert penalized != base
    again = server.client.completions.create(**args, frequency_penalty=2, presence_penalty=2).choices[0].text
    assert again == penalized  # greedy, penalized: the same answer every time
    status, body = server.request("/v1/completions", {"prompt": prompt, "max_tokens": 2,
                                                      "logit_bias": {"49152": 1}})
    assert status == 400 and "outside the vocabulary" in body["error"]["message"]


def test_a_speculative_server_penalizes_as_a_plain_one_does(three_servers):
    got = {name: replies["penalized"]["choices"][0]["text"] for name, replies in three_servers.items()}
    assert got["ngram"] == got["plain"] and got["draft model"] == got["plain"], got


def test_a_completions_text_offsets_count_characters_of_the_generated_text():
    writer = LogprobsWriter(chat=False)
    euro = "\u20ac".encode()  # three bytes, split over two tokens
    first = writer.write([Scored(b"a", -0.1, []), Scored(euro[:2], -0.2, [])])
    second = writer.write([Scored(euro[2:], -0.3, [(b"x", -1.0)]), Scored(b"b", float("-inf"), [])])
    assert first["text_offset"] == [0, 1] and second["text_offset"] == [1, 2]  # "a", "€", "b"
    assert second["token_logprobs"] == [-0.3, -9999.0] and second["top_logprobs"][0] == {"x": -1.0}
    assert json.loads(json.dumps(second, allow_nan=False)) == second
