"""Tool calls and reasoning through both APIs, driven by the official `openai` and `anthropic` clients.

The model's output is scripted (a random-weight model never writes a tool call): the server runs in this process
with an engine whose generation replays a given text token by token through a real tokenizer (the demo's, taught
``<think>``/``</think>`` and given mlx-lm's JSON tool parser with ``<tool_call>`` markers, as mlx-lm sets them up
for Qwen). Everything from the tokens on is the server's own path: mlx-lm's state machine, the tokenizer's parser,
each API's shapes. The real model's tool calls are compared with mlx_lm.server in test_server_mlx_lm.py.
"""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import pytest

openai = pytest.importorskip("openai", reason="the server tests use the official client: pip install openai")
anthropic = pytest.importorskip("anthropic", reason="the server tests use the official client: pip install anthropic")

from mlx_lm.tokenizer_utils import TokenizerWrapper  # noqa: E402
from mlx_lm.tool_parsers import json_tools  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from treeflash_mlx.loading import DEMO  # noqa: E402
from treeflash_mlx.server import Engine, build_parser, make_server  # noqa: E402
from treeflash_mlx.speculative import GenerationResponse  # noqa: E402

# A Qwen3-like template: tools in the system turn, calls as <tool_call> JSON, results tagged with their call's id,
# earlier reasoning dropped, and the answer opened with <think> unless enable_thinking is false.
TEMPLATE = (
    "{% if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>"
    "{% if m.role == 'tool' %}[{{ m.tool_call_id }}] {% endif %}{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments}"
    " | tojson }}</tool_call>{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% if enable_thinking is not defined or enable_thinking %}<think>\n"
    "{% endif %}{% endif %}"
)
WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                              "parameters": {"type": "object",
                                                             "properties": {"city": {"type": "string"}}}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
THOUGHT = "The user wants the weather; I should call the tool."
SCRIPT = f"{THOUGHT}\n</think>\n\nLet me check.{CALL}"


class ScriptedEngine(Engine):
    """The server's engine with the model replaced by a script: ``script`` is the text the "model" writes
    (then its end-of-sequence token); every prompt the template built is kept in ``prompts``."""

    def __init__(self):
        hf = AutoTokenizer.from_pretrained(str(DEMO / "target"))
        hf.add_tokens(["<think>", "</think>"])  # what mlx-lm recognizes a thinking model by
        hf.chat_template = TEMPLATE
        self.tokenizer = TokenizerWrapper(hf, tool_call_start="<tool_call>", tool_call_end="</tool_call>",
                                          tool_parser=json_tools.parse_tool_call)
        self.args = build_parser().parse_args([])
        self.mode, self.model_id, self.model_names = "scripted", "scripted", {"default_model", "scripted"}
        self.target = SimpleNamespace(max_context=None, vocab_size=len(self.tokenizer))
        self.script, self.prompts = "", []
        self.start()

    def _generate(self, job):
        prompt = job.build_prompt()
        self.prompts.append(self.tokenizer.decode(prompt))
        job.out.put(("prompt", prompt))
        ids = self.tokenizer.encode(self.script, add_special_tokens=False) + [self.tokenizer.eos_token_id]
        detokenizer = self.tokenizer.detokenizer
        for i, token in enumerate(ids[: job.max_tokens]):
            eos, last = i == len(ids) - 1, i == job.max_tokens - 1
            if not eos:
                detokenizer.add_token(token)
            if eos or last:
                detokenizer.finalize()
            r = GenerationResponse(detokenizer.last_segment, token, None, False, len(prompt), 1.0, i + 1, 1.0, 0.0,
                                   i, 1, "stop" if eos else ("length" if last else None))
            job.out.put(("token", (r, None)))


