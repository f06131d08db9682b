"""Helpers shared by the hardening tests: a saved tiny pair, running a command line, its one error line."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))


def run_main(capsys, fn, *argv):
    code = fn([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err

def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]
