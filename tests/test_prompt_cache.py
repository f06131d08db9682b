"""The prompt cache: a conversation's next turn prefills only what is new, with output identical to no cache."""

from __future__ import annotations

import mlx.core as mx
import pytest
from conftest import random_prompts, tiny_drafter, tiny_target
from mlx_lm.models import cache as mlx_cache
from mlx_lm.sample_utils import make_logits_processors

from treeflash_mlx import load_prompt_cache, make_prompt_cache, save_prompt_cache, stream_generate


@pytest.fixture(scope="module")
def pair():
    target = tiny_target("qwen3", seed=5)
    return target, tiny_drafter(target)


def run(target, tokenizer, prompt, drafter, cache=None, n=24, **kw):
    responses = list(stream_generate(target, tokenizer, prompt, n, drafter=drafter, prompt_cache=cache, **kw))
    return [r.token for r in responses], responses[-1]


@pytest.mark.parametrize("mode", ["treeflash", "marginal", "chain", "ar"])
def test_three_turns_reuse_the_conversation_and_give_identical_output(pair, tokenizer, mode):
    target, drafter = pair
    cache = make_prompt_cache(target, drafter)
    conversation = random_prompts(1, seed=7)[0]
    for turn, user in enumerate(random_prompts(3, seed=8)):
        prompt = conversation + user
        want, plain = run(target, tokenizer, prompt, drafter, mode=mode)
        got, last = run(target, tokenizer, prompt, drafter, cache, mode=mode)
        assert got == want
        assert plain.cached_tokens == 0 and plain.prompt_tokens == last.prompt_tokens == len(prompt)
        if turn == 0:
            assert last.cached_tokens == 0
        else:  # all of the previous turn but its last token (the next root, never in the cache), or all of it
            assert last.cached_tokens in (len(conversation) - 1, len(conversation))
        conversation = prompt + got


def test_a_changed_earlier_message_trims_the_cache_back_to_the_shared_prefix(pair, tokenizer):
    target, drafter = pair
    cache = make_prompt_cache(target, drafter)
    first = random_prompts(1, seed=9)[0] + [10, 11, 12, 13, 14, 15]
    out, _ = run(target, tokenizer, first, drafter, cache)
    edited = first[:4] + [200] + first[5:] + out
    want, _ = run(target, tokenizer, edited, drafter)
    got, last = run(target, tokenizer, edited, drafter, cache)
    assert got == want and last.cached_tokens == 4
    assert cache.target[0].offset == len(cache.tokens) == cache.drafter[0].offset


def test_the_same_prompt_again_prefills_only_its_last_token(pair, tokenizer):
    target, drafter = pair
    cache = make_prompt_cache(target, drafter)
    prompt = random_prompts(1, seed=10)[0]
    first, _ = run(target, tokenizer, prompt, drafter, cache)
    again, last = run(target, tokenizer, prompt, drafter, cache)
    assert again == first and last.cached_tokens == len(prompt) - 1


def test_a_cache_grown_without_the_drafter_catches_up_when_drafting_starts(pair, tokenizer):
    """Turns in mode ar leave the drafter's context behind: the next drafting turn prefills from there."""
    target, drafter = pair
    cache = make_prompt_cache(target)
    prompt = random_prompts(1, seed=11)[0]
    out, _ = run(target, tokenizer, prompt, None, cache)
    second = prompt + out + [5, 6, 7]
    want, _ = run(target, tokenizer, second, drafter)
    got, last = run(target, tokenizer, second, drafter, cache)
    assert got == want and last.cached_tokens == 0 and cache.drafter[0].offset == len(cache.tokens)


def test_processors_and_sampling_see_the_whole_prompt_with_a_cache(pair, tokenizer):
    target, drafter = pair
    processors = make_logits_processors(repetition_penalty=1.5, repetition_context_size=30)
    cache = make_prompt_cache(target, drafter)
    prompt = random_prompts(1, seed=12)[0]
    out, _ = run(target, tokenizer, prompt, drafter, cache, logits_processors=processors)
    second = prompt + out + [9, 8]
    want, _ = run(target, tokenizer, second, drafter, logits_processors=processors)
    got, last = run(target, tokenizer, second, drafter, cache, logits_processors=processors)
    assert got == want and last.cached_tokens > 0


def test_save_and_load_continue_the_conversation(pair, tokenizer, tmp_path):
    target, drafter = pair
    cache = make_prompt_cache(target, drafter)
    prompt = random_prompts(1, seed=13)[0]
    out, _ = run(target, tokenizer, prompt, drafter, cache)
    path = str(tmp_path / "chat.safetensors")
    save_prompt_cache(path, cache, {"user": "me"})
    loaded, metadata = load_prompt_cache(path, return_metadata=True)
    assert metadata == {"user": "me"} and loaded.tokens == cache.tokens
    assert len(mlx_cache.load_prompt_cache(path)) == len(cache.target) + len(cache.drafter)  # mlx-lm's format
    second = prompt + out + [1, 2, 3]
    want, _ = run(target, tokenizer, second, drafter)
    got, last = run(target, tokenizer, second, drafter, loaded)
    assert got == want and last.cached_tokens >= len(prompt) + len(out) - 1


