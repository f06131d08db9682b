"""Copies from the context (prompt lookup): what is found, how it joins the tree, and that output never changes."""

from __future__ import annotations

import numpy as np
import pytest
from mlx_lm import stream_generate as mlx_lm_stream_generate

from treeflash_mlx.drafting import make_drafting
from treeflash_mlx.lookup import Lookup, continuation
from treeflash_mlx.replay import accepted_depth
from treeflash_mlx.speculative import RoundStats, stream_generate
from treeflash_mlx.target import Target
from treeflash_mlx.tree import DraftTree, best_first, chain, graft

from conftest import tiny_drafter, tiny_target


def test_the_latest_earlier_occurrence_of_the_longest_match_is_copied():
    #          0  1  2  3  4  5  6  7  8  9 10 11 12 13
    h = np.array([5, 1, 2, 3, 9, 8, 2, 3, 7, 6, 1, 2, 3])
    # Suffix [1 2 3] occurred at 1..3 (then 9 8 ...); [2 3] alone also at 6..7 (then 7 6): the longer match wins.
    assert continuation(h, 4, 2).tolist() == [9, 8, 2, 3]
    # Two equally long matches: the more recent one.
    h2 = np.array([4, 2, 3, 10, 4, 2, 3, 11, 0, 2, 3])
    assert continuation(h2, 2, 2).tolist() == [11, 0]
    # Cut where the history ends: it may run into the suffix itself.
    assert continuation(np.array([7, 7, 7]), 5, 2).tolist() == [7]


def test_no_copy_below_the_minimum_match_or_without_an_occurrence():
    h = np.array([1, 2, 9, 4, 2])
    assert continuation(h, 3, 1).tolist() == [9, 4, 2]
    assert continuation(h, 3, 2).tolist() == []  # [4 2] never occurred before
    assert continuation(np.array([1, 2, 3]), 3, 1).tolist() == []
    assert continuation(np.array([3]), 3, 1).tolist() == []
    assert continuation(h, 0, 1).tolist() == []


def test_matches_longer_than_the_window_are_found():
    rng = np.random.default_rng(0)
    phrase = rng.integers(100, 200, 20)
    h = np.concatenate([[1], phrase, [42, 43], rng.integers(300, 400, 30), phrase])
    assert continuation(h, 2, 20).tolist() == [42, 43]


def brute_force_continuation(h, length, min_match):
    best, where = 0, None
    for p in range(len(h) - 1):
        n = 0
        while n < min(8, len(h) - 1) and p - n >= 0 and h[p - n] == h[len(h) - 1 - n]:
            n += 1
        if n >= min_match and n >= best:
            best, where = n, p
    return [] if where is None else h[where + 1 : where + 1 + length].tolist()


def test_agrees_with_a_brute_force_search():
    rng = np.random.default_rng(1)
    for _ in range(300):
        h = rng.integers(0, 4, rng.integers(1, 40))
        for min_match in (1, 2, 3):
            assert continuation(h, 5, min_match).tolist() == brute_force_continuation(h, 5, min_match)


def test_the_incremental_lookup_answers_as_the_full_scan_while_a_history_grows_or_is_replaced():
    rng = np.random.default_rng(2)
    for min_match in (1, 2, 3, 9):
        lookup = Lookup(5, min_match)
        for _ in range(20):
            history = [int(t) for t in rng.integers(0, 4, rng.integers(0, 5))]  # a new generation: another list
            for _ in range(40):
                assert lookup(history).tolist() == continuation(np.array(history, np.int64), 5, min_match).tolist()
                history.extend(int(t) for t in rng.integers(0, 4, rng.integers(1, 3)))  # a round's tokens
            history[-3:] = [7, 7, 7]  # the same list changed in place: indexed afresh, not trusted
            assert lookup(history).tolist() == continuation(np.array(history, np.int64), 5, min_match).tolist()
            del history[-10:]  # and cut
            assert lookup(history).tolist() == continuation(np.array(history, np.int64), 5, min_match).tolist()


def valid(tree: DraftTree) -> bool:
    ok = tree.parents[0] == -1 and tree.depths[0] == 0
    for i in range(1, len(tree)):
        p = tree.parents[i]
        ok &= 0 <= p < i and tree.depths[i] == tree.depths[p] + 1
    siblings = {(int(p), int(t)) for p, t in zip(tree.parents, tree.tokens)}
    return bool(ok) and len(siblings) == len(tree)  # no two children of a node carry the same token


