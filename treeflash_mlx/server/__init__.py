"""An OpenAI- and Anthropic-compatible HTTP server with tree drafting inside, and a chat page of its own:
``python -m treeflash_mlx.server --model M --drafter D`` (docs/server.md).

One job per module: ``app`` (routes, HTTP, the command line), ``engine`` (models, prompt caches, the worker
thread), ``openai`` and ``anthropic`` (each API's requests and answers), ``parsing`` (reasoning and tool calls,
with mlx-lm's parsers), ``prompts`` (messages through the chat template), ``reply`` (what the APIs share),
``fields`` (request checks), ``page`` (the chat page's static files).
"""

from .app import Handler, build_parser, check_args, main, make_server, parse_size
from .engine import CacheLRU, Engine, Job
from .fields import RequestError
from .prompts import chat_prompt, check_messages

__all__ = ["CacheLRU", "Engine", "Handler", "Job", "RequestError", "build_parser", "chat_prompt", "check_args",
           "check_messages", "main", "make_server", "parse_size"]