def test_bad_files_and_foreign_caches_are_clear_errors(pair, tokenizer, tmp_path):
    target, drafter = pair
    with pytest.raises(FileNotFoundError, match="no prompt cache file"):
        load_prompt_cache(str(tmp_path / "none.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable prompt cache") as info:
        load_prompt_cache(str(tmp_path / "junk.safetensors"))
    assert info.value.__cause__ is not None
    mlx_only = str(tmp_path / "mlx.safetensors")
    mlx_cache.save_prompt_cache(mlx_only, make_prompt_cache(target).target)
    with pytest.raises(ValueError, match="not a treeflash-mlx prompt cache"):
        load_prompt_cache(mlx_only)
    other = tiny_target("qwen3", layers=2)
    with pytest.raises(ValueError, match="holds 4 target layers but the model has 2"):
        run(other, tokenizer, [1, 2, 3], None, make_prompt_cache(target))


def test_cache_bytes_grow_with_the_conversation(pair, tokenizer):
    target, drafter = pair
    cache = make_prompt_cache(target, drafter)
    assert cache.nbytes == 0
    run(target, tokenizer, random_prompts(1, seed=14)[0], drafter, cache)
    mx.eval([c.state for c in cache.target])
    assert cache.nbytes > 0


def test_the_servers_lru_hands_out_the_right_cache_and_stays_within_its_bounds(pair, tokenizer):
    from treeflash_mlx.server import CacheLRU

    target, drafter = pair
    conversations = []
    for prompt in random_prompts(3, seed=15):
        cache = make_prompt_cache(target, drafter)
        out, _ = run(target, tokenizer, prompt + list(range(20, 30)), drafter, cache)
        conversations.append((cache, prompt + list(range(20, 30)) + out))
    lru = CacheLRU(max_entries=2, max_bytes=None)
    for cache, _ in conversations:
        lru.put(cache)
    assert lru.entries == [conversations[1][0], conversations[2][0]], "the least recently used went first"
    follow_up = conversations[2][1] + [7, 7]
    assert lru.take(follow_up, make=lambda: None) is conversations[2][0]  # it extends that one: handed out whole
    assert lru.entries == [conversations[1][0]]
    branch = conversations[1][1][:12] + [99, 98]  # shares a prefix only: a copy, the original stays
    copy = lru.take(branch, make=lambda: None)
    assert copy is not conversations[1][0] and copy.tokens == conversations[1][1][:12]
    assert lru.entries == [conversations[1][0]] and len(conversations[1][0].tokens) > 12
    want, _ = run(target, tokenizer, branch, drafter)
    got, last = run(target, tokenizer, branch, drafter, copy)
    assert got == want and last.cached_tokens == 12
    assert lru.take([255, 254, 253], make=lambda: "new") == "new"
    small = CacheLRU(max_entries=10, max_bytes=conversations[0][0].nbytes + 1)
    small.put(conversations[0][0])
    small.put(conversations[2][0])
    assert small.entries == [conversations[2][0]] and small.nbytes() <= small.max_bytes


@pytest.mark.parametrize("family", ["qwen3", "qwen3_5"])
def test_plain_steps_computed_ahead_leave_an_exact_cache_when_the_text_stops(tokenizer, family):
    """Plain decoding builds each step before the caller sees the last step's token, as mlx-lm does. A caller
    that stops leaves the step under way in the cache: it then holds every token the caller saw. An
    end-of-sequence token leaves the step computed after it too. Either way the next prompt, which continues
    the text, reuses all of it and gets the target's own output (a hybrid's recurrent states included)."""
    from conftest import mlx_lm_greedy
    from treeflash_mlx.speculative import generate_step

    target = tiny_target(family, seed=3)
    prompt = random_prompts(1, seed=5)[0]
    reference = mlx_lm_greedy(target, prompt, 30)
    cache = make_prompt_cache(target)
    steps = stream_generate(target, tokenizer, prompt, 30, prompt_cache=cache)  # no drafter: plain decoding
    assert [r.token for _, r in zip(range(10), steps)] == reference[:10]
    steps.close()  # the caller stops after 10 tokens
    assert cache.tokens == prompt + reference[:10]
    follow = prompt + reference[:10] + [3, 4, 5]
    want = mlx_lm_greedy(target, follow, 20)
    assert run(target, tokenizer, follow, None, cache, n=20)[0] == want and cache.reused == len(prompt) + 10

    stop = next(t for t in want[8:] if t not in want[:8])  # a token first met after 8 others: the "EOS"
    cut = want.index(stop) + 1
    rounds = generate_step(follow, target, prompt_cache=cache, max_tokens=20, stop_tokens=[stop])
    assert [c.token for r in rounds for c in r] == want[:cut]
    assert cache.tokens == follow + want[:cut]  # the step computed after the stop token holds it
    again = follow + want[:cut] + [7, 8]
    assert run(target, tokenizer, again, None, cache, n=12)[0] == mlx_lm_greedy(target, again, 12)
    assert cache.reused == len(follow) + cut
