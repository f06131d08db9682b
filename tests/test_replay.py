"""Replayed acceptance: on the target's own greedy answers, the rounds replayed with the drafter alone are the
rounds greedy generation runs, round for round, in every drafting mode."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from treeflash_mlx import load, stream_generate
from treeflash_mlx.drafting import make_drafting
from treeflash_mlx.generate import DEMO
from treeflash_mlx.replay import accepted_depth, replay
from treeflash_mlx.target import Target
from treeflash_mlx.train import answer_with_features
from treeflash_mlx.tree import DraftTree

PROMPTS = [json.loads(line)["prompt"] for line in
           (Path(__file__).parents[1] / "demos" / "heldout_prompts.jsonl").read_text().splitlines()][:3]
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def answered():
    model, tokenizer, drafter = load(str(DEMO / "target"), str(DEMO / "drafter"))
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    # One prompt at a time, features in float32: the answers and features greedy generation itself computes.
    answers = [answer_with_features(model, [p], MAX_TOKENS, drafter.args.target_layer_ids, set(),
                                    dtype=mx.float32)[0][:3] for p in prompts]
    return model, tokenizer, drafter, prompts, answers


# A fixed budget: with --tree-size auto the trees follow the machine's timings, which a replay does not have.
@pytest.mark.parametrize("mode,settings", [("treeflash", {"tree_size": 16}),
                                           ("treeflash", {"tree_size": 64, "draft_top_m": 16}),
                                           ("marginal", {"tree_size": 16}), ("chain", {})])
def test_replayed_rounds_are_the_rounds_of_greedy_generation(answered, mode, settings):
    model, tokenizer, drafter, prompts, answers = answered
    drafting = make_drafting(drafter, Target(model), mode, **settings)
    for prompt, (tokens, plen, feats) in zip(prompts, answers):
        rounds = {}
        for r in stream_generate(model, tokenizer, prompt, MAX_TOKENS, drafter=drafter, mode=mode, **settings):
            rounds[r.round] = r.acceptance_length
        generated = [rounds[k] for k in sorted(rounds) if k > 0]
        replayed = replay(drafting, tokens, plen, feats, MAX_TOKENS)
        assert replayed == generated
        assert max(replayed) > 1, "the demo drafter accepts: a test where every round is 1 could not fail"


def test_a_shorter_limit_cuts_the_last_round_as_generation_does(answered):
    model, tokenizer, drafter, prompts, answers = answered
    tokens, plen, feats = answers[0]
    drafting = make_drafting(drafter, Target(model), "treeflash")
    for limit in (1, 2, 7, 19):
        taus = replay(drafting, tokens, plen, feats, limit)
        assert sum(taus) == limit - 1, "every token after the prefill's comes from a round"


def test_the_walk_follows_the_true_tokens_down_the_tree():
    # root 0 -> (1: a, 2: b); 1 -> (3: c, 4: d); 4 -> 5: e
    tree = DraftTree(np.array([9, 10, 11, 12, 13, 14]), np.array([-1, 0, 0, 1, 1, 4]), np.array([0, 1, 1, 2, 2, 3]))
    assert accepted_depth(tree, np.array([10, 13, 14, 99])) == 3
    assert accepted_depth(tree, np.array([11, 12])) == 1  # node 2 has no children
    assert accepted_depth(tree, np.array([12])) == 0  # 12 is not a child of the root
    assert accepted_depth(tree, np.array([10, 13])) == 2  # the truth ends
