"""The drafter context window: the drafter sees the first sinks and the most recent positions, bounded at any
length; it changes the drafts only, so the output stays the target's in every mode."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import mlx_lm_greedy, random_prompts, tiny_drafter, tiny_target

from treeflash_mlx import load_prompt_cache, make_prompt_cache, save_prompt_cache, stream_generate
from treeflash_mlx.drafter import ContextWindow, context_window
from treeflash_mlx.drafting import make_drafting
from treeflash_mlx.target import Target


def held_positions(cache: ContextWindow) -> list[int]:
    """Keys are written as their own position (see ``append``), so the held entries name themselves."""
    return [int(p) for p in np.array(cache.keys[0, 0, :, 0])] if cache.held else []


def append(cache: ContextWindow, n: int) -> None:
    positions = mx.arange(cache.offset, cache.offset + n, dtype=mx.float32)
    kv = mx.broadcast_to(positions[None, None, :, None], (1, 2, n, 4))
    cache.update_and_fetch(kv, kv)


def test_the_window_holds_the_sinks_and_the_most_recent_positions_whatever_the_appends():
    cache = ContextWindow(sinks=3, window=5)
    rng = np.random.default_rng(0)
    for _ in range(40):
        append(cache, int(rng.integers(1, 9)))
        n = cache.offset
        assert held_positions(cache) == sorted(set(range(min(3, n))) | set(range(max(3, n - 5), n)))
    assert cache.held == 8 and cache.nbytes == 2 * 8 * 2 * 4 * 4


def test_trimming_drops_the_newest_positions_and_the_window_refills():
    cache = ContextWindow(sinks=2, window=6)
    append(cache, 20)  # holds 0, 1, 14..19
    assert cache.trim(3) == 3 and cache.offset == 17
    assert held_positions(cache) == [0, 1, 14, 15, 16]  # exact for what was held; 11..13 were not
    append(cache, 4)
    assert held_positions(cache) == [0, 1, 15, 16, 17, 18, 19, 20]
    cache.trim(20)  # back into the sinks
    assert cache.offset == 1 and held_positions(cache) == [0]
    append(cache, 3)
    assert held_positions(cache) == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def pair():
    target = tiny_target("qwen3", seed=11)
    return target, tiny_drafter(target, block_size=6)


def block_hidden(drafter, target, features, cache):
    drafter.append_context(features, cache)
    block = mx.array([[5] + [drafter.args.mask_token_id] * (drafter.args.block_size - 1)])
    return drafter(Target(target).embed_tokens(block), cache)


def test_a_window_wider_than_the_context_drafts_exactly_as_the_whole_context_and_a_narrow_one_differs(pair):
    target, drafter = pair
    mx.random.seed(3)
    width = len(drafter.args.target_layer_ids) * target.args.hidden_size
    features = mx.random.normal((1, 40, width))
    whole = block_hidden(drafter, target, features, drafter.make_cache())
    wide = block_hidden(drafter, target, features, drafter.make_cache(window=64, sinks=4))
    narrow = block_hidden(drafter, target, features, drafter.make_cache(window=8, sinks=4))
    assert mx.array_equal(whole, wide)
    assert not mx.allclose(whole, narrow, atol=1e-3)


@pytest.mark.parametrize("mode", ["treeflash", "marginal", "chain"])
def test_a_narrow_window_keeps_the_output_the_targets(pair, tokenizer, mode):
    target, drafter = pair
    prompt = sum(random_prompts(4, seed=12), [])  # longer than sinks + window
    want = mlx_lm_greedy(target, prompt, 40)
    got = [r.token for r in stream_generate(target, tokenizer, prompt, 40, drafter=drafter, mode=mode,
                                            draft_window=8, draft_sinks=2)]
    assert got == want


def test_a_prompt_cache_keeps_its_window_across_turns_and_through_a_file(pair, tokenizer, tmp_path):
    target, drafter = pair
    cache = make_prompt_cache(target, drafter)
    conversation = random_prompts(1, seed=13)[0]
    for user in random_prompts(2, seed=14):
        prompt = conversation + user
        got = [r.token for r in stream_generate(target, tokenizer, prompt, 16, drafter=drafter, prompt_cache=cache,
                                                draft_window=10, draft_sinks=3)]
        assert got == mlx_lm_greedy(target, prompt, 16)
        assert all(context_window(c) == (10, 3) and c.held == 13 for c in cache.drafter)
        conversation = prompt + got
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "c.safetensors"))
    for a, b in zip(cache.drafter, loaded.drafter):
        assert context_window(b) == (10, 3) and b.offset == a.offset and mx.array_equal(a.keys, b.keys)
    # A generation with another window replaces the drafter part rather than mixing two windows.
    prompt = conversation + [7, 8, 9]
    got = [r.token for r in stream_generate(target, tokenizer, prompt, 8, drafter=drafter, prompt_cache=loaded,
                                            draft_window=20, draft_sinks=3)]
    assert got == mlx_lm_greedy(target, prompt, 8)
    assert all(context_window(c) == (20, 3) for c in loaded.drafter)


def test_a_whole_context_prompt_cache_is_cut_to_the_window_and_keeps_its_reuse(pair, tokenizer):
    target, drafter = pair
    cache = make_prompt_cache(target, drafter)
    prompt = random_prompts(1, seed=15)[0] * 3
    first = [r.token for r in stream_generate(target, tokenizer, prompt, 8, drafter=drafter, prompt_cache=cache,
                                              draft_window=0)]
    whole = [c.keys_and_values()[0] for c in cache.drafter]
    n = cache.drafter[0].offset
    follow = prompt + first + [3, 4]
    responses = list(stream_generate(target, tokenizer, follow, 8, drafter=drafter, prompt_cache=cache,
                                     draft_window=12, draft_sinks=2))
    assert [r.token for r in responses] == mlx_lm_greedy(target, follow, 8)
    assert responses[-1].cached_tokens == n  # the target's cache was reused although the drafter's changed kind
    for c, keys in zip(cache.drafter, whole):  # the sinks came from the whole-context cache
        assert context_window(c) == (12, 2) and c.held == 14 and mx.array_equal(c.keys[..., :2, :], keys[..., :2, :])


def test_cutting_a_whole_context_cache_keeps_the_sinks_and_the_most_recent_positions():
    from mlx_lm.models.cache import KVCache

    whole = KVCache()
    positions = mx.arange(30, dtype=mx.float32)
    kv = mx.broadcast_to(positions[None, None, :, None], (1, 2, 30, 4))
    whole.update_and_fetch(kv, kv)
    cut = ContextWindow.of_whole(whole, sinks=4, window=10)
    assert cut.offset == 30 and held_positions(cut) == [0, 1, 2, 3, *range(20, 30)]
    assert held_positions(ContextWindow.of_whole(whole, sinks=4, window=100)) == list(range(30))


def test_bad_window_settings_are_refused_in_one_line(pair):
    target, drafter = pair
    with pytest.raises(ValueError, match="draft_window .* at least 0"):
        make_drafting(drafter, Target(target), draft_window=-1)
    with pytest.raises(ValueError, match="draft_sinks must be an integer"):
        make_drafting(drafter, Target(target), draft_window=8, draft_sinks=2.5)
