"""A live ``python -m treeflash_mlx.server`` for the server tests, on a free port of 127.0.0.1."""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import threading
import time
from functools import cached_property
from pathlib import Path

ROOT = Path(__file__).parents[1]


class Server:
    """A live server on a free port of 127.0.0.1; its log lines are collected as they come."""

    def __init__(self, *flags: str):
        env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "treeflash_mlx.server", "--port", "0", *flags],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.lines: list[str] = []
        self.port = None
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.lines.append(line.rstrip())
                if " at http://127.0.0.1:" in line:
                    self.port = int(line.rsplit(":", 1)[1].split("/")[0])
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(120) or self.port is None:
            self.close()
            raise RuntimeError("the server did not start:\n" + "\n".join(self.lines))
        self.url = f"http://127.0.0.1:{self.port}"

    @cached_property
    def client(self):
        """The official ``openai`` client."""
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=120)

    @cached_property
    def anthropic(self):
        """The official ``anthropic`` client."""
        import anthropic

        return anthropic.Anthropic(base_url=self.url, api_key="none", max_retries=0, timeout=120)

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        conn.close()
        return response.status, dict(response.getheaders()), data

    def wait_for_log(self, text: str, seconds: float = 30) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            hits = [line for line in self.lines if text in line]
            if hits:
                return hits[-1]
            time.sleep(0.05)
        raise AssertionError(f"no log line with {text!r}:\n" + "\n".join(self.lines[-20:]))

    def close(self):
        if self.proc.poll() is None:
            stop(self.proc)


def stop(proc: subprocess.Popen) -> None:
    """End a server process: politely, then for good after 20 s."""
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
