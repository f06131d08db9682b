"""What every command line of the package shares: bad input ends in one line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import sys
from typing import Callable


def run_cli(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], None], argv: list[str] | None) -> int:
    args = parser.parse_args(argv)
    try:
        body(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0
