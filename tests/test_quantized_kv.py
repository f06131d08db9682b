"""K/V cache quantization (kv_bits): token for token mlx-lm's quantized decoding, in every mode, wherever the
switch to the quantized cache falls (first call, mid-prefill, mid-generation, mid-conversation)."""

from __future__ import annotations

import importlib

import mlx.core as mx
import numpy as np
import pytest
from conftest import random_prompts, tiny_drafter, tiny_target
from mlx_lm.models import cache as mlx_cache
from test_lossless_greedy import Oracle

from treeflash_mlx import make_prompt_cache, stream_generate
from treeflash_mlx.prompt_cache import load_prompt_cache, save_prompt_cache
from treeflash_mlx.quantized_kv import KVQuantization, kv_quantization, prefill_chunks, switch_offset
from treeflash_mlx.tree import DraftTree

mlx_generate = importlib.import_module("mlx_lm.generate")  # the module (mlx_lm.generate is also a function)
STEP, N = 4, 32  # a small prefill step puts several chunks in every prompt


@pytest.fixture(scope="module")
def pair():
    target = tiny_target("qwen3", seed=5, hidden=128)  # head dimension 32: groups of 32
    return target, tiny_drafter(target)


def settings(bits: int, start: int) -> dict:
    return dict(kv_bits=bits, kv_group_size=32, quantized_kv_start=start, prefill_step_size=STEP)


def mlx_lm_tokens(model, prompt, n, prompt_cache=None, **kw) -> list[int]:
    steps = mlx_generate.generate_step(mx.array(prompt), model, max_tokens=n, prompt_cache=prompt_cache, **kw)
    return [int(t) for t, _ in steps]


def ours(target, tokenizer, prompt, n, drafter=None, **kw) -> list[int]:
    return [r.token for r in stream_generate(target, tokenizer, prompt, n, drafter=drafter, **kw)]


# start 0: after the first call; 6: mid-prefill (the 14-token prompt's call ending at 8); 13: the prompt but its
# last token; 14: after the whole prompt; 25: mid-generation.
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("start", [0, 6, 13, 14, 25])
def test_every_mode_matches_mlx_lms_quantized_decoding(pair, tokenizer, bits, start):
    target, drafter = pair
    kw = settings(bits, start)
    for prompt in (random_prompts(1, seed=30 + bits)[0][:3] + list(range(40, 51)), random_prompts(1, seed=start)[0]):
        reference = mlx_lm_tokens(target, prompt, N, **kw)
        if (bits, start) == (4, 0):
            assert reference != mlx_lm_tokens(target, prompt, N, prefill_step_size=STEP), "4-bit K/V should matter"
        for mode in ("treeflash", "marginal", "chain"):
            assert ours(target, tokenizer, prompt, N, drafter, mode=mode, **kw) == reference, mode
        assert ours(target, tokenizer, prompt, N, **kw) == reference, "ar"


@pytest.mark.parametrize("start", [9, 20, 27])
def test_long_accepted_paths_stop_at_the_switch(pair, tokenizer, start):
    """A drafter that is mostly right makes rounds that would run past the switch: their trees are cut there."""
    target, drafter = pair
    kw = settings(4, start)
    rng = np.random.default_rng(start)
    for prompt in random_prompts(3, seed=start):
        prompt = prompt[:6]
        reference = mlx_lm_tokens(target, prompt, N, **kw)
        oracle = Oracle(target, drafter, prompt + reference, rng)
        responses = list(stream_generate(target, tokenizer, prompt, N, drafter=oracle, **kw))
        assert [r.token for r in responses] == reference
        # the token at position p is committed by the round whose root sits before it; none spans the switch
        rounds = {}
        for position, r in enumerate(responses, start=len(prompt)):
            rounds.setdefault(r.round, []).append(position)
        assert all(max(p) < start + 1 or min(p) > start for k, p in rounds.items() if k > 0), rounds


def observed_switches(model, prompt, cached, step, start) -> int:
    """The cache length at which mlx-lm's generate_step converts the cache (watched, not worked out)."""
    seen = []
    original = mlx_generate.maybe_quantize_kv_cache

    def watch(prompt_cache, quantized_kv_start, kv_group_size, kv_bits):
        before = type(prompt_cache[0])
        original(prompt_cache, quantized_kv_start, kv_group_size, kv_bits)
        if type(prompt_cache[0]) is not before:
            seen.append(prompt_cache[0].offset)

    cache = mlx_cache.make_prompt_cache(model)
    if cached:
        model(mx.array(prompt[:cached])[None], cache=cache)
    mlx_generate.maybe_quantize_kv_cache = watch
    try:
        mlx_lm_tokens(model, prompt[cached:], 12, cache, kv_bits=4, kv_group_size=32, quantized_kv_start=start,
                      prefill_step_size=step)
    finally:
        mlx_generate.maybe_quantize_kv_cache = original
    return seen[0]


@pytest.mark.parametrize("n,cached,step", [(1, 0, 4), (2, 0, 4), (9, 0, 4), (10, 0, 3), (10, 4, 3), (10, 9, 4)])
def test_the_switch_offset_is_where_mlx_lm_converts(pair, n, cached, step):
    target, _ = pair
    prompt = list(range(30, 30 + n))
    for start in range(0, n + 4):
        kv = KVQuantization(4, 32, start)
        assert switch_offset(kv, [mlx_cache.KVCache()], cached, n, step) == observed_switches(
            target, prompt, cached, step, start), start


