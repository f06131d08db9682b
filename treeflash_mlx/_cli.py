"""What every command line of the package shares: bad input ends in one line on stderr, never a traceback.

- ``ValueError``/``OSError``: ``error: <message>``, exit status 1;
- Ctrl-C: ``error: interrupted``, status 130, also while the modules are still being imported
  (``install_import_guard``, called by the package before its heavy imports);
- a closed output pipe (``... | head``): nothing more is written and the exit is quiet, status 141, as for
  other Unix tools killed by SIGPIPE;
- warnings: one line each, ``warning: <message>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Callable

INTERRUPTED, BROKEN_PIPE = 130, 141


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush cannot fail again on a closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr if file is None else file)


CLONE_SCRIPT = Path(__file__).resolve().parents[1] / "convert" / "convert.py"


def is_command_line() -> bool:
    """Whether this process runs one of the package's command lines (``python -m treeflash_mlx...``, an
    installed ``treeflash-*`` script or a clone's ``convert/convert.py``), judged from how Python was started."""
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0 == "-m":
        return any(a.startswith("treeflash_mlx") for a in getattr(sys, "orig_argv", []))
    return os.path.basename(argv0).startswith("treeflash-") or (bool(argv0) and Path(argv0).resolve() == CLONE_SCRIPT)


def install_import_guard() -> None:
    """For a command line only: a Ctrl-C or closed pipe that escapes before ``run_cli`` (while importing MLX,
    say) ends in one line instead of a traceback. Library users keep Python's own handling."""
    if not is_command_line():
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            print("error: interrupted", file=sys.stderr)
        elif issubclass(kind, BrokenPipeError):
            _silence_stdout()
        else:
            previous(kind, value, tb)

    sys.excepthook = hook


def run_cli(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], None], argv: list[str] | None) -> int:
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            body(args)
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        return BROKEN_PIPE
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return INTERRUPTED
    return 0


DRAFTING_OPTIONS = ("tree_size", "draft_top_m", "draft_top_k", "draft_temp", "draft_vocab", "draft_window", "draft_sinks",
                    "draft_lookup", "draft_lookup_match")


def tree_size(text: str) -> int | str:
    """``--tree-size``: a node budget or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a node count or 'auto', got {text!r}") from None


def add_drafting_arguments(p: argparse.ArgumentParser) -> None:
    """The drafting flags that generate, chat, server and benchmark share (one name each, as in the API)."""
    from .drafting import MODES  # imported here: this module stays light for the import guard

    p.add_argument("--mode", choices=MODES, default=None,
                   help="drafting: treeflash (needs a head; default then), marginal (default for DFlash), chain, ar")
    p.add_argument("--tree-size", type=tree_size, default=None,
                   help="tree node budget, root included, or auto (the default): each round's budget and copy "
                        "length chosen from measured costs and acceptance, a plain step where no tree pays")
    p.add_argument("--draft-top-m", type=int, default=None,
                   help="candidate previous tokens per depth for the head (default: 16 on a GPU, 8 on the CPU)")
    p.add_argument("--draft-top-k", type=int, default=None, help="branching: children kept per table row (16)")
    p.add_argument("--draft-temp", type=float, default=None, help="drafter temperature, tree scores only (1.0)")
    p.add_argument("--draft-vocab", type=int, default=None,
                   help="normalise the head over each depth's marginal top-K tokens, 0: the whole vocabulary "
                        "(default: 0 on a GPU, 64 on the CPU, where it is much faster; output unchanged)")
    p.add_argument("--draft-window", type=int, default=None,
                   help="the drafter sees only the first --draft-sinks and the last N context positions; "
                        "bounds its cost on long prompts (0: the whole context; output unchanged)")
    p.add_argument("--draft-sinks", type=int, default=None, help="context positions always kept with --draft-window")
    p.add_argument("--draft-lookup", type=int, default=None,
                   help="up to N tokens that followed an earlier occurrence of the last tokens join the tree "
                        "(prompt lookup; 0: off; default 15: --tree-size auto drops them where they do not pay; "
                        "output unchanged)")
    p.add_argument("--draft-lookup-match", type=int, default=None,
                   help="the fewest last tokens such an earlier occurrence must repeat (2)")


def drafting_settings(args: argparse.Namespace) -> dict:
    """The drafting keyword arguments of ``stream_generate`` from the flags of ``add_drafting_arguments``."""
    return {name: getattr(args, name) for name in DRAFTING_OPTIONS}
