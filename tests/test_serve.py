"""`pymoe serve` as a subprocess on tiny models, driven by the real openai
client and by raw HTTP: answers, streaming, prefix reuse, errors, the queue,
disconnects, a bounded load test and a clean Ctrl-C."""
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

import pymoe
import tiny_models
from conftest import SANITIZED
from pymoe.cli.serve_cache import PromptCache
from pymoe.cli.serve_engine import Engine, Request, common_prefix

openai = pytest.importorskip("openai")

EXACT = ("--flash-attn", "off", "--cache-type-k", "f32", "--cache-type-v", "f32")


class Server:
    """pymoe serve on a free port; stop() sends SIGINT and returns (exit code, stderr)."""

    def __init__(self, model, *args, ctx=512):
        self.process = subprocess.Popen(
            [sys.executable, "-P", "-m", "pymoe", "serve", "-m", str(model), "--port", "0", "--ctx", str(ctx),
             "-t", "2", "--temp", "0", *EXACT, *map(str, args)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines = []
        ready = threading.Event()

        def read():
            for line in self.process.stderr:
                self.lines.append(line)
                if "listening on http" in line:
                    ready.set()
            ready.set()
        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        ready.wait(60)
        found = re.search(r"listening on (http://[\d.]+:\d+)", "".join(self.lines))
        if not found:
            self.process.kill()
            raise AssertionError("the server did not start: " + "".join(self.lines))
        self.url = found.group(1)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)

    def request(self, path, body=None, headers=None, method=None):
        """(status, parsed JSON body) of one raw HTTP request."""
        data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def rss_kib(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        code = self.process.wait(30)
        self.reader.join(10)
        return code, "".join(self.lines)


@pytest.fixture(scope="module")
def chat_model(model_dir):
    return tiny_models.write_model(model_dir / "serve-dense.gguf", tiny_models.DENSE, chat_template=tiny_models.CHATML)


@pytest.fixture(scope="module")
def server(chat_model):
    s = Server(chat_model)
    yield s
    code, log = s.stop()
    assert code == 0, log
    assert "stopped after" in log


def greedy_text(model_path, prompt, n):
    with pymoe.Model(model_path) as m, m.session(n_ctx=512, n_threads=2, flash_attn="off", cache_type_k="f32",
                                                  cache_type_v="f32") as s:
        return "".join(t.text for t in s.generate(prompt, max_tokens=n, sampling=pymoe.SamplingParams.greedy()))


def test_completions_are_the_plain_greedy_text_streamed_or_not(server, chat_model):
    expected = greedy_text(chat_model, "The quick brown fox", 12)
    whole = server.client.completions.create(model="any", prompt="The quick brown fox", max_tokens=12, temperature=0)
    assert whole.choices[0].text == expected
    assert whole.choices[0].finish_reason in ("length", "stop")
    assert whole.usage.completion_tokens == 12 or whole.choices[0].finish_reason == "stop"
    chunks = list(server.client.completions.create(model="any", prompt="The quick brown fox", max_tokens=12,
                                                   temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_chat_completions_streamed_and_not_agree(server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]
    whole = server.client.chat.completions.create(model="m", messages=messages, max_tokens=10, temperature=0)
    text = whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant" and text
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    stream = server.client.chat.completions.create(model="m", messages=messages, max_tokens=10, temperature=0,
                                                   stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # the usage chunk comes last
    assert chunks[-1].choices == []


def test_sampling_fields_are_used_and_a_seed_repeats(server):
    # top_k and min_p are not in the OpenAI API: the client sends them as extra fields
    ask = dict(model="m", prompt="Once upon a time", max_tokens=64, temperature=2.0, top_p=1.0,
               extra_body={"top_k": 0, "min_p": 0.0})
    a = server.client.completions.create(**ask, seed=5).choices[0].text
    b = server.client.completions.create(**ask, seed=5).choices[0].text
    others = {server.client.completions.create(**ask, seed=s).choices[0].text for s in range(6, 12)}
    assert a == b
    assert others - {a}, "six other seeds all gave the text of seed 5"


def test_a_stop_string_ends_the_text_before_it(server):
    ask = dict(model="m", prompt="Once upon a time", max_tokens=24, temperature=0)
    whole = server.client.completions.create(**ask).choices[0].text
    stop = whole.strip()[4:7]
    assert len(stop) == 3, whole
    cut = whole[:whole.index(stop)]
    for stream in (False, True):
        if stream:
            chunks = list(server.client.completions.create(**ask, stop=[stop], stream=True))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][-1]
        else:
            r = server.client.completions.create(**ask, stop=[stop]).choices[0]
            text, finish = r.text, r.finish_reason
        assert (text, finish) == (cut, "stop"), stream


def test_the_next_turn_feeds_only_what_is_new(server):
    first = [{"role": "user", "content": "Tell me about the sea."}]
    r1 = server.client.chat.completions.create(model="m", messages=first, max_tokens=12, temperature=0)
    second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "And the sky?"}]
    r2 = server.client.chat.completions.create(model="m", messages=second, max_tokens=12, temperature=0)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    fed = r2.usage.model_extra["pymoe"]["prompt_tokens_fed"]
    assert cached >= r1.usage.prompt_tokens  # the whole first prompt at least (and the reply, where it re-tokenizes)
    assert fed == r2.usage.prompt_tokens - cached
    assert fed <= r2.usage.prompt_tokens - r1.usage.prompt_tokens
    # the same request again: everything but the last prompt token stays
    r3 = server.client.chat.completions.create(model="m", messages=second, max_tokens=12, temperature=0)
    assert r3.usage.prompt_tokens_details.cached_tokens == r3.usage.prompt_tokens - 1
    assert r3.choices[0].message.content == r2.choices[0].message.content
    # a different conversation: only the common start is kept, and the answer is what a fresh context gives
    other = [{"role": "user", "content": "Tell me about the sea."}]
    r4 = server.client.chat.completions.create(model="m", messages=other, max_tokens=12, temperature=0)
    assert r4.choices[0].message.content == r1.choices[0].message.content


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"nam": "f"}}]},
     "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": []}, "chat_template_kwargs"),
    ({"messages": [{"role": "user", "content": "x"}], "reasoning_format": "hidden"}, "reasoning_format"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -2}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [1]}, "stop"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": 3}, "logprobs"),  # a chat's is true or false
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),  # without logprobs
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "echo": True}, "echo"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"x": 1}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 101}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": [[5]]}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": [[-1, 5]]}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"\u00b2": 1}}, "logit_bias"),  # a digit, not ASCII
    ({"messages": [{"role": "user", "content": "x"}], "frequency_penalty": 2.5}, "frequency_penalty"),
    ({"messages": [{"role": "user", "content": "x"}], "presence_penalty": "x"}, "presence_penalty"),
    ({"messages": [{"role": "user", "content": "x"}], "repeat_last_n": -2}, "repeat_last_n"),
    ({"messages": [{"role": "user", "content": "x"}], "repeat_penalty": 0}, "repeat_penalty"),
    ({"messages": [{"role": "user", "content": "x"}], "grammar": 7}, "grammar"),  # llama-server's field
    ({"messages": [{"role": "user", "content": "x"}], "temperature": float("nan")}, "temperature"),  # sent as NaN
    ({"messages": [{"role": "user", "content": "x"}], "min_p": float("inf")}, "min_p"),
    ({"messages": [{"role": "user", "content": "x"}], "top_k": 1000000000000}, "top_k"),  # past int32
])
def test_unsupported_or_bad_fields_are_a_400_that_names_them(server, body, param):
    status, reply = server.request("/v1/chat/completions", body)
    assert status == 400
    assert reply["error"]["param"] == param and reply["error"]["message"]