def random_tree(rng, n, vocab=6):
    depths, rows, k = 5, 3, 3
    logits = rng.normal(size=(depths, rows, k)) * 2
    logp = np.sort(logits - np.log(np.exp(logits).sum(-1, keepdims=True)), axis=-1)[..., ::-1].copy()
    tokens = np.stack([np.stack([rng.permutation(vocab)[:k] for _ in range(rows)]) for _ in range(depths)])
    return best_first(0, tokens, logp, rng.integers(-1, rows, size=(depths, rows, k)), n)


def test_graft_keeps_the_budget_the_whole_path_and_the_best_nodes():
    rng = np.random.default_rng(2)
    for _ in range(500):
        n = int(rng.integers(1, 20))
        tree = random_tree(rng, n)
        path = rng.integers(0, 6, rng.integers(0, 10))
        size = int(rng.integers(1, 25))
        out = graft(tree, path, size)
        assert valid(out)
        assert len(out) <= max(size, 1)
        kept = path[: size - 1]
        assert accepted_depth(out, kept) == len(kept), "the whole (cut) path is in the tree"
        d = 0  # the drafted nodes kept: a prefix of the tree's (a best-first tree's best), at least size - len(path)
        while d < min(len(out), len(tree)) and (out.tokens[d], out.parents[d]) == (tree.tokens[d], tree.parents[d]):
            d += 1
        assert d >= min(len(tree), size - len(kept))
        assert len(out) - d == len(kept) - accepted_depth(tree.first(d), kept), "only the path's missing tail is new"


def test_graft_by_hand():
    # root 0 with 1 -> 2 -> 3 (the best path) and a sibling 4 -> 5
    tree = DraftTree(np.array([0, 1, 2, 4, 3, 5]), np.array([-1, 0, 1, 0, 2, 3]), np.array([0, 1, 2, 1, 3, 2]))
    out = graft(tree, np.array([1, 2, 8, 9]), 6)
    # The path shares 1 -> 2; its 2 new nodes replace the last two (3 and 5).
    assert out.tokens.tolist() == [0, 1, 2, 4, 8, 9]
    assert out.parents.tolist() == [-1, 0, 1, 0, 2, 4]
    assert graft(tree, np.array([1, 2, 3]), 6) is not None and graft(tree, np.array([1, 2, 3]), 6).tokens.tolist() \
        == tree.tokens.tolist()
    # A whole chain replaced beyond where it agrees with the copy.
    c = graft(chain(0, np.array([1, 2, 3, 4])), np.array([1, 7]), 5)
    assert c.tokens.tolist() == [0, 1, 2, 3, 7] and c.parents.tolist() == [-1, 0, 1, 2, 1]


def repetitive_prompts(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [np.tile(rng.integers(0, 256, int(rng.integers(5, 12))), 6).tolist() for _ in range(n)]


@pytest.mark.parametrize("mode", ["treeflash", "marginal", "chain"])
def test_copies_are_lossless_and_accepted(tokenizer, mode):
    """An untrained drafter rarely guesses right; on text that repeats itself the copies carry τ above 1, and
    the output stays mlx-lm's token for token."""
    target = tiny_target("qwen3", seed=3)
    drafter = tiny_drafter(target, seed=1)
    taus = {}
    for lookup in (0, 8):
        taus[lookup] = []
        for prompt in repetitive_prompts():
            want = [r.token for r in mlx_lm_stream_generate(target, tokenizer, prompt, max_tokens=40)]
            # a fixed budget: with auto, τ would follow the machine's timings (auto's copies: test_autotune_loop)
            got = list(stream_generate(target, tokenizer, prompt, 40, drafter=drafter, mode=mode, draft_lookup=lookup,
                                       tree_size=16))
            assert [r.token for r in got] == want
            taus[lookup] += list({r.round: r.acceptance_length for r in got if r.round}.values())
    assert np.mean(taus[8]) > np.mean(taus[0]) + 0.5, taus


def test_the_tree_budget_holds_with_copies(tokenizer):
    target = tiny_target("qwen3", seed=3)
    stats = RoundStats()
    for prompt in repetitive_prompts(2, seed=1):
        list(stream_generate(target, tokenizer, prompt, 30, drafter=tiny_drafter(target, seed=1), tree_size=10,
                             draft_lookup=12, stats=stats))
    assert max(r.nodes for r in stats.rounds) <= 10
    assert max(len(r.path) for r in stats.rounds) > 4, "copies were accepted"


def test_lookup_settings_are_checked(tokenizer):
    target = tiny_target("qwen3", seed=3)
    drafter = tiny_drafter(target)
    with pytest.raises(ValueError, match="draft_lookup .* at least 0"):
        make_drafting(drafter, Target(target), draft_lookup=-1)
    with pytest.raises(ValueError, match="draft_lookup_match .* at least 1"):
        make_drafting(drafter, Target(target), draft_lookup_match=0)
