"""The model's output split into the answer, its reasoning and its tool calls, as mlx_lm.server splits it.

mlx-lm's tokenizer wrapper knows the model's formats: its thinking markers (``think_start``/``think_end``), its
tool-call markers (``tool_call_start``/``tool_call_end``) and the parser for the text between them
(``tool_parser``). mlx-lm's ``TextStateMachine`` (built once per tokenizer by ``make_text_state_machine``)
follows the decoded text through the states "normal", "reasoning" and "tool", strips the markers, and holds back
text that may still turn out to be a marker. No format is parsed by hand here.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

from mlx_lm.generate import TextStateMachine

log = logging.getLogger("treeflash_mlx.server")


def initial_state(tokenizer, prompt: list[int]) -> str:
    """Where the answer starts: "reasoning" when the prompt opens a thinking block it does not close (templates
    that start the assistant's turn with ``<think>``), else "normal"; a response format may name its own."""
    state = "normal"
    if tokenizer.has_thinking and tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt):
        state = "reasoning"
    return tokenizer.response_initial_state or state


@dataclass
class Piece:
    """What one token added: answer text, reasoning text, and tool calls completed with it."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)  # {"id", "name", "arguments": parsed JSON}

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


class OutputParser:
    """Feeds each token's text through the state machine; ``feed`` answers what it added (a ``Piece``)."""

    def __init__(self, tokenizer, text_states, tools: list | None, prompt: list[int]):
        self.tokenizer, self.tools = tokenizer, tools
        start = initial_state(tokenizer, prompt)
        self.state, self.current = text_states.make_state(start), start
        self.tool_text = ""
        self.made_tool_call = False

    def feed(self, text: str, finish: str | None) -> Piece:
        """One token's text; ``finish`` its finish reason ("stop": held-back text is dropped, as it can only be
        the start of a marker; "length": it is flushed to its state)."""
        self.state, segments = TextStateMachine.split(self.state, text)
        if finish == "stop":
            self.state, _ = TextStateMachine.discard(self.state)
        elif finish == "length":
            self.state, flushed, state = TextStateMachine.flush(self.state)
            segments.append((state, flushed))
        piece = Piece()
        for state, segment in segments:
            if state == "reasoning":
                piece.reasoning += segment
            elif state == "tool":
                self.tool_text += segment
            elif state == "normal":
                if self.current == "tool":  # the call's end marker: the call is complete
                    piece.tool_calls += self._parse(self.tool_text)
                    self.tool_text = ""
                piece.content += segment
            self.current = state
        if finish and self.current == "tool" and self.tool_text:  # a call without its end marker (some formats)
            piece.tool_calls += self._parse(self.tool_text)
            self.tool_text = ""
        return piece

    @property
    def in_tool_call(self) -> bool:
        """Inside a call's text: mlx_lm.server sends nothing until the call is complete."""
        return self.current == "tool"

    def _parse(self, text: str) -> list[dict]:
        """The calls in one call's text, by the tokenizer's own parser; text it cannot parse (a call cut off by
        ``max_tokens``) is logged and dropped, as mlx_lm.server does."""
        self.made_tool_call = True
        parser = self.tokenizer.tool_parser
        if parser is None:
            return []
        try:
            parsed = parser(text, self.tools)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning("could not parse a tool call (%s: %s); the text was %r", type(err).__name__, err, text[:200])
            return []
        calls = parsed if isinstance(parsed, list) else [parsed]
        return [{"id": c.get("id") or f"call_{uuid.uuid4().hex[:24]}", "name": c["name"],
                 "arguments": c.get("arguments", {})} for c in calls if isinstance(c, dict) and "name" in c]
