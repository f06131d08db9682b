"""OpenAI's chat completions and completions: the request checked into a ``Request``, the answer written as
OpenAI's objects and chunks (fields as mlx_lm.server fills them, plus ``reasoning_content`` and the ``treeflash``
extension)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from .fields import RequestError, check, model_name, sampling, stop_strings
from .parsing import Piece
from .prompts import chat_prompt, check_messages, template_tools
from .reply import Reply, Request, sse

ROUTES = {"/v1/chat/completions": "chat", "/chat/completions": "chat", "/v1/completions": "text",
          "/completions": "text"}


def prompt_builder(engine, param: str, tokenize):
    """The prompt's tokens, checked against the model's context (run on the worker thread)."""

    def build_prompt() -> list[int]:
        prompt = tokenize()
        limit = engine.target.max_context
        if not prompt:
            raise RequestError(400, "the prompt is empty", param, "invalid_value")
        if limit is not None and len(prompt) >= limit:
            raise RequestError(400, f"the prompt has {len(prompt)} tokens but the model's context is {limit}; "
                                    "shorten it", param, "context_length_exceeded")
        return prompt

    return build_prompt


def processors(body: dict, engine) -> dict:
    """mlx-lm's ``make_logits_processors`` arguments from the request."""
    out = dict(
        repetition_penalty=check(body, "repetition_penalty", (int, float), None, low=0) or None,
        repetition_context_size=check(body, "repetition_context_size", int, 20, low=1),
        presence_penalty=check(body, "presence_penalty", (int, float), None) or None,
        frequency_penalty=check(body, "frequency_penalty", (int, float), None) or None,
    )
    bias = check(body, "logit_bias", dict, None)
    if bias:
        try:
            out["logit_bias"] = {int(k): float(v) for k, v in bias.items()}
        except (TypeError, ValueError) as err:
            raise RequestError(400, "'logit_bias' must map token ids to numbers", "logit_bias",
                               "invalid_value") from err
        if any(not 0 <= k < engine.target.vocab_size for k in out["logit_bias"]):
            raise RequestError(400, "'logit_bias' names a token outside the vocabulary", "logit_bias",
                               "invalid_value")
    return out


