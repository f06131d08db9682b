"""Greedy TreeFlash decoding is plain greedy decoding: token for token, every family, drafter kind and mode."""

from __future__ import annotations

import gc

import mlx.core as mx
import numpy as np
import pytest
from conftest import mlx_lm_greedy, random_prompts, tiny_drafter, tiny_target
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from treeflash_mlx import stream_generate
from treeflash_mlx import autotune
from treeflash_mlx.drafting import CPU_SETTINGS, AutoDrafting, DrafterDrafting, DraftOptions, device_settings, make_drafting, untimed
from treeflash_mlx.speculative import RoundStats
from treeflash_mlx.target import Target
from treeflash_mlx.sampling import greedy, sample_and_accept
from treeflash_mlx.tree import DraftTree, chain

N_PROMPTS, N_TOKENS = 20, 64


@pytest.fixture(scope="module", params=["qwen3", "qwen2", "llama"])
def family_case(request):
    target = tiny_target(request.param)
    prompts = random_prompts(N_PROMPTS, seed=3)
    return target, prompts, [mlx_lm_greedy(target, p, N_TOKENS) for p in prompts]


CASES = [(True, "treeflash", 0), (True, "treeflash", 32), (True, "marginal", 0), (True, "chain", 0),
         (True, "ar", 0), (False, "marginal", 0), (False, "chain", 0), (False, "ar", 0)]


@pytest.mark.parametrize("head,mode,vocab", CASES,
                         ids=[f"{'head' if h else 'dflash'}-{m}" + (f"-vocab{v}" if v else "") for h, m, v in CASES])
def test_random_drafter_matches_mlx_lm_greedy(family_case, tokenizer, head, mode, vocab):
    target, prompts, expected = family_case
    drafter = tiny_drafter(target, head=head)
    for prompt, reference in zip(prompts, expected):
        out = [r.token for r in stream_generate(target, tokenizer, prompt, N_TOKENS, drafter=drafter, mode=mode,
                                                draft_vocab=vocab)]
        assert out == reference


class Oracle(DrafterDrafting):
    """An injected drafting: the target's true continuation, with decoy branches placed before the true node (so
    accepted paths are not contiguous in node order) and now and then a corrupted token. It keeps the real
    drafter's context cache, so the loop's commits are exercised as in real drafting."""

    def __init__(self, target, drafter, truth: list[int], rng: np.random.Generator, block: int = 8):
        super().__init__(drafter, Target(target), DraftOptions())
        self.truth, self.rng, self.block = truth, rng, block

    def start(self, history, cache, timer=untimed):
        start = cache[0].offset  # the drafter cache holds exactly the committed prefix
        tokens, parents, depths, cur = [history[-1]], [-1], [0], 0
        for depth, token in enumerate(self.truth[start + 1 : start + self.block], start=1):
            if self.rng.random() < 0.4:  # a decoy sibling (with a child of its own) ahead of the true node
                tokens += [(token + 1) % 255, token]
                parents += [cur, len(tokens) - 2]
                depths += [depth, depth + 1]
            if self.rng.random() < 0.08:
                token = (token + 7) % 255
            tokens.append(token)
            parents.append(cur)
            depths.append(depth)
            cur = len(tokens) - 1
        return DraftTree(np.array(tokens), np.array(parents), np.array(depths))

    def finish(self, root, pending, timer=untimed):
        return pending


def test_mostly_right_drafter_exercises_long_paths_and_compaction(tokenizer):
    target = tiny_target("qwen3", seed=5)
    drafter = tiny_drafter(target)
    rng = np.random.default_rng(0)
    taus = []
    for prompt in random_prompts(N_PROMPTS, seed=11):
        reference = mlx_lm_greedy(target, prompt, N_TOKENS)
        oracle = Oracle(target, drafter, prompt + reference, rng)
        responses = list(stream_generate(target, tokenizer, prompt, N_TOKENS, drafter=oracle))
        assert [r.token for r in responses] == reference
        taus += [r.acceptance_length for r in responses if r.round > 0 and not r.from_draft]
    assert np.mean(taus) > 3.5, "the oracle should make long acceptances"
    assert max(taus) == 8, "some round should accept every depth of the block"


VOCAB_CASES = [("treeflash", 0), ("treeflash", 16), ("marginal", 0), ("chain", 0)]


@pytest.mark.parametrize("mode,vocab", VOCAB_CASES, ids=[f"{m}-vocab{v}" for m, v in VOCAB_CASES])
def test_a_drafter_with_a_sub_vocabulary_matches_mlx_lm_greedy(family_case, tokenizer, mode, vocab):
    """Drafting over a sub-vocabulary (a random third of the ids, the true next token often missing) changes
    the trees, never the output."""
    target, prompts, expected = family_case
    ids = np.random.default_rng(4).permutation(target.args.vocab_size)[:96].tolist()
    drafter = tiny_drafter(target, sub_vocab=ids)
    for prompt, reference in zip(prompts, expected):
        out = [r.token for r in stream_generate(target, tokenizer, prompt, N_TOKENS, drafter=drafter, mode=mode,
                                                draft_vocab=vocab)]
        assert out == reference


def test_bonus_and_draft_flags_and_rounds(tokenizer):
    target = tiny_target("qwen3", seed=5)
    prompt = random_prompts(1, seed=2)[0]
    reference = mlx_lm_greedy(target, prompt, 32)
    oracle = Oracle(target, tiny_drafter(target), prompt + reference, np.random.default_rng(1))
    responses = list(stream_generate(target, tokenizer, prompt, 32, drafter=oracle))
    assert responses[0].round == 0 and not responses[0].from_draft
    for r in range(1, responses[-1].round):
        tokens = [x for x in responses if x.round == r]
        assert len(tokens) == tokens[0].acceptance_length
        assert [x.from_draft for x in tokens] == [True] * (len(tokens) - 1) + [False]
    assert responses[-1].finish_reason == "length" and len(responses) == 32


