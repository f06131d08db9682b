"""Sampling keeps the target's distribution; path-dependent processors see each node's own history."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import mlx_lm_greedy, random_prompts, tiny_drafter, tiny_target
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import apply_top_p, make_logits_processors, make_sampler
from test_lossless_greedy import Oracle

import treeflash_mlx.sampling as sampling
from treeflash_mlx import stream_generate

VOCAB, N_SAMPLES, PROMPT = 8, 20_000, [1, 5, 2]
OPTS = dict(tree_size=10, draft_top_m=4, draft_top_k=3)


@pytest.fixture(scope="module")
def pair():
    target = tiny_target("qwen3", vocab=VOCAB, hidden=32, layers=2, seed=7)
    return target, tiny_drafter(target, block_size=4, seed=8)


def exact_joint(target, temp, top_p):
    """P(first three tokens) under plain target sampling with the same sampler transformation."""
    probs = np.zeros((VOCAB,) * 3)

    def step(prefix):
        logits = target(mx.array(PROMPT + list(prefix))[None])[0, -1].astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits)
        if top_p < 1:
            logprobs = apply_top_p(logprobs[None], top_p)[0]
        return np.array(mx.softmax(logprobs / temp))

    p1 = step(())
    for a in range(VOCAB):
        p2 = step((a,))
        for b in range(VOCAB):
            probs[a, b] = p1[a] * p2[b] * step((a, b))
    return probs


def sample_counts(target, drafter, tokenizer, temp, top_p, n, seed, opts=OPTS):
    mx.random.seed(seed)
    sampler = make_sampler(temp, top_p)
    counts = np.zeros((VOCAB,) * 3)
    for _ in range(n):
        out = [r.token for r in stream_generate(target, tokenizer, PROMPT, 3, drafter=drafter, sampler=sampler, **opts)]
        counts[tuple(out)] += 1
    return counts


def chi_square(counts, probs):
    """Pearson's statistic over cells with expected count >= 5 (the rest pooled); returns (stat, df)."""
    n = counts.sum()
    expected = probs.ravel() * n
    big = expected >= 5
    obs = np.append(counts.ravel()[big], counts.ravel()[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    stat = (((obs - exp) ** 2)[keep] / exp[keep]).sum()
    return stat, keep.sum() - 1


def threshold(df):
    return df + 4 * np.sqrt(2 * df)  # about a 1e-4 false-alarm rate


@pytest.fixture(scope="module")
def hybrid_pair():
    """A Gated DeltaNet layer then a gated attention one: every tree node's state is its own path's."""
    target = tiny_target("qwen3_5", vocab=VOCAB, hidden=32, layers=2, seed=7)
    return target, tiny_drafter(target, block_size=4, seed=8)


@pytest.mark.slow  # ~4 minutes each: 20,000 generations
@pytest.mark.parametrize("family,temp,top_p,tree_size", [("qwen3", 0.7, 0.9, 10), ("qwen3", 0.7, 0.9, "auto"),
                                                          ("qwen3_5", 1.0, 1.0, 10)])
def test_first_three_tokens_follow_the_target_distribution(request, tokenizer, family, temp, top_p, tree_size):
    """With auto, each round's tree (its size, a copy, or the root alone) follows the machine's timings; the
    hybrid's trees run its Gated DeltaNet layer node by node along each node's path."""
    target, drafter = request.getfixturevalue("pair" if family == "qwen3" else "hybrid_pair")
    probs = exact_joint(target, temp, top_p)
    counts = sample_counts(target, drafter, tokenizer, temp, top_p, N_SAMPLES, seed=0,
                           opts={**OPTS, "tree_size": tree_size})
    stat, df = chi_square(counts, probs)
    assert stat < threshold(df), f"chi-square {stat:.1f} with {df} degrees of freedom"


@pytest.mark.slow
def test_the_check_rejects_accepting_draft_tokens_without_the_target_sample(pair, tokenizer, monkeypatch):
    target, drafter = pair

    def wrong_accept(tree, samples):  # follow the drafter's first child, ignoring the target's sample
        path = [0]
        while (children := [i for i in range(len(tree)) if tree.parents[i] == path[-1]]):
            path.append(children[0])
        return path, int(samples[path[-1]])

    monkeypatch.setattr(sampling, "accept", wrong_accept)
    probs = exact_joint(target, 1.0, 1.0)
    counts = sample_counts(target, drafter, tokenizer, 1.0, 1.0, 4_000, seed=1)
    stat, df = chi_square(counts, probs)
    assert stat > threshold(df)


def test_seed_makes_sampling_repeatable(pair, tokenizer):
    target, drafter = pair
    runs = []
    for seed in (3, 3, 4):
        mx.random.seed(seed)
        runs.append([r.token for r in stream_generate(
            target, tokenizer, PROMPT, 40, drafter=drafter, sampler=make_sampler(1.0), **OPTS)])
    assert runs[0] == runs[1] != runs[2]


def test_repetition_penalty_uses_each_nodes_own_path(tokenizer):
    target = tiny_target("qwen3", seed=5)
    drafter = tiny_drafter(target)
    processors = make_logits_processors(repetition_penalty=1.8, repetition_context_size=12)
    rng = np.random.default_rng(0)
    for prompt in random_prompts(6, seed=4):
        reference = [int(t) for t, _ in generate_step(mx.array(prompt), target, max_tokens=48,
                                                      logits_processors=processors)]
        assert reference != mlx_lm_greedy(target, prompt, 48), "the penalty should change the output"
        oracle = Oracle(target, drafter, prompt + reference, rng)
        out = list(stream_generate(target, tokenizer, prompt, 48, drafter=oracle, logits_processors=processors))
        assert [r.token for r in out] == reference
        assert max(r.acceptance_length for r in out) > 3
