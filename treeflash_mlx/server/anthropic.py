"""Anthropic's Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``) over the same generation core:
the conversation is converted to the OpenAI-shaped messages the chat template takes, so the same conversation
gives the same prompt, the same prompt cache and the same text on both APIs.

Any model name is served (clients name Claude models); the answer echoes it back.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from .fields import RequestError, check, sampling, stop_strings
from .openai import prompt_builder
from .parsing import Piece
from .prompts import chat_prompt
from .reply import Reply, Request, sse

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 411: "invalid_request_error", 413: "request_too_large",
               429: "rate_limit_error", 529: "overloaded_error"}


def error_body(err: RequestError) -> dict:
    """Anthropic's error object."""
    return {"type": "error", "error": {"type": ERROR_TYPES.get(err.status, "api_error"), "message": err.message}}


def _bad(message: str, param: str = "messages") -> RequestError:
    return RequestError(400, message, param, "invalid_value")


def _text_of(content: Any, where: str) -> str:
    """A string, or text blocks joined (a system prompt, a tool result)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text"
                                         and isinstance(b.get("text"), str) for b in content):
        return "".join(b["text"] for b in content)
    raise _bad(f"{where} must be a string or an array of text blocks", where.split("[")[0].split(".")[0])


def _blocks(content: Any, i: int) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise _bad(f"messages[{i}].content must be a string or an array of content blocks")
    return content


def _user(blocks: list[dict], i: int) -> list[dict]:
    """A user turn: its tool results as ``tool`` messages (they come first), then its text."""
    out, texts = [], []
    for b in blocks:
        kind = b.get("type")
        if kind == "text" and isinstance(b.get("text"), str):
            texts.append(b["text"])
        elif kind == "tool_result" and isinstance(b.get("tool_use_id"), str):
            result = _text_of(b.get("content") or "", f"messages[{i}].content.tool_result")
            out.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": result})
        else:
            raise _bad(f"messages[{i}]: a user block of type {json.dumps(kind)[:40]} is not supported "
                       "(text and tool_result are)")
    if texts or not out:
        out.append({"role": "user", "content": "".join(texts)})
    return out


def _assistant(blocks: list[dict], i: int) -> dict:
    """An assistant turn: its text, its reasoning (``reasoning_content``, which thinking templates read) and its
    tool calls."""
    message, texts, thoughts, calls = {"role": "assistant"}, [], [], []
    for b in blocks:
        kind = b.get("type")
        if kind == "text" and isinstance(b.get("text"), str):
            texts.append(b["text"])
        elif kind == "thinking" and isinstance(b.get("thinking"), str):
            thoughts.append(b["thinking"])
        elif kind == "redacted_thinking":
            continue
        elif kind == "tool_use" and isinstance(b.get("name"), str) and isinstance(b.get("input", {}), dict):
            calls.append({"id": str(b.get("id") or ""), "type": "function",
                          "function": {"name": b["name"], "arguments": b.get("input", {})}})
        else:
            raise _bad(f"messages[{i}]: an assistant block of type {json.dumps(kind)[:40]} is not supported "
                       "(text, thinking and tool_use are)")
    message["content"] = "".join(texts)
    if thoughts:
        message["reasoning_content"] = "".join(thoughts)
    if calls:
        message["tool_calls"] = calls
    return message


def chat_messages(body: dict) -> list[dict]:
    """The conversation as OpenAI-shaped messages: the system prompt first, tool results as ``tool`` messages."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty array")
    out = []
    if body.get("system") is not None:
        system = _text_of(body["system"], "system")
        if system:
            out.append({"role": "system", "content": system})
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise _bad(f"messages[{i}] must be an object whose 'role' is 'user' or 'assistant'")
        blocks = _blocks(m.get("content"), i)
        if m["role"] == "user":
            out += _user(blocks, i)
        else:
            out.append(_assistant(blocks, i))
    return out