def test_bad_bodies_and_prompts_are_400s_and_the_server_carries_on(server):
    for body in (b"{not json", b"[1, 2]", b"\xff\xfe", b"[" * 100000 + b"]" * 100000):
        status, reply = server.request("/v1/completions", body)
        assert status == 400, reply
    status, reply = server.request("/v1/completions", {"prompt": "word " * 600})
    assert status == 400 and "context" in reply["error"]["message"]
    status, reply = server.request("/v1/completions", {"prompt": [1, 2, 10**9]})
    assert status == 400 and "vocabulary" in reply["error"]["message"]
    status, reply = server.request("/v1/nothing")
    assert status == 404 and reply["error"]["message"]
    status, reply = server.request("/v1/completions", b'{"prompt": "' + b"x" * (16 * 2**20) + b'"}')
    assert status == 413 and reply["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="context"):
        server.client.completions.create(model="m", prompt="word " * 600, stream=True)
    assert server.request("/health")[0] == 200
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["serve-dense.gguf"]


def test_the_endpoints_clients_probe(server, chat_model):
    status, reply = server.request("/tokenize", {"content": "<|im_start|>hello world", "with_pieces": True})
    with pymoe.Model(chat_model) as model:
        expected = model.tokenize("<|im_start|>hello world", add_special=False, parse_special=True)
        assert status == 200 and [t["id"] for t in reply["tokens"]] == expected
        assert [t["piece"] for t in reply["tokens"]] == [model.token_piece(t, render_special=True).decode()
                                                         for t in expected]
        with_bos = model.tokenize("hello", add_special=True, parse_special=True)
    assert server.request("/tokenize", {"content": "hello", "add_special": True})[1] == {"tokens": with_bos}
    status, reply = server.request("/detokenize", {"tokens": expected})
    assert status == 200 and reply["content"] == "<|im_start|>hello world"
    for path, body, param in (("/tokenize", {"content": 5}, "content"), ("/detokenize", {"tokens": [-1]}, "tokens"),
                              ("/detokenize", {"tokens": "abc"}, "tokens")):
        status, reply = server.request(path, body)
        assert status == 400 and reply["error"]["param"] == param, reply
    assert server.request("/tokenize", b"[1]")[0] == 400
    status, props = server.request("/props")
    assert status == 200 and props["default_generation_settings"]["n_ctx"] == 512
    assert props["default_generation_settings"]["params"]["repeat_last_n"] == 64  # the penalties' defaults too
    assert props["model_alias"] == "serve-dense.gguf" and props["total_slots"] == 1
    assert props["cache_ram"]["enabled"] and props["cache_ram"]["limit_bytes"] == 2048 << 20
    status, reply = server.request("/tokenize", b'{"content": "\\ud800"}')  # valid JSON, not Unicode text
    assert status == 400 and reply["error"]["param"] == "content"


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_an_api_key_is_required_when_set(chat_model, how, monkeypatch):
    if how == "environment":
        monkeypatch.setenv("PYMOE_API_KEY", "sesame")
    s = Server(chat_model, *(["--api-key", "sesame"] if how == "flag" else []))
    try:
        assert s.request("/health")[0] == 200  # health needs no key
        status, reply = s.request("/v1/models")
        assert status == 401 and "API key" in reply["error"]["message"]
        with pytest.raises(openai.AuthenticationError):
            s.client.models.list()
        keyed = openai.OpenAI(base_url=s.url + "/v1", api_key="sesame", max_retries=0)
        assert keyed.completions.create(model="m", prompt="Hi", max_tokens=2).usage.completion_tokens == 2
    finally:
        assert s.stop()[0] == 0


def test_a_full_queue_is_a_503_at_once_and_a_disconnect_stops_generation(chat_model):
    s = Server(chat_model, "--queue", "0", ctx=4096)
    try:
        stream = s.client.completions.create(model="m", prompt="Go on and on", max_tokens=4000,
                                             stream=True)
        first = next(iter(stream))  # generation is running
        assert first.choices
        t0 = time.monotonic()
        status, reply = s.request("/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert status == 503 and "busy" in reply["error"]["message"]
        assert time.monotonic() - t0 < 2
        assert s.request("/health")[1]["busy"] == 1
        stream.close()  # the client hangs up mid-stream
        deadline = time.monotonic() + 3
        while s.request("/health")[1]["busy"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.request("/health")[1]["busy"] == 0, "the generation went on after the client left"
        assert s.client.completions.create(model="m", prompt="Hi", max_tokens=2).usage.completion_tokens == 2
    finally:
        code, log = s.stop()
        assert code == 0, log


def test_ctrl_c_during_a_generation_stops_cleanly(chat_model):
    s = Server(chat_model, ctx=4096)
    stream = s.client.completions.create(model="m", prompt="Go on and on", max_tokens=4000, stream=True)
    assert next(iter(stream)).choices
    t0 = time.monotonic()
    code, log = s.stop()
    assert code == 0, log
    assert time.monotonic() - t0 < 10
    assert "stopping" in log and "stopped after" in log and "Traceback" not in log


def test_a_speculative_server_says_what_a_plain_one_says(model_dir):
    """-d ngram, and a draft model with lookup: the greedy text is the plain
    text, and the figures count the drafts."""
    target, draft = pair(model_dir)
    prompt = "one two three four one two three four one two three"
    expected = greedy_text(target, prompt, 24)
    for args in (("-d", "ngram", "--draft-max", "3"), ("-d", draft, "--ngram", "--draft-max", "3")):
        s = Server(target, *args)
        try:
            r = s.client.completions.create(model="m", prompt=prompt, max_tokens=24, temperature=0)
            assert r.choices[0].text == expected, args
            figures = r.usage.model_extra["pymoe"]
            assert figures["draft_source"] in ("ngram", "model+ngram") and figures["drafted"] > 0, figures
        finally:
            assert s.stop()[0] == 0


def pair(model_dir):
    target = tiny_models.write_model(model_dir / "serve-pair-moe.gguf", tiny_models.ARCHITECTURES["llama-moe"],
                                     chat_template=tiny_models.CHATML)
    draft = tiny_models.write_model(model_dir / "serve-pair-draft.gguf", tiny_models.PAIR_DRAFT,
                                    chat_template=tiny_models.CHATML)
    return target, draft


def test_the_engine_keeps_the_context_a_new_prompt_shares(model_dir):
    """In process: a session and a speculative loop rewind to the longest
    common prefix of what they hold and the new prompt; every answer is what
    a fresh context gives."""
    target_path, draft_path = pair(model_dir)
    greedy = pymoe.SamplingParams.greedy()
    with pymoe.Model(target_path) as target, pymoe.Model(draft_path) as draft:
        opts = dict(n_ctx=512, n_threads=2, flash_attn="off", cache_type_k="f32", cache_type_v="f32")
        decoders = [target.session(**opts),
                    pymoe.Speculative(target, draft, ngram=True, draft_max=3, temperature=0, **opts)]
        for d in decoders:
            engine = Engine(d, n_ctx=512)
            try:
                def ask(prompt, n=8):
                    return engine.submit(Request(prompt=prompt, max_tokens=n, sampling=greedy)).result(60)
                first = target.tokenize("one two three four one two three")
                r1 = ask(first)
                assert r1.cached_tokens == 0 and r1.completion_tokens == 8
                extended = d.tokens + target.tokenize(" five six", add_special=False)
                r2 = ask(extended)
                assert r2.cached_tokens == len(extended) - 3 == len(first) + 8  # only " five six" was fed
                fresh = greedy_text(target_path, target.detokenize(extended[1:]), 8)
                assert r2.text == fresh
                branched = first + target.tokenize(" seven", add_special=False)
                r3 = ask(branched)
                assert r3.cached_tokens == len(first)
                assert r3.text == greedy_text(target_path, target.detokenize(branched[1:]), 8)
            finally:
                engine.close()
                d.close()


def test_the_prompt_cache_keeps_what_was_used_last_within_its_size():
    cache = PromptCache(100, rewinds=True)
    assert cache.add([1, 2, 3], bytearray(40)) and cache.add([7, 8, 9], bytearray(40))
    assert cache.best([1, 2, 3, 4])[1] == 3 and cache.best([1, 2, 5])[1] == 2  # any prefix, with a rewind
    assert cache.best([1, 2, 3])[1] == 2  # the last prompt token is fed again: its logits are sampled first
    assert cache.best([5, 6]) == (None, 0)
    cache.used(cache.best([1, 2])[0])  # [1, 2, 3] is now the newest
    assert cache.add([4, 4, 4], bytearray(40))  # past 100 bytes: the least recently used goes
    assert cache.best([7, 8, 9, 1])[1] == 0 and cache.best([1, 2, 3, 4])[1] == 3 and cache.bytes == 80
    assert cache.add([1, 2, 3, 4, 5], bytearray(10))  # covers [1, 2, 3] (a rewind reaches any prefix)
    assert len(cache) == 2 and cache.bytes == 50 and cache.holds([1, 2, 3, 4, 5]) and not cache.holds([1, 2, 3])
    assert not cache.add([9], bytearray(101)) and len(cache) == 2  # larger than the whole cache: not kept
    recurrent = PromptCache(None, rewinds=False)  # a state that cannot go back is of use only if the prompt extends it
    recurrent.add([1, 2, 3], bytearray(10))
    assert recurrent.best([1, 2, 3, 4])[1] == 3 and recurrent.best([1, 2, 5, 6]) == (None, 0)
    assert recurrent.best([1, 2, 3]) == (None, 0)
    recurrent.add([1, 2, 3, 4], bytearray(10))
    assert len(recurrent) == 2  # the shorter one still serves prompts the longer one cannot go back to


@pytest.mark.parametrize("kind", ["session", "speculative", "hybrid session", "hybrid speculative"])
def test_switching_conversations_restores_the_context_saved_in_ram(model_dir, kind):
    """Two conversations asked in turns: coming back to one restores its saved
    state and feeds only what is new; every answer is what a fresh context
    gives; without the cache the whole prompt is fed again."""
    target_path, draft_path = pair(model_dir)
    if kind.startswith("hybrid"):
        target_path = tiny_models.write_model(model_dir / "serve-hybrid.gguf", tiny_models.ARCHITECTURES["qwen35moe"])
    greedy = pymoe.SamplingParams.greedy()
    opts = dict(n_ctx=512, n_threads=2, flash_attn="off", cache_type_k="f32", cache_type_v="f32")
    with pymoe.Model(target_path) as target, pymoe.Model(draft_path) as draft:
        for cache_bytes in (64 << 20, 0):
            d = (pymoe.Speculative(target, draft, ngram=True, draft_max=3, temperature=0, **opts)
                 if kind.endswith("speculative") else target.session(**opts))
            engine = Engine(d, n_ctx=512, cache_bytes=cache_bytes)
            try:
                def ask(prompt):
                    r = engine.submit(Request(prompt=prompt, max_tokens=8, sampling=greedy)).result(60)
                    return r, list(d.tokens)  # the conversation so far, as a client would send it back

                a = target.tokenize("one two three four five " * 8)
                b = target.tokenize("six seven eight nine ten " * 8)
                _, a = ask(a)
                _, b = ask(b)
                more = target.tokenize(" and then", add_special=False)
                back, _ = ask(a + more)
                assert back.text == greedy_text(target_path, a + more, 8)
                if cache_bytes:
                    assert back.cached_tokens == len(a) and len(engine.cache) >= 1
                    again, _ = ask(b + more)  # and back to the other one
                    assert again.cached_tokens == len(b)
                    assert again.text == greedy_text(target_path, b + more, 8)
                else:
                    assert back.cached_tokens <= 1  # at most the BOS the two conversations share
            finally:
                engine.close()
                d.close()


def test_a_state_that_does_not_fit_or_does_not_load_only_costs_its_reuse(model_dir):
    target_path, _ = pair(model_dir)
    greedy = pymoe.SamplingParams.greedy()
    opts = dict(n_ctx=512, n_threads=2, flash_attn="off", cache_type_k="f32", cache_type_v="f32")
    with pymoe.Model(target_path) as target:
        a = target.tokenize("one two three four five " * 8)
        b = target.tokenize("six seven eight nine ten " * 8)
        for cache_bytes, spoil in ((1000, False), (64 << 20, True)):
            with target.session(**opts) as d:
                engine = Engine(d, n_ctx=512, cache_bytes=cache_bytes)
                try:
                    def ask(prompt):
                        return engine.submit(Request(prompt=prompt, max_tokens=8, sampling=greedy)).result(60)
                    ask(a)
                    held = list(d.tokens)
                    ask(b)
                    if spoil:  # the saved state no longer loads: it goes, and the request feeds everything
                        (saved,) = engine.cache._saved.values()
                        saved.state[:16] = b"\0" * 16
                    else:  # 1000 bytes: no state fits, none is copied
                        assert len(engine.cache) == 0
                    back = ask(held + [5])
                    assert back.cached_tokens <= 1 and back.finish_reason == "length"
                    assert back.text == greedy_text(target_path, held + [5], 8)
                    assert spoil is False or not engine.cache.holds(held)
                finally:
                    engine.close()


def test_load_eight_clients_some_hanging_up_every_request_answered_memory_flat(chat_model):
    """8 clients x 20 requests (streamed, whole, and streams dropped after the
    first chunk): each gets a whole answer or a clear error (a 503 when the
    queue is full), the server stays up and its memory does not grow."""
    s = Server(chat_model, "--queue", "6", ctx=1024)
    outcomes, problems = {"whole": 0, "streamed": 0, "dropped": 0, "busy": 0}, []
    lock = threading.Lock()

    def client(c):
        api = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        for i in range(20):
            kind = ("whole", "streamed", "dropped")[(c + i) % 3]
            prompt = f"client {c} request {i}: " + "tell me a story " * (i % 4)
            try:
                if kind == "whole":
                    r = api.completions.create(model="m", prompt=prompt, max_tokens=24, temperature=0.7, seed=i)
                    ok = r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens > 0
                else:
                    stream = api.completions.create(model="m", prompt=prompt, max_tokens=24, stream=True)
                    chunks = []
                    for chunk in stream:
                        chunks.append(chunk)
                        if kind == "dropped":
                            stream.close()
                            break
                    ok = bool(chunks) and (kind == "dropped" or chunks[-1].choices[0].finish_reason is not None)
            except openai.APIStatusError as exc:
                kind, ok = "busy", exc.status_code == 503 and "busy" in str(exc)
            with lock:
                outcomes[kind] += 1
                if not ok:
                    problems.append((c, i, kind))

    def run_clients():
        threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)

    try:
        run_clients()  # the first round warms the server up (allocator, caches)
        rss_before = s.rss_kib()
        run_clients()
        rss_after = s.rss_kib()
        print(f"load test: {outcomes}, server RSS {rss_before} KiB after the first 160 requests, {rss_after} KiB "
              "after 320")  # shown with pytest -s
        assert not problems, problems
        assert sum(outcomes.values()) == 320
        assert outcomes["whole"] and outcomes["streamed"] and outcomes["dropped"], outcomes
        assert s.request("/health")[0] == 200
        if not SANITIZED:  # ASan's quarantine holds freed memory back by design
            assert rss_after - rss_before < 16 * 1024, (rss_before, rss_after)
    finally:
        code, log = s.stop()
    assert code == 0, log


def test_without_aiohttp_serve_says_how_to_get_it(chat_model):
    code = ("import sys; sys.modules['aiohttp'] = None; from pymoe.cli import main; "
            f"sys.exit(main(['serve', '-m', {str(chat_model)!r}]))")
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "pip install '.[serve]'" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_public_address_warns_and_a_taken_port_is_one_line(chat_model):
    s = Server(chat_model, "--host", "0.0.0.0")
    try:
        assert any("anyone who can reach this machine" in line for line in s.lines)
        port = s.url.rsplit(":", 1)[1]
        r = subprocess.run([sys.executable, "-P", "-m", "pymoe", "serve", "-m", str(chat_model), "--port", port,
                            "--host", "0.0.0.0", "--ctx", "256"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and f"cannot listen on 0.0.0.0:{port}" in r.stderr, r.stderr
    finally:
        assert s.stop()[0] == 0


def test_an_mtp_server_on_a_hybrid_target_says_what_a_plain_one_says(model_dir):
    """The product's own case: the target's MTP head drafts (-d mtp) on a
    hybrid (recurrent) qwen35moe; and the same target plain, whose recurrent
    state rewinds only as far as its snapshots. Greedy text is the plain text
    of a fresh context whatever the context held before (requests that
    branch off what it holds start over)."""
    target = tiny_models.write_model(model_dir / "serve-mtp-qwen35moe.gguf", tiny_models.QWEN35MOE_MTP,
                                     chat_template=tiny_models.CHATML)
    asks = ["one two three four one two three", "one two three four one two three five six", "one two seven",
            "one two seven"]
    expected = {prompt: greedy_text(target, prompt, 16) for prompt in asks}
    for args in (("-d", "mtp", "--draft-max", "2"), ()):
        s = Server(target, *args)
        try:
            for prompt in asks:
                r = s.client.completions.create(model="m", prompt=prompt, max_tokens=16, temperature=0)
                assert r.choices[0].text == expected[prompt], (args, prompt)
                assert r.usage.model_extra["pymoe"]["draft_source"] == ("mtp" if args else None)
        finally:
            assert s.stop()[0] == 0


def test_a_speculative_server_reuses_the_prefix_an_edited_conversation_keeps(model_dir):
    """An agent edits an earlier message of its conversation: the speculative
    loop rewinds to what is unchanged (cached_tokens > 0) and answers what a
    fresh server answers."""
    target, draft = pair(model_dir)
    system = {"role": "system", "content": "You answer in lists of numbers: one two three four five six seven."}
    first = [system, {"role": "user", "content": "Count for me."},
             {"role": "assistant", "content": "one two three four"},
             {"role": "user", "content": "Go on."}]
    edited = [system, {"role": "user", "content": "Count backwards for me."},
              {"role": "assistant", "content": "one two three four"},
              {"role": "user", "content": "Go on."}]
    ask = dict(model="m", max_tokens=12, temperature=0)
    fresh = Server(target, "-d", draft, "--ngram", "--draft-max", "3")
    try:
        expected = fresh.client.chat.completions.create(messages=edited, **ask).choices[0].message.content
    finally:
        assert fresh.stop()[0] == 0
    s = Server(target, "-d", draft, "--ngram", "--draft-max", "3")
    try:
        s.client.chat.completions.create(messages=first, **ask)
        r = s.client.chat.completions.create(messages=edited, **ask)
        cached = r.usage.prompt_tokens_details.cached_tokens
        with pymoe.Model(target) as model:  # what the two prompts share: the system message and the turn's start
            shared = common_prefix(model.chat_tokenize(first), model.chat_tokenize(edited))
        assert 0 < cached == shared < r.usage.prompt_tokens - 10, (cached, shared)
        assert r.usage.model_extra["pymoe"]["prompt_tokens_fed"] == r.usage.prompt_tokens - cached
        assert r.choices[0].message.content == expected
    finally:
        assert s.stop()[0] == 0