@pytest.mark.parametrize("sampler", [make_sampler(0.0), lambda logprobs: mx.argmax(logprobs, axis=-1)],
                         ids=["mlx-lm-greedy", "other-argmax"])
def test_every_token_carries_the_targets_log_probabilities(tokenizer, sampler):
    """mlx-lm's greedy sampler lets the loop skip normalising every node; the logprobs must not change."""
    target = tiny_target("qwen3", seed=6)
    prompt = random_prompts(1, seed=9)[0]
    want = [(int(t), np.array(lp)) for t, lp in generate_step(mx.array(prompt), target, max_tokens=24)]
    got = list(stream_generate(target, tokenizer, prompt, 24, drafter=tiny_drafter(target), sampler=sampler))
    assert [r.token for r in got] == [t for t, _ in want]
    for response, (_, logprobs) in zip(got, want):
        np.testing.assert_allclose(np.array(response.logprobs), logprobs, rtol=1e-4, atol=1e-4)


def test_drafting_settings_default_to_the_devices_and_given_ones_win(tokenizer):
    target = tiny_target("qwen3", seed=6)
    drafter = tiny_drafter(target)
    prompt = random_prompts(1, seed=2)[0]
    assert device_settings() == CPU_SETTINGS, "the tests run on the CPU backend"
    assert CPU_SETTINGS["tree_size"] == "auto"
    assert isinstance(make_drafting(drafter, Target(target)), AutoDrafting)
    for given, budgets in ((None, set(range(1, max(autotune.CANDIDATES) + 1))), (40, {40})):
        stats = RoundStats()
        list(stream_generate(target, tokenizer, prompt, 16, drafter=drafter, tree_size=given, stats=stats))
        assert {r.nodes for r in stats.rounds} <= budgets


@pytest.mark.parametrize("block_size", [2, 3])
def test_the_smallest_blocks_stay_lossless(tokenizer, block_size):
    target = tiny_target("qwen2", seed=7)
    drafter = tiny_drafter(target, block_size=block_size)
    for mode in ("treeflash", "marginal", "chain"):
        for prompt in random_prompts(3, seed=5):
            out = [r.token for r in stream_generate(target, tokenizer, prompt, 20, drafter=drafter, mode=mode)]
            assert out == mlx_lm_greedy(target, prompt, 20), mode


def test_held_responses_keep_only_the_committed_rows(tokenizer):
    """A caller that keeps every response must not keep every round's nodes × vocabulary logits alive."""
    target = tiny_target("qwen3", seed=6)
    prompt = random_prompts(1, seed=3)[0]
    gc.collect()
    before = mx.get_active_memory()
    responses = list(stream_generate(target, tokenizer, prompt, 48, drafter=tiny_drafter(target), tree_size=64))
    gc.collect()
    committed_rows = len(responses) * target.args.vocab_size * 4  # float32 bytes of one row per token
    assert mx.get_active_memory() - before < 2 * committed_rows


def test_greedy_keeps_mlx_lms_choice_where_bf16_rounding_ties_two_logits():
    """The loop takes the argmax of the raw logits, mlx-lm that of the normalised ones: in bf16 they can differ."""
    raw = np.zeros((2, 32000), dtype=np.float32)
    raw[:, 5], raw[:, 9] = 3.0, 3.015625  # minus the logsumexp, both round to the same bf16 value
    logits = mx.array(raw).astype(mx.bfloat16)
    mlx_lm_choice = int(greedy(logits[0] - mx.logsumexp(logits[0], keepdims=True)))
    assert int(mx.argmax(logits[0])) == 9 and mlx_lm_choice == 5, "the tie this test is about"
    path, bonus, rows = sample_and_accept(logits, chain(1, np.array([9])), greedy)  # the draft is the raw argmax
    assert (path, bonus) == ([0], 5)
    want = logits[:1] - mx.logsumexp(logits[:1], axis=-1, keepdims=True)
    np.testing.assert_array_equal(np.array(rows.astype(mx.float32)), np.array(want.astype(mx.float32)))


@pytest.mark.parametrize("max_tokens", [1, 30])
def test_a_draft_is_started_only_for_a_round_that_runs(tokenizer, max_tokens):
    target = tiny_target("qwen3", seed=6)
    started = []

    class Counting(DrafterDrafting):
        def start(self, history, cache, timer=untimed):
            started.append(history[-1])
            return super().start(history, cache, timer)

    drafting = make_drafting(tiny_drafter(target), Target(target))
    counting = Counting(drafting.drafter, drafting.target, drafting.opts)
    prompt = random_prompts(1, seed=4)[0]
    responses = list(stream_generate(target, tokenizer, prompt, max_tokens, drafter=counting))
    assert len(started) == responses[-1].round


def test_a_sub_vocabulary_is_refused_where_the_head_is_split_by_vocabulary(tokenizer):
    """A tensor-parallel Qwen3.5 keeps a slice of its head's rows on each rank: gathering the sub-vocabulary's
    rows by token id there would read past the slice (or the wrong rows). One clear error instead."""
    from treeflash_mlx.drafting import make_drafting
    from treeflash_mlx.target import Target

    target = tiny_target("qwen3_5", seed=3)
    drafter = tiny_drafter(target, sub_vocab=[3, 1, 4, 200])
    head = Target(target).head_module()
    head.weight = head.weight[: Target(target).vocab_size // 2]  # this rank's half, as the sharded model holds it
    with pytest.raises(ValueError, match="holds 128 of its 256 token rows .* use a drafter that scores the whole"):
        make_drafting(drafter, Target(target))