def test_prefill_chunks_split_at_the_switch():
    assert prefill_chunks(0, 10, 4, None) == [(0, 4), (4, 8), (8, 10)]
    assert prefill_chunks(2, 10, 4, 9) == [(2, 6), (6, 9), (9, 10)]
    assert prefill_chunks(0, 10, 4, 8) == [(0, 4), (4, 8), (8, 10)]
    assert prefill_chunks(0, 10, 4, 12) == [(0, 4), (4, 8), (8, 10)]


def test_a_tree_cut_by_depth_keeps_its_shape():
    tree = DraftTree(np.array([5, 6, 7, 8, 9]), np.array([-1, 0, 0, 2, 1]), np.array([0, 1, 1, 2, 2]))
    cut = tree.up_to_depth(1)
    assert cut.tokens.tolist() == [5, 6, 7] and cut.parents.tolist() == [-1, 0, 0]
    assert tree.up_to_depth(0).tokens.tolist() == [5] and tree.up_to_depth(2) is tree
    cut = DraftTree(np.array([5, 6, 7, 8]), np.array([-1, 0, 1, 0]), np.array([0, 1, 2, 1])).up_to_depth(1)
    assert cut.tokens.tolist() == [5, 6, 8] and cut.parents.tolist() == [-1, 0, 0]


def test_a_conversation_keeps_its_quantized_cache_as_mlx_lm_does(pair, tokenizer):
    """Each turn reuses the shared prefix; mlx-lm given its own cache trimmed to the same prefix agrees."""
    target, drafter = pair
    kw = settings(4, 30)  # the switch falls in the second turn
    cache, reference_cache = make_prompt_cache(target, drafter), mlx_cache.make_prompt_cache(target)
    conversation = random_prompts(1, seed=7)[0][:10]
    for user in random_prompts(3, seed=8):
        prompt = conversation + user[:8]
        responses = list(stream_generate(target, tokenizer, prompt, 16, drafter=drafter, prompt_cache=cache, **kw))
        cached = responses[-1].cached_tokens
        mlx_cache.trim_prompt_cache(reference_cache, reference_cache[0].offset - cached)
        assert [r.token for r in responses] == mlx_lm_tokens(target, prompt[cached:], 16, reference_cache, **kw)
        conversation = prompt + [r.token for r in responses]
    assert type(cache.target[0]) is mlx_cache.QuantizedKVCache and cache.target[0].bits == 4
    assert cache.target[0].offset == len(cache.tokens)


def test_a_quantized_cache_survives_a_prefix_copy_and_a_file(pair, tokenizer, tmp_path):
    target, drafter = pair
    kw = settings(8, 0)
    cache = make_prompt_cache(target, drafter)
    prompt = random_prompts(1, seed=21)[0]
    out = ours(target, tokenizer, prompt, 12, drafter, prompt_cache=cache, **kw)
    follow_up = prompt + out + [3, 4, 5]
    path = str(tmp_path / "quantized.safetensors")
    save_prompt_cache(path, cache)
    copy, loaded = cache.prefix_copy(len(prompt)), load_prompt_cache(path)
    assert type(copy.target[0]) is type(loaded.target[0]) is mlx_cache.QuantizedKVCache and copy.nbytes > 0
    want = ours(target, tokenizer, follow_up, 12, drafter, prompt_cache=cache, **kw)
    assert ours(target, tokenizer, follow_up, 12, drafter, prompt_cache=loaded, **kw) == want
    branch = ours(target, tokenizer, follow_up, 12, drafter, prompt_cache=copy, **kw)
    assert copy.reused == len(prompt) and len(branch) == 12


BAD = {
    "bits": (dict(kv_bits=7), "kv_bits must be one of 1, 2, 3, 4, 5, 6, 8, got 7"),
    "bool bits": (dict(kv_bits=True), "kv_bits must be an integer, got True"),
    "group": (dict(kv_bits=4, kv_group_size=16), "kv_group_size must be one of 32, 64, 128, got 16"),
    "start": (dict(kv_bits=4, quantized_kv_start=-1), "quantized_kv_start must be at least 0, got -1"),
    "head dim": (dict(kv_bits=4, kv_group_size=64), "kv_group_size 64 does not divide the target's head dimension "
                                                     "32; use 32"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_settings_are_one_line_errors(pair, tokenizer, case):
    target, _ = pair
    kw, message = BAD[case]
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ours(target, tokenizer, [1, 2, 3], 4, **kw)


def test_a_quantized_cache_continues_only_with_its_own_settings(pair, tokenizer):
    target, _ = pair
    cache = make_prompt_cache(target)
    ours(target, tokenizer, [1, 2, 3, 4], 4, prompt_cache=cache, **settings(4, 0))
    for given in (dict(), dict(kv_bits=8, kv_group_size=32)):
        with pytest.raises(ValueError, match=r"holds a quantized K/V cache \(kv_bits=4, kv_group_size=32\)"):
            ours(target, tokenizer, [1, 2, 3, 4, 5], 4, prompt_cache=cache, **given)


def test_no_bits_no_checks_of_the_other_settings_but_their_types():
    assert kv_quantization(None, 16, 0) is None
    with pytest.raises(ValueError, match="quantized_kv_start must be at least 0"):
        kv_quantization(None, 64, -3)


def test_chat_and_server_take_mlx_lms_kv_flags():
    from treeflash_mlx import chat, server

    for module in (chat, server):
        args = module.build_parser().parse_args(["--kv-bits", "4", "--kv-group-size", "32", "--quantized-kv-start",
                                                 "100"])
        module.check_args(args)
        assert (args.kv_bits, args.kv_group_size, args.quantized_kv_start) == (4, 32, 100)
        args.kv_bits = 9
        with pytest.raises(ValueError, match="--kv-bits must be one of"):
            module.check_args(args)
