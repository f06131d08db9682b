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
