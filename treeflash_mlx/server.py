"""An OpenAI-compatible HTTP server with tree drafting inside: ``python -m treeflash_mlx.server --model M --drafter D``.

Endpoints, request fields and flags follow ``mlx_lm.server`` where they apply (README, "Serving chat apps").
One worker thread runs the generations, one at a time, in arrival order; each request's handler thread waits
for its tokens on a queue of its own, so requests never share state. A conversation's next turn reuses the
prompt cache of the turn before (a small LRU of caches, bounded in count and bytes). Bad requests get a 4xx
JSON error in OpenAI's shape and the server goes on serving.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from . import distributed, quantized_kv
from ._cli import add_drafting_arguments, drafting_settings
from .drafting import default_mode, make_drafting
from .loading import demo_paths, load
from .prompt_cache import PromptCache, make_prompt_cache
from .speculative import stream_generate
from .target import Target

MAX_BODY = 32 * 2**20
log = logging.getLogger("treeflash_mlx.server")


class RequestError(Exception):
    """A request the server refuses: HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def parse_size(text: str) -> int:
    """``1G``, ``512M``, ``64K`` or a plain number of bytes."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    text = text.strip().upper().removesuffix("B")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 512M, 2G)") from err


class CacheLRU:
    """Prompt caches of recent conversations, most recently used last, bounded in count and in bytes.

    ``take`` hands out the cache sharing the longest prefix with a prompt (removed while in use), ``put`` returns
    it and evicts the least recently used ones past the bounds."""

    MIN_SHARED = 8

    def __init__(self, max_entries: int, max_bytes: int | None, sizes=lambda sizes: sizes):
        # ``sizes``: the entries' bytes as the bound sees them; with a sharded target every rank's largest, so
        # that every rank evicts alike (distributed.largest)
        self.max_entries, self.max_bytes, self.sizes = max_entries, max_bytes, sizes
        self.entries: list[PromptCache] = []
        self.lock = threading.Lock()

    def take(self, prompt: list[int], make) -> PromptCache:
        """A cache for ``prompt``: the kept one it extends (removed while in use), else a copy of the prefix it
        shares with one (at least ``MIN_SHARED`` tokens; the original stays for its own conversation), else a
        new one."""
        with self.lock:
            best, best_len = None, 0
            for cache in self.entries:
                n = 0
                for a, b in zip(cache.tokens, prompt):
                    if a != b:
                        break
                    n += 1
                if n > best_len or (n == best_len and best is not None and len(cache.tokens) < len(best.tokens)):
                    best, best_len = cache, n
            if best is not None and best_len == len(best.tokens):
                self.entries.remove(best)
                return best
            if best is not None and best_len >= self.MIN_SHARED:
                self.entries.remove(best)
                self.entries.append(best)  # used: now the most recent
                return best.prefix_copy(best_len)
        return make()

    def put(self, cache: PromptCache) -> None:
        if self.max_entries <= 0:
            return
        with self.lock:
            self.entries.append(cache)
            sizes = self.sizes([c.nbytes for c in self.entries]) if self.max_bytes is not None else []
            while len(self.entries) > self.max_entries or (self.max_bytes is not None and sum(sizes) > self.max_bytes):
                self.entries.pop(0)
                sizes = sizes[1:]

    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.entries)


@dataclass
class Job:
    """One generation: what the worker needs, the queue it answers on, and a flag the handler sets to stop it."""

    build_prompt: Callable[[], list[int]]  # tokenizes on the worker thread, the only one using the tokenizer
    max_tokens: int
    sampling: dict
    processors: dict
    seed: int | None
    stop: list[str]
    top_logprobs: int
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Engine:
    """The loaded models and the worker thread that runs generations one at a time."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        model_path, drafter_path = demo_paths(args.model, args.drafter)
        tokenizer_config = {"trust_remote_code": True} if args.trust_remote_code else None
        self.model, self.tokenizer, self.drafter = load(model_path, drafter_path, tokenizer_config,
                                                        pipeline=args.pipeline)
        self.sharded = distributed.world().size() > 1  # rank 0 shares each request; the others follow()
        if args.chat_template:
            self.tokenizer.chat_template = args.chat_template
        self.target = Target(self.model)
        self.mode = args.mode or default_mode(self.drafter)
        self.settings = dict(mode=self.mode, **drafting_settings(args))
        make_drafting(self.drafter, self.target, **self.settings)  # check the settings now, not per request
        quantized_kv.kv_quantization(**quantized_kv.check_arguments(args), head_dim=quantized_kv.head_dim(self.model))
        self.model_names = {"default_model", args.model or "treeflash-demo", str(model_path),
                            str(self.model.model_path)}
        self.model_id = args.model or "treeflash-demo"
        self.caches = CacheLRU(args.prompt_cache_size, args.prompt_cache_bytes,
                               distributed.largest if self.sharded else (lambda sizes: sizes))
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.worker = threading.Thread(target=self._work, name="generation", daemon=True)
        if distributed.is_main():
            self.worker.start()

    def submit(self, job: Job) -> Job:
        self.jobs.put(job)
        return job

    def stop(self) -> None:
        self.jobs.put(None)
        if self.sharded:
            self.worker.join()
            distributed.share(None)  # the other ranks' follow() ends

    def follow(self) -> None:
        """Ranks > 0 of a sharded target: run each generation rank 0 shares, in step with it, answering no one,
        until rank 0 shares None (it stops)."""
        while (order := distributed.share()) is not None:
            try:
                for _ in self._responses(order):
                    pass
            except distributed.RankLost:
                raise
            except Exception:  # rank 0 meets the same error with the same input, and answers it
                log.debug("generation failed", exc_info=True)

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():
                job.out.put(("done", None))
                continue
            try:
                self._generate(job)
            except Exception as err:  # a request that fails must not take the worker down
                log.exception("generation failed")
                job.out.put(("error", err))
            else:
                job.out.put(("done", None))

    def _generate(self, job: Job) -> None:
        try:
            prompt = job.build_prompt()
        except RequestError as err:
            job.out.put(("error", err))
            return
        job.out.put(("prompt", prompt))
        order = dict(prompt=prompt, max_tokens=job.max_tokens, sampling=job.sampling, processors=job.processors,
                     seed=job.seed, stop=job.stop)
        if self.sharded:
            distributed.share(order)  # the other ranks run the same generation (follow)
        responses = self._responses(order)
        for r in responses:
            if job.cancelled.is_set() and not self.sharded:  # sharded: every rank runs to the end together
                responses.close()
                break
            if not job.cancelled.is_set():
                job.out.put(("token", (r, self._entry(job, r))))

    def _entry(self, job: Job, r) -> tuple | None:
        """(token text, log-probability, [(text, log-probability), ...] of the most likely), as asked."""
        if job.top_logprobs < 0:
            return None
        top = []
        if job.top_logprobs > 0:
            ids = mx.argpartition(-r.logprobs, kth=job.top_logprobs - 1)[: job.top_logprobs]
            pairs = sorted(zip(ids.tolist(), r.logprobs[ids].tolist()), key=lambda p: -p[1])
            top = [(self.tokenizer.decode([i]), v) for i, v in pairs]
        return self.tokenizer.decode([r.token]), float(r.logprobs[r.token]), top

    def _responses(self, order: dict):
        """One generation's responses, its prompt cache taken from and returned to the kept ones."""
        cache = self.caches.take(order["prompt"], lambda: make_prompt_cache(self.model, self.drafter))
        try:
            if order["seed"] is not None:
                mx.random.seed(order["seed"])
            yield from stream_generate(
                self.model, self.tokenizer, order["prompt"], order["max_tokens"], drafter=self.drafter,
                sampler=make_sampler(**order["sampling"]),
                logits_processors=make_logits_processors(**order["processors"]),
                prompt_cache=cache, prefill_step_size=self.args.prefill_step_size, stop_strings=order["stop"],
                **self.settings, **quantized_kv.check_arguments(self.args),
            )
        finally:
            self.caches.put(cache)