@pytest.fixture(scope="module")
def engine():
    engine = ScriptedEngine()
    server = make_server(engine, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    engine.openai = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    engine.anthropic = anthropic.Anthropic(base_url=url, api_key="none", max_retries=0, timeout=60)
    yield engine
    server.shutdown()
    engine.stop()


def ask(engine, script: str, messages=None, **kw):
    engine.script = script
    messages = messages or [{"role": "user", "content": "What is the weather in Paris?"}]
    return engine.openai.chat.completions.create(model="default_model", messages=messages, **kw)


def test_openai_tool_call_and_reasoning_are_split_from_the_answer(engine):
    got = ask(engine, SCRIPT, tools=WEATHER)
    message = got.choices[0].message
    assert got.choices[0].finish_reason == "tool_calls"
    assert message.content == "\n\nLet me check."  # as mlx_lm.server: the text after the reasoning, untouched
    assert message.model_extra["reasoning_content"] == THOUGHT + "\n"
    [call] = message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert '<tools>[{"type": "function"' in engine.prompts[-1] and engine.prompts[-1].endswith("<think>\n")


def test_openai_stream_sends_reasoning_content_and_tool_call_deltas_never_the_call_text(engine):
    script = SCRIPT + "\n" + CALL.replace("Paris", "Oslo")
    chunks = list(ask(engine, script, tools=WEATHER, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    content = "".join(d.content or "" for d in deltas)
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    calls = [c for d in deltas for c in d.tool_calls or []]
    assert reasoning == THOUGHT + "\n" and content == "\n\nLet me check.\n"
    assert "tool_call" not in content and "get_weather" not in content
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (0, "get_weather", {"city": "Paris"}), (1, "get_weather", {"city": "Oslo"})]
    assert len({c.id for c in calls}) == 2
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert len([d for d in deltas if d.content or (d.model_extra or {}).get("reasoning_content")]) > 5, "streamed"


def test_a_tool_result_turn_reaches_the_template_and_the_answer_is_plain_content(engine):
    messages = [{"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    got = ask(engine, "Done.\n</think>\n\nIt is 18 C and sunny.", messages, tools=WEATHER, tool_choice="auto")
    assert got.choices[0].finish_reason == "stop" and got.choices[0].message.tool_calls is None
    assert got.choices[0].message.content == "\n\nIt is 18 C and sunny."
    prompt = engine.prompts[-1]
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in prompt
    assert "<|tool|>[call_1] 18 C, sunny" in prompt


def test_template_kwargs_and_tool_choice_none_reach_the_template(engine):
    got = ask(engine, "Plain answer.", tools=WEATHER, tool_choice="none",
              extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert got.choices[0].message.content == "Plain answer."
    assert "reasoning_content" not in got.choices[0].message.model_extra
    assert "<tools>" not in engine.prompts[-1] and not engine.prompts[-1].endswith("<think>\n")
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        ask(engine, "x", tools=WEATHER, tool_choice="sometimes")


def test_a_call_cut_off_by_max_tokens_is_neither_a_call_nor_content(engine):
    got = ask(engine, SCRIPT, tools=WEATHER, max_tokens=len(engine.tokenizer.encode(SCRIPT)) - 4)
    message = got.choices[0].message
    assert got.choices[0].finish_reason == "length" and not message.tool_calls
    assert message.content == "\n\nLet me check."


def test_anthropic_message_has_thinking_text_and_tool_use_blocks(engine):
    engine.script = SCRIPT
    tools = [{"name": "get_weather", "description": "The weather in a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    got = engine.anthropic.messages.create(model="claude-sonnet-4-5", max_tokens=200, tools=tools,
                                           system="Be brief.",
                                           messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    assert got.stop_reason == "tool_use" and got.model == "claude-sonnet-4-5" and got.role == "assistant"
    thinking, text, call = got.content
    assert (thinking.type, thinking.thinking) == ("thinking", THOUGHT + "\n")
    assert (text.type, text.text) == ("text", "\n\nLet me check.")
    assert (call.type, call.name, call.input) == ("tool_use", "get_weather", {"city": "Paris"}) and call.id
    assert got.usage.output_tokens == len(engine.tokenizer.encode(SCRIPT)) + 1
    assert got.usage.input_tokens == len(engine.tokenizer.encode(engine.prompts[-1], add_special_tokens=False))
    assert engine.prompts[-1].startswith('<tools>[{"type": "function", "function": {"name": "get_weather"')
    assert "<|system|>Be brief." in engine.prompts[-1]

    with engine.anthropic.messages.stream(model="m", max_tokens=200, tools=tools, system="Be brief.",
                                          messages=[{"role": "user", "content": "What is the weather in Paris?"}]) as s:
        events = [e.type for e in s]
        streamed = s.get_final_message()
    assert [b.model_dump() for b in streamed.content] == [
        {**b.model_dump(), "id": streamed.content[2].id} if b.type == "tool_use" else b.model_dump()
        for b in got.content]
    assert streamed.stop_reason == "tool_use"
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert events.count("content_block_start") == events.count("content_block_stop") == 3


def test_anthropic_and_openai_give_the_same_prompt_for_the_same_tool_conversation(engine):
    engine.script = "Done.\n</think>\n\nSunny."
    got = engine.anthropic.messages.create(
        model="m", max_tokens=50, system="Be brief.",
        tools=[{"name": "get_weather", "description": "The weather in a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        messages=[{"role": "user", "content": "What is the weather in Paris?"},
                  {"role": "assistant", "content": [
                      {"type": "text", "text": "Let me check."},
                      {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1",
                                                "content": "18 C, sunny"}]}])
    assert got.stop_reason == "end_turn" and [b.text for b in got.content if b.type == "text"] == ["\n\nSunny."]
    from_anthropic = engine.prompts[-1]
    ask(engine, "x", [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "What is the weather in Paris?"},
                      {"role": "assistant", "content": "Let me check.", "tool_calls": [
                          {"id": "call_1", "type": "function",
                           "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}], tools=WEATHER)
    assert engine.prompts[-1] == from_anthropic
    count = engine.anthropic.messages.count_tokens(model="m", messages=[{"role": "user", "content": "Hi"}])
    assert count.input_tokens == len(engine.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}],
                                                                          add_generation_prompt=True))


def test_anthropic_thinking_disabled_reaches_the_template(engine):
    engine.script = "Hello."
    got = engine.anthropic.messages.create(model="m", max_tokens=20, thinking={"type": "disabled"},
                                           messages=[{"role": "user", "content": "Hi"}])
    assert [(b.type, b.text) for b in got.content] == [("text", "Hello.")] and got.stop_reason == "end_turn"
    assert not engine.prompts[-1].endswith("<think>\n")
