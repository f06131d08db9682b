"""The Anthropic Messages API of `python -m treeflash_mlx.server` on the demo pair, driven by the official
`anthropic` client: the same generation core and prompt cache as the OpenAI endpoints, Anthropic's shapes."""

from __future__ import annotations

import json

import pytest
from server_helpers import Server

anthropic = pytest.importorskip("anthropic", reason="the server tests use the official client: pip install anthropic")
pytest.importorskip("openai", reason="the server tests use the official client: pip install openai")

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


def test_the_same_conversation_gives_the_same_text_on_both_apis(server):
    messages = [{"role": "user", "content": PROMPT}]
    want = server.client.chat.completions.create(model="default_model", messages=[
        {"role": "system", "content": "You write Python."}, *messages], max_tokens=24)
    got = server.anthropic.messages.create(model="claude-sonnet-4-5", max_tokens=24, system="You write Python.",
                                           messages=messages)
    assert [b.type for b in got.content] == ["text"] and got.content[0].text == want.choices[0].message.content
    assert got.stop_reason == "max_tokens" and got.stop_sequence is None and got.type == "message"
    assert got.usage.output_tokens == 24
    assert got.usage.input_tokens + got.usage.cache_read_input_tokens == want.usage.prompt_tokens
    assert got.usage.cache_read_input_tokens >= want.usage.prompt_tokens - 1, "the OpenAI turn's cache served it"
    assert got.model_extra["treeflash"]["mode"] == "treeflash"

    streamed, events = "", []
    with server.anthropic.messages.stream(model="m", max_tokens=24, system="You write Python.",
                                          messages=messages) as stream:
        for event in stream:
            events.append(event.type)
            if event.type == "content_block_delta":
                streamed += event.delta.text
        final = stream.get_final_message()
    assert streamed == final.content[0].text == got.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 24
    assert events[:2] == ["message_start", "content_block_start"] and events[-2:] == ["message_delta",
                                                                                     "message_stop"]


def test_a_second_turn_reads_the_first_from_the_cache(server):
    first = server.anthropic.messages.create(model="m", max_tokens=16,
                                             messages=[{"role": "user", "content": "class Stack:"}])
    second = server.anthropic.messages.create(model="m", max_tokens=16, messages=[
        {"role": "user", "content": "class Stack:"}, {"role": "assistant", "content": first.content[0].text},
        {"role": "user", "content": "def push(self, x):"}])
    assert second.usage.cache_read_input_tokens >= first.usage.input_tokens + first.usage.cache_read_input_tokens


def test_stop_sequences_end_the_text_and_are_named(server):
    full = server.anthropic.messages.create(model="m", max_tokens=40, messages=[{"role": "user", "content": PROMPT}])
    text = full.content[0].text
    stop = text.strip()[3:6]
    assert stop and stop in text
    got = server.anthropic.messages.create(model="m", max_tokens=40, stop_sequences=["@@never@@", stop],
                                           messages=[{"role": "user", "content": PROMPT}])
    assert got.stop_reason == "stop_sequence" and got.stop_sequence == stop
    assert got.content[0].text == text[: text.index(stop)]


def test_sampling_fields_are_taken(server):
    # (this client version sends them as extra fields; older ones and other apps send them as named ones)
    got = server.anthropic.messages.create(model="m", max_tokens=12, extra_body={"temperature": 0.8, "top_p": 0.9,
                                                                                 "top_k": 20},
                                           messages=[{"role": "user", "content": [{"type": "text", "text": PROMPT}]}])
    assert got.usage.output_tokens == 12


def test_count_tokens_equals_the_prompt_the_openai_side_counts(server):
    want = server.client.chat.completions.create(model="default_model", max_tokens=1,
                                                 messages=[{"role": "user", "content": PROMPT}])
    got = server.anthropic.messages.count_tokens(model="m", messages=[{"role": "user", "content": PROMPT}])
    assert got.input_tokens == want.usage.prompt_tokens


@pytest.mark.parametrize("body,status,kind,words", [
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, 400, "invalid_request_error", "max_tokens"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}, 400, "invalid_request_error", "model"),
    ({"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}, 400, "invalid_request_error",
     "max_tokens"),
    ({"model": "m", "max_tokens": 5, "messages": []}, 400, "invalid_request_error", "messages"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "hi"}]}, 400,
     "invalid_request_error", "role"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}]}]}, 400,
     "invalid_request_error", "image"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
      "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 400, "invalid_request_error", "server tool"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400,
     "invalid_request_error", "temperature"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x " * 3000}]}, 400,
     "invalid_request_error", "context"),
])
def test_bad_requests_get_anthropic_shaped_errors(server, body, status, kind, words):
    status_got, _, data = server.raw("POST", "/v1/messages", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    error = json.loads(data)
    assert status_got == status and error["type"] == "error" and error["error"]["type"] == kind
    assert words in error["error"]["message"]
    if "model" in body and "max_tokens" in body:  # (the client itself insists on those two)
        with pytest.raises(anthropic.APIStatusError) as info:  # the client reads them as Anthropic's errors
            named = {k: v for k, v in body.items() if k in ("model", "max_tokens", "messages", "tools")}
            server.anthropic.messages.create(**named, extra_body={k: v for k, v in body.items() if k not in named})
        assert info.value.status_code == status and info.value.body["error"]["type"] == kind


def test_malformed_bodies_get_anthropic_shaped_errors(server):
    status, _, data = server.raw("POST", "/v1/messages", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and json.loads(data)["error"]["type"] == "invalid_request_error"
    status, _, data = server.raw("POST", "/v1/messages/batches", b"{}", {"Content-Type": "application/json"})
    assert status == 404 and json.loads(data)["error"]["type"] == "not_found_error"
    assert server.raw("GET", "/health")[0] == 200


def test_a_turn_whose_template_drops_the_reasoning_reads_the_shared_prefix_from_the_cache(server):
    # turn 1's answer comes back as a thinking block, which the demo template does not render (as thinking
    # models' templates drop earlier reasoning): turn 2 shares turn 1's prompt, not its answer
    question = {"role": "user", "content": 'class Queue:\n    """A first-in, first-out queue of items."""\n'}
    first = server.client.chat.completions.create(model="default_model", messages=[question], max_tokens=16)
    second = server.anthropic.messages.create(model="m", max_tokens=8, messages=[
        question, {"role": "assistant", "content": [
            {"type": "thinking", "thinking": first.choices[0].message.content, "signature": ""},
            {"type": "text", "text": ""}]},
        {"role": "user", "content": "def put(self, x):"}])
    cached = second.usage.cache_read_input_tokens
    assert first.usage.prompt_tokens >= 8, "longer than the shortest prefix the server's caches share"
    assert first.usage.prompt_tokens <= cached < first.usage.prompt_tokens + first.usage.completion_tokens
    assert second.usage.output_tokens == 8