# ---------------------------------------------------------------------------------------------- request parsing

def _check(body: dict, name: str, kinds, default=None, low=None, high=None, low_open=False):
    value = body.get(name, default)
    if value is None:
        return default
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join({int: "an integer", float: "a number", bool: "a boolean", str: "a string",
                             dict: "an object", list: "an array"}[k] for k in kinds)
        raise RequestError(400, f"'{name}' must be {names}, got {json.dumps(value)[:60]}", name, "invalid_type")
    if low is not None and (value <= low if low_open else value < low):
        raise RequestError(400, f"'{name}' must be {'>' if low_open else '>='} {low}, got {value}", name,
                           "invalid_value")
    if high is not None and value > high:
        raise RequestError(400, f"'{name}' must be <= {high}, got {value}", name, "invalid_value")
    return value


@dataclass
class Request:
    kind: str  # "chat" or "text"
    build_prompt: Callable[[], list[int]]
    stream: bool
    include_usage: bool
    max_tokens: int
    sampling: dict
    processors: dict
    seed: int | None
    stop: list[str]
    logprobs: bool
    top_logprobs: int
    model: str


def _message_text(content: Any, i: int) -> Any:
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


def parse_request(engine: Engine, kind: str, body: Any) -> Request:
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    args = engine.args
    model = _check(body, "model", str, "default_model")
    if model not in engine.model_names:
        raise RequestError(404, f"the model '{model}' does not exist; this server serves '{engine.model_id}'",
                           "model", "model_not_found")
    if _check(body, "n", int, 1) != 1:
        raise RequestError(400, "only one choice per request is served ('n' must be 1)", "n", "invalid_value")
    stream = _check(body, "stream", bool, False)
    options = _check(body, "stream_options", dict, {})
    include_usage = _check(options, "include_usage", bool, False)
    max_tokens = _check(body, "max_completion_tokens", int, None, low=1)
    if max_tokens is None:
        max_tokens = _check(body, "max_tokens", int, args.max_tokens, low=1)
    sampling = dict(
        temp=float(_check(body, "temperature", (int, float), args.temp, low=0)),
        top_p=float(_check(body, "top_p", (int, float), args.top_p, low=0, high=1, low_open=True)),
        min_p=float(_check(body, "min_p", (int, float), args.min_p, low=0, high=1)),
        top_k=_check(body, "top_k", int, args.top_k, low=0),
    )
    processors = dict(
        repetition_penalty=_check(body, "repetition_penalty", (int, float), None, low=0) or None,
        repetition_context_size=_check(body, "repetition_context_size", int, 20, low=1),
        presence_penalty=_check(body, "presence_penalty", (int, float), None) or None,
        frequency_penalty=_check(body, "frequency_penalty", (int, float), None) or None,
    )
    bias = _check(body, "logit_bias", dict, None)
    if bias:
        try:
            processors["logit_bias"] = {int(k): float(v) for k, v in bias.items()}
        except (TypeError, ValueError) as err:
            raise RequestError(400, "'logit_bias' must map token ids to numbers", "logit_bias",
                               "invalid_value") from err
        if any(not 0 <= k < engine.target.vocab_size for k in processors["logit_bias"]):
            raise RequestError(400, "'logit_bias' names a token outside the vocabulary", "logit_bias",
                               "invalid_value")
    seed = _check(body, "seed", int, None)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or any(not isinstance(s, str) or not s for s in stop):
        raise RequestError(400, "'stop' must be a non-empty string or an array of them", "stop", "invalid_value")
    if kind == "text" and isinstance(body.get("logprobs"), int) and not isinstance(body.get("logprobs"), bool):
        top_logprobs = _check(body, "logprobs", int, 0, low=0, high=20)  # the completions API: how many
        logprobs = True
    else:
        logprobs = _check(body, "logprobs", bool, False)
        top_logprobs = _check(body, "top_logprobs", int, 0, low=0, high=20)
    if kind == "chat":
        messages = check_messages(body)
        tokenize = lambda: chat_prompt(engine, body, messages)  # noqa: E731
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
    param = "messages" if kind == "chat" else "prompt"

    def build_prompt() -> list[int]:
        prompt = tokenize()
        limit = engine.target.max_context
        if not prompt:
            raise RequestError(400, "the prompt is empty", param, "invalid_value")
        if limit is not None and len(prompt) >= limit:
            raise RequestError(400, f"the prompt has {len(prompt)} tokens but the model's context is {limit}; "
                                    "shorten it", param, "context_length_exceeded")
        return prompt

    return Request(kind, build_prompt, stream, include_usage, max_tokens, sampling, processors, seed, stop, logprobs,
                   top_logprobs if logprobs else -1, model)


