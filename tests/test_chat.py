"""`python -m treeflash_mlx.chat` driven through a pipe: streamed answers, the cache across turns, the commands."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from treeflash_mlx import load, stream_generate
from treeflash_mlx.loading import DEMO

ROOT = Path(__file__).parents[1]
STATS = re.compile(r"\[(\d+) tokens, [\d.]+ tokens/s, acceptance ([\d.]+), prompt (\d+) tokens of which (\d+) cached"
                   r", plain steps \d+%\]")  # (the share of plain steps --tree-size auto, the default, took)


def chat(stdin: str, *flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "treeflash_mlx.chat", *flags], input=stdin, capture_output=True,
                          text=True, env=env, timeout=300)


def test_a_piped_conversation_streams_keeps_the_cache_and_obeys_the_commands():
    out = chat("def read_config(path):\nh\ndef main():\nr\nimport os\nq\n", "--max-tokens", "16")
    assert out.returncode == 0, out.stderr
    stats = [tuple(map(float, m)) for m in STATS.findall(out.stdout)]
    assert len(stats) == 3
    (n1, tau1, p1, c1), (n2, _, p2, c2), (_, _, p3, c3) = stats
    assert n1 == n2 == 16 and tau1 > 1
    assert c1 == 0 and c2 >= p1 and p2 > p1, "the second turn reuses the first one's cache"
    assert c3 == 0 and p3 < p2, "after 'r' the conversation starts again"
    assert out.stdout.count("'q' quits") == 2 and "[conversation reset]" in out.stdout

    model, tokenizer, drafter = load(str(DEMO / "target"), str(DEMO / "drafter"))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "def read_config(path):"}],
                                           add_generation_prompt=True, tokenize=True)
    first = "".join(r.text for r in stream_generate(model, tokenizer, prompt, 16, drafter=drafter))
    assert ">> " + first + "\n[16 tokens" in out.stdout


def test_end_of_input_quits_and_bad_flags_are_one_line():
    assert chat("").returncode == 0
    out = chat("q\n", "--top-p", "2")
    assert out.returncode == 1 and out.stderr.strip() == "error: --top-p must be in (0, 1], got 2.0"
