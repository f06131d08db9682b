"""Chat messages (OpenAI's shape; the Anthropic endpoint converts to it) to prompt tokens through the model's
chat template, with the tools and the template arguments, as mlx_lm.server applies them."""

from __future__ import annotations

import json
from typing import Any

from .fields import RequestError, check


def _text(content: Any, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):  # OpenAI's content parts: only text ones are understood
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(400, f"messages[{i}].content: only text parts are supported", "messages",
                                   "invalid_value")
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(400, f"messages[{i}].content must be a string or an array of text parts", "messages",
                       "invalid_type")


def _tool_calls(calls: Any, i: int) -> list[dict]:
    """An assistant message's tool calls with their JSON ``arguments`` parsed, as templates expect (and as
    mlx_lm.server hands them over)."""
    if not isinstance(calls, list):
        raise RequestError(400, f"messages[{i}].tool_calls must be an array", "messages", "invalid_type")
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestError(400, f"messages[{i}].tool_calls: each needs a 'function' with a 'name'", "messages",
                               "invalid_value")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as err:
                raise RequestError(400, f"messages[{i}].tool_calls: 'arguments' is not valid JSON ({err})",
                                   "messages", "invalid_value") from err
        out.append({**call, "function": {**function, "arguments": arguments or {}}})
    return out


def check_messages(body: dict) -> list[dict]:
    """The request's messages, checked, with text-part contents joined into strings and tool-call arguments
    parsed."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty array", "messages", "invalid_value")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(400, f"messages[{i}] must be an object with a 'role' string", "messages",
                               "invalid_value")
        message = {**m, "content": _text(m.get("content"), i)}
        if m.get("tool_calls") is not None:
            message["tool_calls"] = _tool_calls(m["tool_calls"], i)
        clean.append(message)
    return clean


def template_tools(body: dict) -> list | None:
    """The tools the template is shown: ``tools``, unless ``tool_choice`` is "none". Other choices ("auto",
    "required", a named function) cannot be enforced on the output; the template sees the tools either way."""
    tools = check(body, "tools", list, None) or None
    choice = body.get("tool_choice")
    if choice is not None and choice not in ("none", "auto", "required") and not (
            isinstance(choice, dict) and choice.get("type") == "function"):
        raise RequestError(400, "'tool_choice' must be 'none', 'auto', 'required' or a function", "tool_choice",
                           "invalid_value")
    return None if choice == "none" else tools


def chat_prompt(engine, body: dict, clean: list[dict] | None = None, tools: list | None = None) -> list[int]:
    """The prompt's tokens: the chat template over the messages, with ``tools`` and the template arguments
    (the server's ``--chat-template-args``, then the request's ``chat_template_kwargs``)."""
    clean = check_messages(body) if clean is None else clean
    tools = template_tools(body) if tools is None else tools
    kwargs = dict(engine.args.chat_template_args)
    kwargs.update(check(body, "chat_template_kwargs", dict, {}))
    tokenizer = engine.tokenizer
    if tokenizer.chat_template is None:  # no template: "role: content" lines, then the assistant's turn
        text = "".join(f"{m['role']}: {m['content']}\n" for m in clean) + "assistant: "
        return tokenizer.encode(text)
    try:
        prompt = tokenizer.apply_chat_template(clean, tools=tools, add_generation_prompt=True, tokenize=True,
                                               **kwargs)
    except Exception as err:
        raise RequestError(400, f"the model's chat template refused the messages: {err}", "messages",
                           "invalid_value") from err
    if isinstance(prompt, dict):  # some tokenizers answer with an encoding
        prompt = prompt["input_ids"]
    return list(prompt)
