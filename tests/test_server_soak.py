"""The server under load and abuse, on 127.0.0.1 only: a bounded soak of mixed OpenAI / Anthropic / streaming /
tool requests from 8 clients, some cancelled midway (every other request answered in full, no generation left
running, resident memory flat after warm-up), and fuzzed ``/v1/messages`` bodies (4xx in Anthropic's shape, never
a 5xx, a traceback or a dead worker)."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from pathlib import Path

import pytest
from server_helpers import Server

pytest.importorskip("openai", reason="the server tests use the official client: pip install openai")
pytest.importorskip("anthropic", reason="the server tests use the official client: pip install anthropic")

CLIENTS, REQUESTS, WARM_UP = 8, 200, 40
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
PROMPTS = ["def fibonacci(n):", "class Stack:", "import os", "def main():", "for i in range(10):"]


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def cancel_midway(port: int, path: str, body: dict) -> None:
    """Start a long stream, read its first event, hang up."""
    data = json.dumps({**body, "max_tokens": 400, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (path.encode(), len(data), data))
        received = b""
        while b"data: " not in received:
            chunk = sock.recv(4096)
            assert chunk, "the server closed the stream before its first event"
            received += chunk
        assert received.startswith(b"HTTP/1.1 200")


def one_request(server, i: int) -> str:
    """Request ``i`` of the soak; answers its kind once it is checked."""
    prompt = PROMPTS[i % len(PROMPTS)]
    kind = ["chat", "chat-stream", "text", "messages", "messages-stream", "tools", "cancel-openai",
            "cancel-anthropic"][i % 8]
    messages = [{"role": "user", "content": prompt}]
    if kind == "chat":
        got = server.client.chat.completions.create(model="default_model", messages=messages, max_tokens=8)
        assert got.usage.completion_tokens == 8 or got.choices[0].finish_reason == "stop"
    elif kind == "chat-stream":
        chunks = list(server.client.chat.completions.create(model="default_model", messages=messages, max_tokens=8,
                                                            stream=True))
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    elif kind == "text":
        got = server.client.completions.create(model="default_model", prompt=prompt, max_tokens=8)
        assert got.choices[0].finish_reason in ("length", "stop")
    elif kind == "messages":
        got = server.anthropic.messages.create(model="m", max_tokens=8, messages=messages)
        assert got.stop_reason in ("max_tokens", "end_turn")
    elif kind == "messages-stream":
        with server.anthropic.messages.stream(model="m", max_tokens=8, messages=messages) as stream:
            final = stream.get_final_message()
        assert final.stop_reason in ("max_tokens", "end_turn")
    elif kind == "tools":
        got = server.client.chat.completions.create(model="default_model", messages=messages, max_tokens=8,
                                                    tools=TOOLS)
        assert got.choices[0].finish_reason in ("length", "stop", "tool_calls")
    elif kind == "cancel-openai":
        cancel_midway(server.port, "/v1/chat/completions", {"messages": messages})
    else:
        cancel_midway(server.port, "/v1/messages", {"model": "m", "messages": messages})
    return kind


def soak(server, indices: list[int], failures: list) -> None:
    work = list(indices)
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                if not work:
                    return
                i = work.pop(0)
            try:
                one_request(server, i)
            except Exception as err:  # noqa: BLE001 (every failure is collected and reported)
                failures.append((i, repr(err)))

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)


def health(server) -> dict:
    return json.loads(server.raw("GET", "/health")[2])


def wait_idle(server, seconds: float = 60) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        state = health(server)
        if not state["generating"] and state["queued"] == 0:
            return state
        time.sleep(0.1)
    return health(server)


@pytest.mark.slow
def test_a_soak_of_mixed_requests_from_eight_clients(server):
    failures: list = []
    started = time.perf_counter()
    soak(server, list(range(WARM_UP)), failures)
    wait_idle(server)
    warm = rss_mb(server.proc.pid)
    soak(server, list(range(WARM_UP, REQUESTS)), failures)
    seconds = time.perf_counter() - started
    assert failures == []
    state = wait_idle(server)
    assert not state["generating"] and state["queued"] == 0, "a generation was left running"
    end = rss_mb(server.proc.pid)
    print(f"soak: {REQUESTS} requests from {CLIENTS} clients in {seconds:.1f}s; RSS {warm:.0f} MB after warm-up, "
          f"{end:.0f} MB at the end (measured on a shared, loaded machine)")
    assert end - warm < 64, f"RSS grew from {warm:.0f} MB to {end:.0f} MB"
    assert server.proc.poll() is None and not [line for line in server.lines if "Traceback" in line]
    cancelled = [line for line in server.lines if " 499 " in line]
    assert len(cancelled) >= REQUESTS // 4 - 2, "the cancelled streams were seen as gone"


def mutate(rng: random.Random, value, depth: int = 0):
    """A random change somewhere in a JSON value: a wrong type, a bad number, a missing or extra key."""
    odd = [None, True, -1, 0, 2**70, -1e308, 1.5, "", "x" * 300, "\u0000\ud7ff\U0001f600", [], {}, [[[[[]]]]],
           {"type": "nonsense"}, [{"type": "image"}], {"role": "robot"}]
    if isinstance(value, dict) and value and depth < 4 and rng.random() < 0.7:
        key = rng.choice(sorted(value))
        roll = rng.random()
        if roll < 0.2:
            return {k: v for k, v in value.items() if k != key}
        if roll < 0.3:
            return {**value, rng.choice(["extra", "stream", "tools", "tool_choice", "thinking"]): rng.choice(odd)}
        return {**value, key: mutate(rng, value[key], depth + 1)}
    if isinstance(value, list) and value and depth < 4 and rng.random() < 0.7:
        i = rng.randrange(len(value))
        return value[:i] + [mutate(rng, value[i], depth + 1)] + value[i + 1:]
    return rng.choice(odd)


BASE = {"model": "m", "max_tokens": 2, "system": "be brief", "stop_sequences": ["\n\n"],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                     {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]}],
        "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "auto"}}


def test_fuzzed_messages_bodies_get_4xx_never_a_traceback(server):
    rng = random.Random(23)
    statuses = []
    for _ in range(150):
        body = mutate(rng, BASE)
        status, headers, data = server.raw("POST", "/v1/messages", json.dumps(body).encode(),
                                           {"Content-Type": "application/json"})
        assert status < 500, (status, body, data[:300])
        if status >= 400:
            error = json.loads(data)
            assert error["type"] == "error" and error["error"]["message"], error
        statuses.append(status)
    for raw in (b"", b"\xff\xfe", b"[" * 100_000, b'{"model": "m", "max_tokens": 1e999}', b"null"):
        status, _, data = server.raw("POST", "/v1/messages", raw, {"Content-Type": "application/json"})
        assert 400 <= status < 500 and json.loads(data)["type"] == "error", (raw[:20], status, data[:200])
    assert statuses.count(200) < len(statuses) // 2 and len({s for s in statuses if s >= 400}) >= 1
    assert health(server)["status"] == "ok" and server.proc.poll() is None
    assert not [line for line in server.lines if "Traceback" in line or "generation failed" in line]
    got = server.anthropic.messages.create(model="m", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    assert got.usage.output_tokens == 3, "the worker still serves"