def check_messages(body: dict) -> list[dict]:
    """The request's messages, checked, with text-part contents joined into strings."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty array", "messages", "invalid_value")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(400, f"messages[{i}] must be an object with a 'role' string", "messages",
                               "invalid_value")
        clean.append({**m, "content": _message_text(m.get("content"), i)})
    return clean


def chat_prompt(engine: Engine, body: dict, clean: list[dict] | None = None) -> list[int]:
    """The prompt's tokens: the chat template over the messages, with ``tools`` and the template arguments."""
    clean = check_messages(body) if clean is None else clean
    tools = _check(body, "tools", list, None)
    kwargs = dict(engine.args.chat_template_args)
    kwargs.update(_check(body, "chat_template_kwargs", dict, {}))
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


# ---------------------------------------------------------------------------------------------- HTTP

class Handler(BaseHTTPRequestHandler):
    engine: Engine  # set on the subclass that ``make_server`` builds
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # one line per request is written by ``_log`` instead
        pass

    def _log(self, status: int, info: str = "") -> None:
        seconds = time.perf_counter() - self._started
        log.info("%s %s %s %d %.3fs%s", self.client_address[0], self.command, self.path, status, seconds,
                 f" {info}" if info else "")

    def _cors(self) -> None:
        allowed = self.engine.args.allowed_origins
        origin = self.headers.get("Origin")
        if "*" in allowed:
            self.send_header("Access-Control-Allow-Origin", "*")
        elif origin in allowed:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
        self.send_header("Access-Control-Allow-Methods", "*")
        self.send_header("Access-Control-Allow-Headers", "*")

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self._cors()
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _error(self, err: RequestError) -> None:
        self._json(err.status, err.body())
        self._log(err.status, f"error={err.code or err.status}")

    def do_OPTIONS(self):
        self._started = time.perf_counter()
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self._cors()
        self.end_headers()
        self._log(204)

    def do_GET(self):
        self._started = time.perf_counter()
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            self._json(200, {"status": "ok"})
        elif path in ("/v1/models", "/models"):
            self._json(200, {"object": "list", "data": [
                {"id": self.engine.model_id, "object": "model", "created": int(time.time()),
                 "owned_by": "treeflash-mlx"}]})
        else:
            return self._error(RequestError(404, f"no route GET {path}", code="not_found"))
        self._log(200)

    def do_POST(self):
        self._started = time.perf_counter()
        kinds = {"/v1/chat/completions": "chat", "/chat/completions": "chat", "/v1/completions": "text",
                 "/completions": "text"}
        path = self.path.split("?")[0].rstrip("/")
        try:
            if path not in kinds:
                raise RequestError(404, f"no route POST {path}", code="not_found")
            length = self.headers.get("Content-Length")
            if length is None:
                raise RequestError(411, "a Content-Length header is required")
            try:
                length = int(length)
            except ValueError as err:
                raise RequestError(400, "the Content-Length header is not a number") from err
            if not 0 <= length <= MAX_BODY:
                raise RequestError(413, f"the request body must be at most {MAX_BODY} bytes")
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise RequestError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from err
            request = parse_request(self.engine, kinds[path], body)
        except RequestError as err:
            self.close_connection = True
            return self._error(err)
        self._serve(request)

    # -- generation

    def _serve(self, req: Request) -> None:
        job = self.engine.submit(Job(req.build_prompt, req.max_tokens, req.sampling, req.processors, req.seed,
                                     req.stop, req.top_logprobs))
        created, rid = int(time.time()), ("chatcmpl-" if req.kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self._base = {"id": rid, "object": "chat.completion" if req.kind == "chat" else "text_completion",
                      "created": created, "model": req.model, "system_fingerprint": "treeflash-mlx"}
        self._prompt: list[int] = []
        state = {"text": "", "tokens": 0, "finish": None, "last": None, "rounds": {}, "logprobs": []}
        started_stream = False
        try:
            for kind, payload in self._results(job):
                if kind == "prompt":
                    self._prompt = payload
                    continue
                if kind == "error":
                    if started_stream:
                        break
                    if isinstance(payload, RequestError):
                        return self._error(payload)
                    status = 400 if isinstance(payload, ValueError) else 500
                    return self._error(RequestError(status, str(payload).splitlines()[0] if str(payload) else
                                                    type(payload).__name__))
                r, entry = payload
                state["tokens"] += 1
                state["last"] = r
                state["rounds"][r.round] = r.acceptance_length
                state["finish"] = r.finish_reason
                if entry is not None:
                    state["logprobs"].append(entry)
                if req.stream:
                    if not started_stream:
                        self._start_stream()
                        started_stream = True
                    if r.text or entry is not None:
                        self._send_event(self._chunk(req, r.text, None, [entry] if entry is not None else None))
                else:
                    state["text"] += r.text
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
            job.cancelled.set()
            self.close_connection = True
            self._log(499, f"client gone after {state['tokens']} tokens")
            return
        usage = self._usage(req, state)
        try:
            if req.stream:
                if not started_stream:
                    self._start_stream()
                final = self._chunk(req, "", state["finish"] or "length", None)
                if not req.include_usage:
                    final["treeflash"] = usage["treeflash"]
                self._send_event(final)
                if req.include_usage:
                    self._send_event({**self._base, "object": self._base["object"] + (".chunk" if req.kind == "chat"
                                                                                       else ""),
                                      "choices": [], "usage": usage})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            else:
                self._json(200, self._complete(req, state, usage))
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True
            return self._log(499, "client gone at the end")
        ext = usage.get("treeflash") or {}
        self._log(200, f"prompt={len(self._prompt)} cached={usage['prompt_tokens_details']['cached_tokens']} "
                       f"completion={state['tokens']} tau={ext.get('mean_acceptance_length')}")

    def _results(self, job: Job):
        while True:
            kind, payload = job.out.get()
            if kind == "done":
                return
            yield kind, payload

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self._cors()
        self.end_headers()
        self.close_connection = True

    def _send_event(self, payload: dict) -> None:
        self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
        self.wfile.flush()

    def _logprobs(self, req: Request, entries) -> dict | None:
        """OpenAI's logprobs object from (token text, log-probability, most likely (text, log-probability)) entries."""
        if not entries:
            return None
        if req.kind == "chat":
            return {"content": [
                {"token": text, "logprob": lp, "bytes": list(text.encode()),
                 "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top]}
                for text, lp, top in entries]}
        return {"tokens": [text for text, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [dict(top) for _, _, top in entries]}

    def _chunk(self, req: Request, text: str, finish: str | None, entries) -> dict:
        if req.kind == "chat":
            delta = {"role": "assistant"}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": self._logprobs(req, entries)}
            return {**self._base, "object": "chat.completion.chunk", "choices": [choice]}
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": self._logprobs(req, entries)}
        return {**self._base, "choices": [choice]}

    def _usage(self, req: Request, state: dict) -> dict:
        last = state["last"]
        taus = [v for k, v in state["rounds"].items() if k > 0]
        cached = last.cached_tokens if last is not None else 0
        return {
            "prompt_tokens": len(self._prompt),
            "completion_tokens": state["tokens"],
            "total_tokens": len(self._prompt) + state["tokens"],
            "prompt_tokens_details": {"cached_tokens": cached},
            "treeflash": {
                "mode": self.engine.mode,
                "mean_acceptance_length": round(sum(taus) / len(taus), 3) if taus else None,
                "rounds": len(taus),
                "prefilled_tokens": len(self._prompt) - cached,
                "prompt_tps": round(last.prompt_tps, 1) if last else None,
                "generation_tps": round(last.generation_tps, 1) if last else None,
            },
        }

    def _complete(self, req: Request, state: dict, usage: dict) -> dict:
        logprobs = self._logprobs(req, state["logprobs"])
        if req.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": state["text"]},
                      "finish_reason": state["finish"] or "length", "logprobs": logprobs}
        else:
            choice = {"index": 0, "text": state["text"], "finish_reason": state["finish"] or "length",
                      "logprobs": logprobs}
        usage = dict(usage)
        extension = usage.pop("treeflash")
        return {**self._base, "choices": [choice], "usage": usage, "treeflash": extension}


def make_server(engine: Engine, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"engine": engine})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m treeflash_mlx.server",
        description="OpenAI-compatible server (as mlx_lm.server) with lossless tree-drafted decoding.",
    )
    p.add_argument("--model", default=None,
                   help="target: mlx-lm/Hugging Face directory or hub repo id (default: the bundled demo pair)")
    p.add_argument("--drafter", default=None, help="drafter directory or hub repo id (TreeFlash or DFlash)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--allowed-origins", type=lambda s: s.split(","), default=["*"],
                   help="CORS origins, comma-separated (default: *)")
    p.add_argument("--trust-remote-code", action="store_true", help="let the tokenizer run its own code")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    p.add_argument("--chat-template", default="", help="a chat template to use instead of the tokenizer's")
    p.add_argument("--chat-template-args", type=json.loads, default={},
                   help='JSON arguments for the chat template, e.g. \'{"enable_thinking": false}\'')
    p.add_argument("--temp", type=float, default=0.0, help="default sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=512, help="default completion length")
    p.add_argument("--prefill-step-size", type=int, default=2048)
    p.add_argument("--prompt-cache-size", type=int, default=10, help="conversations whose caches are kept")
    p.add_argument("--prompt-cache-bytes", type=parse_size, default=parse_size("2G"),
                   help="bound on the kept caches' memory (default: 2G)")
    add_drafting_arguments(p)
    quantized_kv.add_arguments(p)
    distributed.add_arguments(p)
    return p


def check_args(args: argparse.Namespace) -> None:
    for name, ok, rule in (("max_tokens", args.max_tokens >= 1, ">= 1"), ("temp", args.temp >= 0, ">= 0"),
                           ("top_p", 0 < args.top_p <= 1, "in (0, 1]"), ("top_k", args.top_k >= 0, ">= 0"),
                           ("min_p", 0 <= args.min_p <= 1, "in [0, 1]"),
                           ("prefill_step_size", args.prefill_step_size >= 1, ">= 1"),
                           ("port", 0 <= args.port <= 65535, "in 0..65535"),
                           ("prompt_cache_size", args.prompt_cache_size >= 0, ">= 0")):
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} must be {rule}, got {getattr(args, name)}")
    if not isinstance(args.chat_template_args, dict):
        raise ValueError("--chat-template-args must be a JSON object")
    quantized_kv.check_arguments(args)
    distributed.set_rank_timeout(args.rank_timeout)


def follow(args: argparse.Namespace) -> int:
    """Ranks > 0 under mlx.launch: load this rank's shard and run the generations rank 0 shares, silently."""
    with distributed.rank0_prints():
        logging.basicConfig(level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(message)s")
        try:
            check_args(args)
            engine = Engine(args)
        except (ValueError, OSError):
            return 1  # rank 0 reports the same error
        engine.follow()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except json.JSONDecodeError as err:
        print(f"error: --chat-template-args is not valid JSON ({err})", file=sys.stderr)
        return 2
    if not distributed.is_main():
        return follow(args)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(message)s")
    try:
        check_args(args)
        engine = Engine(args)
        server = make_server(engine, args.host, args.port)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    host, port = server.server_address[:2]
    print(f"serving {engine.model_id} ({engine.mode} drafting) at http://{host}:{port}/v1", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
