"""One request's answer, built from the worker's results: what every API shares (the parsed request, the token
count, the acceptance, the split into answer / reasoning / tool calls); each API's module writes it in its own
shape by subclassing ``Reply``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from .engine import Job
from .parsing import OutputParser, Piece


@dataclass
class Request:
    """A checked request, whichever API it came through."""

    api: str  # "chat", "text" (OpenAI) or "messages" (Anthropic)
    build_prompt: Callable[[], list[int]]
    stream: bool
    max_tokens: int
    sampling: dict
    processors: dict
    seed: int | None
    stop: list[str]
    top_logprobs: int  # < 0: no logprobs
    model: str
    include_usage: bool = False
    tools: list | None = None
    trees: bool = False  # the stream extension: each round's draft tree (the chat page asks for it)

    def job(self) -> Job:
        return Job(self.build_prompt, self.max_tokens, self.sampling, self.processors, self.seed, self.stop,
                   self.top_logprobs, trees=self.trees and self.stream)


class Reply:
    """Receives the worker's results in order (``prompt``, ``token``..., ``round``..., ``end``) and writes the
    answer through the handler (``send_json``, ``start_stream``, ``send_event``)."""

    def __init__(self, handler, engine, req: Request):
        self.handler, self.engine, self.req = handler, engine, req
        self.prompt: list[int] = []
        self.tokens = 0
        self.last = None  # the last GenerationResponse
        self.taus: dict[int, int] = {}  # round -> tokens it committed
        self.finish: str | None = None
        self.stop_string: str | None = None
        self.parser: OutputParser | None = None
        self.started = False  # a stream's headers are out: errors can no longer be a status code
        self.auto: dict | None = None  # --tree-size auto: the budgets chosen and the plain steps (Tuner.report)

    # -- the worker's results

    def on_prompt(self, prompt: list[int]) -> None:
        self.prompt = prompt
        if self.req.api != "text":
            self.parser = OutputParser(self.engine.tokenizer, self.engine.text_states, self.req.tools, prompt)

    def on_token(self, r, entry) -> None:
        self.tokens += 1
        self.last = r
        self.taus[r.round] = r.acceptance_length
        self.finish = r.finish_reason
        piece = self.parser.feed(r.text, r.finish_reason) if self.parser else Piece(content=r.text)
        self.token(r, entry, piece)

    def on_round(self, description: dict) -> None:
        """A verified round's tree (only when the request asked for them)."""

    def token(self, r, entry, piece: Piece) -> None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError

    def fail(self, err: Exception) -> None:
        """An error after the stream started (the default: end the stream where it is)."""

    # -- shared figures

    @property
    def made_tool_call(self) -> bool:
        return self.parser is not None and self.parser.made_tool_call

    @property
    def cached(self) -> int:
        return self.last.cached_tokens if self.last is not None else 0

    def stats(self) -> dict:
        """The treeflash extension: the drafting mode, τ (tokens per verification), speeds."""
        taus = [v for k, v in self.taus.items() if k > 0]
        last = self.last
        return {
            "mode": self.engine.mode,
            "mean_acceptance_length": round(sum(taus) / len(taus), 3) if taus else None,
            "rounds": len(taus),
            "prefilled_tokens": len(self.prompt) - self.cached,
            "prompt_tps": round(last.prompt_tps, 1) if last else None,
            "generation_tps": round(last.generation_tps, 1) if last else None,
            **({"tree_size_auto": self.auto} if self.auto else {}),
        }

    def log_info(self) -> str:
        auto = f" plain_steps={self.auto['plain_step_fraction']:.0%}" if self.auto else ""
        return (f"prompt={len(self.prompt)} cached={self.cached} completion={self.tokens} "
                f"tau={self.stats()['mean_acceptance_length']}{auto}")


def sse(payload: dict, event: str | None = None) -> bytes:
    """One server-sent event (Anthropic's streams name each event; OpenAI's do not)."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload)}\n\n".encode()
