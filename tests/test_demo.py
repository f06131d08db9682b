"""The bundled demo pair: loads offline, is what the main command uses, and generates losslessly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import mlx_lm_greedy

from treeflash_mlx import load, stream_generate
from treeflash_mlx.generate import DEMO, main

PROMPTS = [json.loads(line)["prompt"] for line in
           (Path(__file__).parents[1] / "demos" / "heldout_prompts.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def demo():
    return load(str(DEMO / "target"), str(DEMO / "drafter"))


def test_demo_pair_is_small_and_complete():
    files = [f for f in (DEMO / "target").iterdir()] + [f for f in (DEMO / "drafter").iterdir()]
    assert sum(f.stat().st_size for f in files) <= 30 * 2**20
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in (DEMO / "target").iterdir()}


@pytest.mark.parametrize("mode", ["treeflash", "marginal", "chain"])
def test_demo_pair_is_lossless_and_accepts(demo, mode):
    model, tokenizer, drafter = demo
    taus = []
    for prompt in PROMPTS[:4]:
        ids = tokenizer.encode(prompt)
        # a fixed budget: whether its drafts are accepted is the drafter's property, while auto may rightly take
        # plain steps on a machine where this tiny pair's trees do not pay
        responses = list(stream_generate(model, tokenizer, ids, 48, drafter=drafter, mode=mode, tree_size=16))
        assert [r.token for r in responses] == mlx_lm_greedy(model, ids, 48)[: len(responses)]
        assert len(responses) == 48 or responses[-1].finish_reason == "stop"
        taus += [r.acceptance_length for r in responses if r.round > 0 and not r.from_draft]
    assert np.mean(taus) > 1.2, "the demo drafter is trained: it should be accepted"


def test_main_command_uses_the_demo_pair(capsys):
    assert main(["--prompt", "def read_config(path):", "--max-tokens", "16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model_path"] == str(DEMO / "target") and result["drafter_path"] == str(DEMO / "drafter")
    assert result["mode"] == "treeflash" and len(result["tokens"]) == 16
