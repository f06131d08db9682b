"""`python -m treeflash_mlx.server` on the demo pair, driven by the official `openai` client on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

openai = pytest.importorskip("openai", reason="the server tests use the official client: pip install openai")

from treeflash_mlx import load, stream_generate  # noqa: E402
from treeflash_mlx.generate import main as generate_main  # noqa: E402
from treeflash_mlx.loading import DEMO  # noqa: E402
from treeflash_mlx.server import RequestError, chat_prompt  # noqa: E402
from server_helpers import Server  # noqa: E402

ROOT = Path(__file__).parents[1]
PROMPTS = [json.loads(line)["prompt"] for line in (ROOT / "demos" / "heldout_prompts.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def demo():
    return load(str(DEMO / "target"), str(DEMO / "drafter"))


def cli(capsys, *argv) -> dict:
    assert generate_main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def chat(server, content: str, **kw):
    return server.client.chat.completions.create(model="default_model", messages=[{"role": "user", "content": content}],
                                                 **kw)


def test_chat_greedy_text_equals_the_generate_command(server, capsys):
    want = cli(capsys, "--prompt", PROMPTS[0], "--max-tokens", "40")
    got = chat(server, PROMPTS[0], max_tokens=40)
    assert got.choices[0].message.content == want["text"]
    assert got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == len(want["tokens"]) == 40
    assert got.usage.total_tokens == got.usage.prompt_tokens + 40
    assert got.model_extra["treeflash"]["mode"] == "treeflash"
    assert got.model_extra["treeflash"]["mean_acceptance_length"] > 1
    auto = got.model_extra["treeflash"]["tree_size_auto"]  # the default --tree-size auto: what it chose
    assert sum(auto["tree_sizes"].values()) == auto["rounds"] == got.model_extra["treeflash"]["rounds"]
    assert 0 <= auto["plain_step_fraction"] <= 1

    chunks = list(chat(server, PROMPTS[0], max_tokens=40, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40
    assert chunks[-1].usage.prompt_tokens == got.usage.prompt_tokens


def test_text_completions_equal_the_generate_command(server, capsys):
    want = cli(capsys, "--prompt", PROMPTS[1], "--max-tokens", "32", "--ignore-chat-template")
    got = server.client.completions.create(model="default_model", prompt=PROMPTS[1], max_tokens=32)
    assert got.choices[0].text == want["text"] and got.object == "text_completion"
    streamed = "".join(c.choices[0].text for c in server.client.completions.create(
        model="default_model", prompt=PROMPTS[1], max_tokens=32, stream=True) if c.choices)
    assert streamed == want["text"]


def test_stop_strings_cut_the_text(server, capsys):
    full = cli(capsys, "--prompt", PROMPTS[2], "--max-tokens", "48", "--ignore-chat-template")["text"]
    stop = full.strip()[4:8]
    assert stop and stop in full
    got = server.client.completions.create(model="default_model", prompt=PROMPTS[2], max_tokens=48, stop=[stop])
    assert got.choices[0].text == full[: full.index(stop)] and got.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in server.client.completions.create(
        model="default_model", prompt=PROMPTS[2], max_tokens=48, stop=stop, stream=True) if c.choices)
    assert streamed == full[: full.index(stop)]


def test_second_turn_prefills_only_the_new_suffix_with_identical_output(server, demo):
    model, tokenizer, drafter = demo
    messages = [{"role": "user", "content": PROMPTS[3]}]
    first = server.client.chat.completions.create(model="default_model", messages=messages, max_tokens=24)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "def main():"}]
    second = server.client.chat.completions.create(model="default_model", messages=messages, max_tokens=24)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = "".join(r.text for r in stream_generate(model, tokenizer, prompt, 24, drafter=drafter))
    assert second.choices[0].message.content == want
    cached = second.usage.prompt_tokens_details.cached_tokens
    previous = first.usage.prompt_tokens + first.usage.completion_tokens
    assert second.usage.prompt_tokens == len(prompt) > previous
    assert cached >= first.usage.prompt_tokens, "the first turn's prompt at least comes from the cache"
    assert second.model_extra["treeflash"]["prefilled_tokens"] == len(prompt) - cached <= len(prompt) - previous + 2


def test_a_burst_of_eight_clients_all_get_complete_correct_answers(server, demo):
    model, tokenizer, drafter = demo
    prompts = PROMPTS[4:12]
    want = ["".join(r.text for r in stream_generate(model, tokenizer, p, 20, drafter=drafter)) for p in prompts]
    results = [None] * len(prompts)

    def ask(i):
        stream = i % 2 == 1
        reply = server.client.completions.create(model="default_model", prompt=prompts[i], max_tokens=20,
                                                 stream=stream)
        results[i] = "".join(c.choices[0].text for c in reply if c.choices) if stream else reply.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results == want


def test_a_client_that_disconnects_mid_stream_stops_its_generation(server):
    body = json.dumps({"prompt": PROMPTS[0], "max_tokens": 1500, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        while b"data: " not in received:  # the headers and the first event
            chunk = sock.recv(4096)
            assert chunk, "the server closed the stream"
            received += chunk
        assert received.startswith(b"HTTP/1.1 200")
    line = server.wait_for_log("client gone")
    assert " 499 " in line
    assert server.raw("GET", "/health")[0] == 200
    got = server.client.completions.create(model="default_model", prompt="def f(x):", max_tokens=5)
    assert got.usage.completion_tokens == 5


@pytest.mark.parametrize("body,status,param", [
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [""]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": 1.5}, 400, "seed"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"content": "hi"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x " * 3000}]}, 400, "messages"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": 1}}, 400, "include_usage"),
])
def test_bad_requests_get_openai_shaped_errors(server, body, status, param):
    with pytest.raises(openai.APIStatusError) as info:
        server.client.chat.completions.create(**{"model": "default_model", **body})
    assert info.value.status_code == status
    error = info.value.body
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert error["type"] == "invalid_request_error" and error["message"]
    assert server.raw("GET", "/health")[0] == 200


def test_malformed_json_and_unknown_routes(server):
    status, headers, data = server.raw("POST", "/v1/chat/completions", b"{not json",
                                       {"Content-Type": "application/json"})
    assert status == 400 and json.loads(data)["error"]["code"] == "invalid_json"
    # the server closes the connection after an error, and says so: a keep-alive client (the openai SDK's pool)
    # must not send its next request into the closing socket
    assert headers.get("Connection") == "close"
    status, _, data = server.raw("POST", "/v1/chat/completions", b"[1, 2]", {"Content-Type": "application/json"})
    assert status == 400 and "JSON object" in json.loads(data)["error"]["message"]
    status, _, data = server.raw("POST", "/v1/embeddings", b"{}", {"Content-Type": "application/json"})
    assert status == 404 and json.loads(data)["error"]["code"] == "not_found"
    assert server.raw("GET", "/health")[0] == 200
    assert server.wait_for_log("POST /v1/embeddings 404")


def test_models_health_cors_and_one_log_line_per_request(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["treeflash-demo"]
    status, headers, data = server.raw("GET", "/health")
    assert status == 200 and json.loads(data) == {"status": "ok", "generating": False, "queued": 0}
    status, headers, _ = server.raw("OPTIONS", "/v1/chat/completions", headers={"Origin": "http://app.local"})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "*"
    before = len([line for line in server.lines if "POST /v1/completions 200" in line])
    server.client.completions.create(model="default_model", prompt="import os", max_tokens=3)
    server.wait_for_log("POST /v1/completions 200")
    assert len([line for line in server.lines if "POST /v1/completions 200" in line]) == before + 1


def test_logprobs_and_seeded_sampling(server):
    got = chat(server, PROMPTS[5], max_tokens=12, logprobs=True, top_logprobs=3)
    content = got.choices[0].logprobs.content
    assert len(content) == 12 and "".join(c.token for c in content) == got.choices[0].message.content
    for entry in content:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 3 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.logprob <= 0
    kw = dict(max_tokens=24, temperature=0.9, top_p=0.95, seed=7, extra_body={"top_k": 40, "min_p": 0.02})
    a, b = chat(server, PROMPTS[6], **kw), chat(server, PROMPTS[6], **kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    c = chat(server, PROMPTS[6], **{**kw, "seed": 8})
    assert c.usage.completion_tokens == 24
    penalised = chat(server, PROMPTS[6], max_tokens=24, extra_body={"repetition_penalty": 1.3})
    assert penalised.usage.completion_tokens == 24


def test_chat_template_gets_tools_and_template_kwargs():
    class Tokenizer:
        chat_template = "set"

        def apply_chat_template(self, messages, tools=None, add_generation_prompt=True, tokenize=True, **kw):
            self.seen = (messages, tools, kw)
            return [1, 2, 3]

    tokenizer = Tokenizer()
    engine = SimpleNamespace(tokenizer=tokenizer, args=SimpleNamespace(chat_template_args={"a": 1}))
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    parts = [{"type": "text", "text": "hi "}, {"type": "text", "text": "you"}]
    body = {"messages": [{"role": "user", "content": parts}], "tools": tools,
            "chat_template_kwargs": {"enable_thinking": False}}
    assert chat_prompt(engine, body) == [1, 2, 3]
    messages, seen_tools, kw = tokenizer.seen
    assert messages[0]["content"] == "hi you" and seen_tools == tools and kw == {"a": 1, "enable_thinking": False}
    with pytest.raises(RequestError, match="only text parts"):
        chat_prompt(engine, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})


def test_bad_flags_are_one_line_errors():
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    for flags, message in ((["--temp", "-1"], "--temp must be >= 0"),
                           (["--model", "/nonexistent/model"], "does not exist")):
        out = subprocess.run([sys.executable, "-m", "treeflash_mlx.server", "--port", "0", *flags],
                             capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 1 and "Traceback" not in out.stderr and message in out.stderr, out.stderr


def test_a_sharded_server_whose_ranks_are_lost_stops_with_one_line(monkeypatch, capsys):
    """Rank 0 of a sharded server meets the other ranks while idle; when they are gone (the meeting fails), no
    request can be served any more: the server stops, prints one error line and exits with status 1 instead of
    answering on as if nothing happened."""
    from treeflash_mlx import distributed
    from treeflash_mlx.server import app
    from treeflash_mlx.server.engine import Engine

    real_start = Engine.start
    monkeypatch.setattr(Engine, "start", lambda self: (setattr(self, "sharded", True), real_start(self))[1])

    def lost():
        raise distributed.RankLost("rank 0 lost the other ranks (an idle meeting: closed); a rank died")

    monkeypatch.setattr(distributed, "tick", lost)
    monkeypatch.setattr(distributed, "share", lambda obj=None: None)  # (the stop's farewell to the lost ranks)
    # The worker stops the main thread as a Ctrl-C would: with Python's own handler, whatever earlier tests left
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert app.main(["--port", "0"]) == 1
    finally:
        signal.signal(signal.SIGINT, previous)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: rank 0 lost the other ranks (an idle meeting: closed); a rank died"]
