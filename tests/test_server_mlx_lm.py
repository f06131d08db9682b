"""Tool requests on a real tool-calling model: our server answers them as mlx_lm.server itself does.

Qwen2.5-Coder-0.5B-Instruct (its template has tool calls; mlx-lm gives its tokenizer the JSON tool parser), in
float32 as tests/test_real_pair.py finds or makes it, with the shipped drafter on our side; greedy. The same
requests (tools, a tool-result follow-up) must give the same message: content, ``tool_calls`` (parsed) and finish
reason. No parsed call is compared here: this model (and the 1.5B) never emits the ``<tool_call>`` marker token (id
151657), it writes its calls as bare or fenced JSON, so both servers answer them as content. In these checkpoints
(dequantized from the official GGUF files) the marker's embedding row, which is also its output row (tied), equals
the rows of unused placeholder tokens (``<|box_end|>``; in the 1.5B also the vision ones), as an untrained token's
would. Measured with plain mlx-lm, greedy: its log-probability at the first reply token is -21 to -24 in the 0.5B
and the 1.5B alike, with a system prompt that asks for ``<tool_call>`` tags only, with "Use the get_weather tool.",
with an earlier assistant turn that called a tool, and even when asked to repeat a message that holds the marker; a
logit bias that forces it makes the 0.5B repeat it without end. The parsing of marked calls is covered by
tests/test_server_tools.py with mlx-lm's own parser. Skipped with the reason where the model is not on this machine.
Slow: ``-m "not slow"`` leaves it out.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from server_helpers import Server, stop
from test_real_pair import DRAFTER, float32_target

openai = pytest.importorskip("openai", reason="the server tests use the official client: pip install openai")

pytestmark = pytest.mark.slow

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]}}},
]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CONVERSATIONS = [
    [{"role": "user", "content": "What is the weather like in Paris right now?"}],
    [{"role": "system", "content": "Reply with <tool_call> tags only."}, {"role": "user", "content": "Add 1 and 2."}],
    [{"role": "user", "content": "What is the weather in Paris?"}, {"role": "assistant", "content": "",
                                                                    "tool_calls": [CALL]},
     {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}],
]


class MlxLmServer:
    """``python -m mlx_lm.server`` on a free port of 127.0.0.1."""

    def __init__(self, model: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        # mlx_lm.server itself, run after importing treeflash_mlx only for the fast BLAS it sets up (otherwise
        # MLX's reference BLAS makes this 10x slower; nothing of mlx-lm is changed)
        start = "import runpy, treeflash_mlx; runpy.run_module('mlx_lm.server', run_name='__main__')"
        self.proc = subprocess.Popen([sys.executable, "-c", start, "--model", model, "--host", "127.0.0.1",
                                      "--port", str(self.port)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2).read()
                break
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("mlx_lm.server exited")
                time.sleep(0.5)
        else:
            self.close()
            raise RuntimeError("mlx_lm.server did not start")
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0,
                                    timeout=600)

    def close(self):
        stop(self.proc)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(float32_target(tmp_path_factory))


def calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def ask(client, messages: list[dict], **kw):
    return client.chat.completions.create(model="default_model", messages=messages, tools=TOOLS, temperature=0.0,
                                          max_tokens=48, **kw)


def test_tool_requests_get_mlx_lm_servers_answers_on_the_real_model(model):
    reference = MlxLmServer(model)
    try:
        want = [ask(reference.client, m).choices[0] for m in CONVERSATIONS]
    finally:
        reference.close()
    ours = Server("--model", model, "--drafter", str(DRAFTER))
    try:
        for messages, w in zip(CONVERSATIONS, want):
            got = ask(ours.client, messages).choices[0]
            assert (got.message.content, calls(got.message), got.finish_reason) == (
                w.message.content, calls(w.message), w.finish_reason)
            chunks = list(ask(ours.client, messages, stream=True))
            assert "".join(c.choices[0].delta.content or "" for c in chunks) == w.message.content
            assert [(t.function.name, json.loads(t.function.arguments)) for c in chunks
                    for t in c.choices[0].delta.tool_calls or []] == calls(w.message)
    finally:
        ours.close()
