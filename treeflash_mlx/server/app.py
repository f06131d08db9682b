"""The HTTP side: routes, request bodies, errors, streams; the command line. ``python -m treeflash_mlx.server``.

Routes: OpenAI's ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``; Anthropic's ``/v1/messages`` and
``/v1/messages/count_tokens``; ``/health``; the chat page at ``/``. Bad requests get a 4xx error in the API's own
shape and the server goes on serving.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .. import distributed, quantized_kv
from .._cli import add_drafting_arguments
from . import anthropic, openai
from .engine import Engine, Job
from .fields import RequestError
from .page import static_file
from .reply import Reply

MAX_BODY = 32 * 2**20
log = logging.getLogger("treeflash_mlx.server")
GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


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


class Handler(BaseHTTPRequestHandler):
    engine: Engine  # set on the subclass that ``make_server`` builds
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # one line per request is written by ``_log`` instead
        pass

    def _log(self, status: int, info: str = "") -> None:
        seconds = time.perf_counter() - self._started
        log.info("%s %s %s %d %.3fs%s", self.client_address[0], self.command, self.path, status, seconds,
                 f" {info}" if info else "")

    # -- writing

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

    def send_bytes(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:  # say so, or a keep-alive client sends its next request into a closing socket
            self.send_header("Connection", "close")
        self._cors()
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def send_json(self, status: int, payload: dict) -> None:
        self.send_bytes(status, json.dumps(payload).encode(), "application/json")

    def start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self._cors()
        self.end_headers()
        self.close_connection = True

    def write(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()

    def _error(self, err: RequestError, api=openai) -> None:
        self.close_connection = True
        self.send_json(err.status, api.error_body(err))
        self._log(err.status, f"error={err.code or err.status}")

    # -- routes

    def do_OPTIONS(self):
        self._started = time.perf_counter()
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self._cors()
        self.end_headers()
        self._log(204)

    def do_GET(self):
        self._started = time.perf_counter()
        path = self.path.split("?")[0]
        route = path.rstrip("/")
        if route == "/health":
            self.send_json(200, {"status": "ok", "generating": self.engine.busy.is_set(),
                                 "queued": self.engine.jobs.qsize()})
        elif route in ("/v1/models", "/models"):
            self.send_json(200, {"object": "list", "data": [
                {"id": self.engine.model_id, "object": "model", "created": int(time.time()),
                 "owned_by": "treeflash-mlx"}]})
        elif (found := static_file(path)) is not None:
            self.send_bytes(200, *found)
        else:
            return self._error(RequestError(404, f"no route GET {route}", code="not_found"))
        self._log(200)

    def do_POST(self):
        self._started = time.perf_counter()
        path = self.path.split("?")[0].rstrip("/")
        api = anthropic if path.startswith("/v1/messages") else openai
        try:
            if path not in openai.ROUTES and path not in ("/v1/messages", "/v1/messages/count_tokens"):
                raise RequestError(404, f"no route POST {path}", code="not_found")
            body = self._body()
            if path == "/v1/messages/count_tokens":
                return self._count(anthropic.parse_count(self.engine, body))
            if api is anthropic:
                request, reply = anthropic.parse_messages(self.engine, body), anthropic.AnthropicReply
            else:
                request, reply = openai.parse_request(self.engine, openai.ROUTES[path], body), openai.OpenAIReply
        except RequestError as err:
            return self._error(err, api)
        self._serve(reply(self, self.engine, request), api)

    def _body(self):
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
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise RequestError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from err

    # -- generation

    def _results(self, job: Job):
        while True:
            kind, payload = job.out.get()
            if kind == "done":
                return
            yield kind, payload

    def _count(self, build_prompt) -> None:
        job = self.engine.submit(Job(build_prompt, 0, {}, {}, None, [], -1, count_only=True))
        for kind, payload in self._results(job):
            if kind == "error":
                return self._error(_as_request_error(payload), anthropic)
            if kind == "prompt":
                self.send_json(200, {"input_tokens": len(payload)})
        self._log(200)

    def _serve(self, reply: Reply, api) -> None:
        job = self.engine.submit(reply.req.job())
        try:
            for kind, payload in self._results(job):
                if kind == "prompt":
                    reply.on_prompt(payload)
                elif kind == "token":
                    reply.on_token(*payload)
                elif kind == "round":
                    reply.on_round(payload)
                elif kind == "stop":
                    reply.stop_string = payload
                elif kind == "auto":
                    reply.auto = payload
                elif kind == "error":
                    if reply.started:
                        reply.fail(payload)
                        return self._log(500, "error mid-stream")
                    return self._error(_as_request_error(payload), api)
            reply.end()
        except GONE:
            job.cancelled.set()
            self.close_connection = True
            return self._log(499, f"client gone after {reply.tokens} tokens")
        self._log(200, reply.log_info())


def _as_request_error(err: Exception) -> RequestError:
    if isinstance(err, RequestError):
        return err
    status = 400 if isinstance(err, ValueError) else 500
    return RequestError(status, str(err).splitlines()[0] if str(err) else type(err).__name__)


def make_server(engine: Engine, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"engine": engine})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m treeflash_mlx.server",
        description="OpenAI- and Anthropic-compatible server (as mlx_lm.server) with lossless tree-drafted "
                    "decoding, and a chat page at /.",
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
    print(f"chat page: http://{host}:{port}/", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.stop()
    if engine.lost is not None:
        print(f"error: {engine.lost}", file=sys.stderr)
        return 1
    return 0