def chat_tools(body: dict) -> list | None:
    """The tools in OpenAI's shape (what templates take); None with ``tool_choice`` "none"."""
    tools = check(body, "tools", list, None)
    choice = check(body, "tool_choice", dict, None)
    if choice is not None and choice.get("type") not in ("auto", "any", "tool", "none"):
        raise _bad("'tool_choice' must have a 'type' of 'auto', 'any', 'tool' or 'none'", "tool_choice")
    if not tools or (choice or {}).get("type") == "none":
        return None
    out = []
    for j, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise _bad(f"tools[{j}] must be an object with a 'name'", "tools")
        if tool.get("type") not in (None, "custom"):
            raise _bad(f"tools[{j}]: Anthropic's server tool {json.dumps(tool.get('type'))[:40]} is not served; "
                       "give custom tools (name, description, input_schema)", "tools")
        schema = tool.get("input_schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise _bad(f"tools[{j}].input_schema must be an object", "tools")
        out.append({"type": "function", "function": {"name": tool["name"], "description": tool.get("description", ""),
                                                     "parameters": schema}})
    return out


def _template_body(body: dict) -> dict:
    """Template arguments: ``thinking`` ({"type": "enabled"} / "disabled") as ``enable_thinking``, and
    ``chat_template_kwargs`` (this server's extension, as on the OpenAI side)."""
    kwargs = dict(check(body, "chat_template_kwargs", dict, {}))
    thinking = check(body, "thinking", dict, None)
    if thinking is not None:
        if thinking.get("type") not in ("enabled", "disabled"):
            raise _bad("'thinking' must have a 'type' of 'enabled' or 'disabled'", "thinking")
        kwargs.setdefault("enable_thinking", thinking["type"] == "enabled")
    return {"chat_template_kwargs": kwargs}


def _prompt(engine, body: dict):
    messages, tools = chat_messages(body), chat_tools(body)
    template = _template_body(body)
    return prompt_builder(engine, "messages", lambda: chat_prompt(engine, template, messages, tools)), tools


def parse_messages(engine, body: Any) -> Request:
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = check(body, "model", str, None)
    if not model:
        raise _bad("'model' is required (any name: this server serves one model)", "model")
    max_tokens = check(body, "max_tokens", int, None, low=1)
    if max_tokens is None:
        raise _bad("'max_tokens' is required", "max_tokens")
    settings = sampling(body, engine.args)
    stream = check(body, "stream", bool, False)
    stop = stop_strings(body, "stop_sequences")
    check(body, "metadata", dict, None)
    build, tools = _prompt(engine, body)
    procs = dict(repetition_penalty=None, repetition_context_size=20, presence_penalty=None, frequency_penalty=None)
    return Request("messages", build, stream, max_tokens, settings, procs, None, stop, -1, model, tools=tools)


def parse_count(engine, body: Any):
    """``/v1/messages/count_tokens``: the prompt builder of the conversation."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return _prompt(engine, body)[0]


class AnthropicReply(Reply):
    """The answer as a message of content blocks (thinking, text, tool_use, in the order produced), or as the
    stream of events that builds it."""

    def __init__(self, handler, engine, req: Request):
        super().__init__(handler, engine, req)
        self.id = "msg_" + uuid.uuid4().hex[:24]
        self.blocks: list[dict] = []
        self.open = False  # the last block still takes deltas (streaming)

    def on_prompt(self, prompt: list[int]) -> None:
        super().on_prompt(prompt)
        if self.req.stream:
            self.handler.start_stream()
            self.started = True
            self._event("message_start", {"message": {**self._message([]), "usage": self._usage(0)}})
            self._event("ping", {})

    def token(self, r, entry, piece: Piece) -> None:
        if piece.reasoning:
            self._add("thinking", piece.reasoning)
        if piece.content:
            self._add("text", piece.content)
        for call in piece.tool_calls:
            self._close()
            block = {"type": "tool_use", "id": "toolu_" + call["id"].removeprefix("call_"), "name": call["name"],
                     "input": call["arguments"] if isinstance(call["arguments"], dict) else {}}
            self.blocks.append(block)
            if self.req.stream:
                self._event("content_block_start", {"index": len(self.blocks) - 1,
                                                    "content_block": {**block, "input": {}}})
                self._event("content_block_delta", {"index": len(self.blocks) - 1, "delta": {
                    "type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}})
            self.open = True

    def _add(self, kind: str, text: str) -> None:
        field = "thinking" if kind == "thinking" else "text"
        if not (self.open and self.blocks[-1]["type"] == kind):
            self._close()
            block = {"type": kind, field: ""}
            if kind == "thinking":
                block["signature"] = ""
            self.blocks.append(block)
            self.open = True
            if self.req.stream:
                self._event("content_block_start", {"index": len(self.blocks) - 1, "content_block": dict(block)})
        self.blocks[-1][field] += text
        if self.req.stream:
            self._event("content_block_delta", {"index": len(self.blocks) - 1,
                                                "delta": {"type": f"{kind}_delta", field: text}})

    def _close(self) -> None:
        if self.open and self.req.stream:
            self._event("content_block_stop", {"index": len(self.blocks) - 1})
        self.open = False

    def stop_reason(self) -> str:
        if self.finish == "stop" and self.made_tool_call:
            return "tool_use"
        if self.finish == "stop":
            return "stop_sequence" if self.stop_string else "end_turn"
        return "max_tokens"

    def _usage(self, output: int) -> dict:
        return {"input_tokens": len(self.prompt) - self.cached, "output_tokens": output,
                "cache_read_input_tokens": self.cached, "cache_creation_input_tokens": 0}

    def _message(self, content: list[dict]) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.req.model, "content": content,
                "stop_reason": None, "stop_sequence": None}

    def end(self) -> None:
        done = {"stop_reason": self.stop_reason(), "stop_sequence": self.stop_string}
        if not self.req.stream:
            return self.handler.send_json(200, {**self._message(self.blocks), **done, "usage": self._usage(self.tokens),
                                                "treeflash": self.stats()})
        self._close()
        self._event("message_delta", {"delta": done, "usage": self._usage(self.tokens), "treeflash": self.stats()})
        self._event("message_stop", {})

    def fail(self, err: Exception) -> None:
        message = getattr(err, "message", None) or (str(err).splitlines() or [type(err).__name__])[0]
        self._event("error", {"error": {"type": "api_error", "message": message}})

    def _event(self, name: str, payload: dict) -> None:
        self.handler.write(sse({"type": name, **payload}, name))