def parse_request(engine, kind: str, body: Any) -> Request:
    """A chat ("chat") or text ("text") completion request, checked."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    args = engine.args
    model = model_name(body, engine)
    if check(body, "n", int, 1) != 1:
        raise RequestError(400, "only one choice per request is served ('n' must be 1)", "n", "invalid_value")
    stream = check(body, "stream", bool, False)
    options = check(body, "stream_options", dict, {})
    include_usage = check(options, "include_usage", bool, False)
    max_tokens = check(body, "max_completion_tokens", int, None, low=1)
    if max_tokens is None:
        max_tokens = check(body, "max_tokens", int, args.max_tokens, low=1)
    settings = sampling(body, args)
    procs = processors(body, engine)
    seed = check(body, "seed", int, None)
    stop = stop_strings(body, "stop")
    trees = check(body, "draft_trees", bool, False)
    if kind == "text" and isinstance(body.get("logprobs"), int) and not isinstance(body.get("logprobs"), bool):
        top_logprobs = check(body, "logprobs", int, 0, low=0, high=20)  # the completions API: how many
        logprobs = True
    else:
        logprobs = check(body, "logprobs", bool, False)
        top_logprobs = check(body, "top_logprobs", int, 0, low=0, high=20)
    tools = None
    if kind == "chat":
        messages = check_messages(body)
        tools = template_tools(body)
        tokenize = lambda: chat_prompt(engine, body, messages, tools)  # noqa: E731
    else:
        text = body.get("prompt")
        if isinstance(text, str) and text:
            tokenize = lambda: engine.tokenizer.encode(text)  # noqa: E731
        elif isinstance(text, list) and text and all(isinstance(t, int) and not isinstance(t, bool) for t in text):
            if any(not 0 <= t < engine.target.vocab_size for t in text):
                raise RequestError(400, "'prompt' holds a token id outside the vocabulary", "prompt", "invalid_value")
            tokenize = lambda: list(text)  # noqa: E731
        else:
            raise RequestError(400, "'prompt' must be a non-empty string (or array of token ids)", "prompt",
                               "invalid_value")
    build = prompt_builder(engine, "messages" if kind == "chat" else "prompt", tokenize)
    return Request(kind, build, stream, max_tokens, settings, procs, seed, stop, top_logprobs if logprobs else -1,
                   model, include_usage, tools, trees)


def tool_call(call: dict, index: int | None = None) -> dict:
    """OpenAI's tool call object (``index`` in streamed deltas); ``arguments`` as a JSON string."""
    out = {"id": call["id"], "type": "function",
           "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
    return out if index is None else {"index": index, **out}


class OpenAIReply(Reply):
    def __init__(self, handler, engine, req: Request):
        super().__init__(handler, engine, req)
        chat = req.api == "chat"
        self.base = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
                     "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                     "model": req.model, "system_fingerprint": "treeflash-mlx"}
        self.text, self.reasoning, self.calls, self.entries = "", "", [], []  # the whole answer
        self.pending, self.pending_entries = Piece(), []  # a stream's part not sent yet
        self.sent_calls = 0

    def token(self, r, entry, piece: Piece) -> None:
        self.text += piece.content
        self.reasoning += piece.reasoning
        self.calls += piece.tool_calls
        if entry is not None:
            self.entries.append(entry)
        if not self.req.stream:
            return
        self.pending.content += piece.content
        self.pending.reasoning += piece.reasoning
        self.pending.tool_calls += piece.tool_calls
        if entry is not None:
            self.pending_entries.append(entry)
        # as mlx_lm.server: nothing is sent while a tool call's text is coming (it is never content)
        if (self.pending or self.pending_entries) and not (self.parser and self.parser.in_tool_call):
            self._send(self._chunk(self.pending, None, self.pending_entries))
            self.pending, self.pending_entries = Piece(), []

    def on_round(self, description: dict) -> None:
        if self.req.stream:
            self._send({**self.base, "object": self._chunk_object(), "choices": [],
                        "treeflash": {"round": description}})

    def finish_reason(self) -> str:
        finish = self.finish or "length"
        return "tool_calls" if finish == "stop" and self.made_tool_call else finish

    def usage(self) -> dict:
        return {"prompt_tokens": len(self.prompt), "completion_tokens": self.tokens,
                "total_tokens": len(self.prompt) + self.tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached}}

    def end(self) -> None:
        if not self.req.stream:
            return self.handler.send_json(200, self._complete())
        final = self._chunk(self.pending, self.finish_reason(), self.pending_entries)
        stats = self.stats()
        if not self.req.include_usage:
            final["treeflash"] = stats
        self._send(final)
        if self.req.include_usage:
            self._send({**self.base, "object": self._chunk_object(), "choices": [],
                        "usage": {**self.usage(), "treeflash": stats}})
        self.handler.write(b"data: [DONE]\n\n")

    # -- shapes

    def _send(self, payload: dict) -> None:
        if not self.started:
            self.handler.start_stream()
            self.started = True
        self.handler.write(sse(payload))

    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.req.api == "chat" else "text_completion"

    def _logprobs(self, entries) -> dict | None:
        """OpenAI's logprobs object from (token text, log-probability, most likely (text, log-probability))."""
        if not entries:
            return None
        if self.req.api == "chat":
            return {"content": [
                {"token": text, "logprob": lp, "bytes": list(text.encode()),
                 "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top]}
                for text, lp, top in entries]}
        return {"tokens": [text for text, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [dict(top) for _, _, top in entries]}

    def _chunk(self, piece: Piece, finish: str | None, entries) -> dict:
        if self.req.api != "chat":
            choice = {"index": 0, "text": piece.content, "finish_reason": finish, "logprobs": self._logprobs(entries)}
            return {**self.base, "choices": [choice]}
        delta = {"role": "assistant"}
        if piece.content:
            delta["content"] = piece.content
        if piece.reasoning:
            delta["reasoning_content"] = delta["reasoning"] = piece.reasoning  # the two names clients read
        if piece.tool_calls:
            delta["tool_calls"] = [tool_call(c, self.sent_calls + i) for i, c in enumerate(piece.tool_calls)]
            self.sent_calls += len(piece.tool_calls)
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": self._logprobs(entries)}
        return {**self.base, "object": "chat.completion.chunk", "choices": [choice]}

    def _complete(self) -> dict:
        logprobs = self._logprobs(self.entries)
        if self.req.api == "chat":
            message = {"role": "assistant", "content": self.text if self.text or not self.calls else None}
            if self.reasoning:
                message["reasoning_content"] = message["reasoning"] = self.reasoning
            if self.calls:
                message["tool_calls"] = [tool_call(c) for c in self.calls]
            choice = {"index": 0, "message": message, "finish_reason": self.finish_reason(), "logprobs": logprobs}
        else:
            choice = {"index": 0, "text": self.text, "finish_reason": self.finish_reason(), "logprobs": logprobs}
        return {**self.base, "choices": [choice], "usage": self.usage(), "treeflash": self.stats()}


def error_body(err: RequestError) -> dict:
    return err.body()
