"""Hybrid targets (Qwen3.5 / Qwen3.6 / Qwen3-Next: Gated DeltaNet layers between attention ones) and gpt-oss.

The core claim: over a draft tree, each node's recurrent and convolution state is its own path's, so after every
round the committed state is exactly what plain decoding of the committed tokens leaves (to float32 rounding).
The every-mode, every-quantization comparisons with mlx-lm's greedy output are in test_targets.py."""

from __future__ import annotations

import importlib

import mlx.core as mx
import numpy as np
import pytest
from conftest import mlx_lm_greedy, random_prompts, tiny_drafter, tiny_target
from test_lossless_greedy import Oracle

from treeflash_mlx import load_prompt_cache, make_prompt_cache, save_prompt_cache, stream_generate
from treeflash_mlx.families import gated_delta
from treeflash_mlx.families.common import is_recurrent
from treeflash_mlx.speculative import generate_step
from treeflash_mlx.target import Target

HYBRIDS = ("qwen3_5", "qwen3_5_moe", "qwen3_next")
mlx_generate = importlib.import_module("mlx_lm.generate")


def plain_states(model, tokens: list[int]) -> list:
    """mlx-lm's layer caches after decoding ``tokens`` one at a time."""
    cache = model.make_cache()
    for t in tokens:
        model(mx.array([[t]]), cache=cache)
    return cache


def assert_same_states(ours: list, plain: list, label) -> None:
    for i, (a, b) in enumerate(zip(ours, plain)):
        if is_recurrent(a):
            for slot, name in ((0, "conv"), (1, "recurrent")):
                np.testing.assert_allclose(np.array(a[slot]), np.array(b[slot]), atol=2e-5, rtol=2e-4,
                                           err_msg=f"{label}: layer {i} {name} state")
        else:
            n = b.offset
            assert a.offset == n, (label, i)
            np.testing.assert_allclose(np.array(a.keys[..., :n, :]), np.array(b.keys[..., :n, :]), atol=2e-5,
                                       rtol=2e-4, err_msg=f"{label}: layer {i} keys")


@pytest.mark.parametrize("family,commit_by", [(f, "stored") for f in HYBRIDS] + [("qwen3_5", "replay")])
def test_after_every_round_the_committed_states_are_plain_decodings(family, commit_by, tokenizer, monkeypatch):
    """An oracle drafts the true continuation with decoy branches ahead of it (accepted paths skip nodes) and
    sometimes a wrong token; after each round every layer's state equals plain decoding's of the same tokens,
    whether the commit takes the accepted node's kept state or replays its path."""
    from treeflash_mlx.families.qwen3_next import Qwen3Next

    monkeypatch.setattr(Qwen3Next, "recurrent_commit", commit_by)
    target = tiny_target(family, seed=4)
    drafter = tiny_drafter(target)
    rng = np.random.default_rng(1)
    taus = []
    for prompt in random_prompts(3, seed=12):
        reference = mlx_lm_greedy(target, prompt, 30)
        oracle = Oracle(target, drafter, prompt + reference, rng)
        cache = make_prompt_cache(target, drafter)
        committed = []
        for step in generate_step(prompt, target, oracle, prompt_cache=cache, max_tokens=30):
            committed += [c.token for c in step]
            if step[0].round:
                taus.append(len(step))
            # the cache holds the prompt and every committed token but the newest (the next round's root); the
            # last round may hold more than max_tokens lets out
            assert len(cache.tokens) >= len(prompt + committed) - 1
            assert cache.tokens == (prompt + reference)[: len(cache.tokens)]
            assert_same_states(cache.target, plain_states(target, cache.tokens), (family, len(cache.tokens)))
        assert committed == reference
    assert np.mean(taus) > 3 and max(taus) == 8, taus  # long paths, not only the root


def test_auto_keeps_per_node_states_while_they_fit_and_replays_beyond(monkeypatch):
    from treeflash_mlx.families.qwen3_next import Qwen3Next

    family = Target(tiny_target("qwen3_5")).family  # 2 linear layers of 4 heads of 16 x 16: 8 KiB a node
    assert family.recurrent_commit == "auto"
    monkeypatch.setattr(Qwen3Next, "STORED_BYTES", 16 * 8192)
    assert family.commit_by(16) == "stored" and family.commit_by(17) == "replay"
    monkeypatch.setattr(Qwen3Next, "recurrent_commit", "replay")
    assert family.commit_by(1) == "replay"


def test_the_tree_plan_reads_each_nodes_own_path():
    # 0 ─ 1 ─ 3 ─ 5
    #   └ 2 ─ 4
    plan = gated_delta.TreePlan(np.array([-1, 0, 0, 1, 2, 3]), kernel=4)
    # rows: 0..2 are the committed conv inputs (K-1 = 3), node i is row 3 + i
    assert plan.conv_rows.tolist() == [[0, 1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 5], [2, 3, 4, 6], [2, 3, 5, 7],
                                       [3, 4, 6, 8]]
    assert [level.tolist() for level in plan.levels] == [[0], [1, 2], [3, 4], [5]]
    assert [p.tolist() for p in plan.parent_slot] == [[0], [0, 0], [0, 1], [0]]


def test_the_tree_recurrence_equals_running_each_path_alone():
    rng = np.random.default_rng(0)
    parents = np.array([-1, 0, 0, 1, 1, 2, 4, 4])
    n, Hk, Hv, Dk, Dv = len(parents), 2, 4, 8, 4
    q, k = (mx.array(rng.normal(size=(n, Hk, Dk)), dtype=mx.float32) for _ in range(2))
    v = mx.array(rng.normal(size=(n, Hv, Dv)), dtype=mx.float32)
    g, beta = (mx.array(rng.uniform(0.2, 1.0, size=(n, Hv)), dtype=mx.float32) for _ in range(2))
    state = mx.array(rng.normal(size=(1, Hv, Dv, Dk)), dtype=mx.float32)
    plan = gated_delta.TreePlan(parents, kernel=4)
    y, states = gated_delta.tree_recurrence(q, k, v, g, beta, state, plan)
    for node in range(n):
        path, i = [], node
        while i >= 0:
            path.insert(0, i)
            i = parents[i]
        s = state
        for i in path:  # mlx-lm's own recurrence, one token at a time, along the node's path
            y_i, s = mlx_generate_ops_step(q[i], k[i], v[i], g[i], beta[i], s)
        np.testing.assert_allclose(np.array(y[node]), np.array(y_i), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(np.array(states[plan.depths[node]][plan.slot[node]]), np.array(s[0]), atol=1e-5)


def mlx_generate_ops_step(q, k, v, g, beta, state):
    from mlx_lm.models.gated_delta import gated_delta_ops

    y, state = gated_delta_ops(q[None, None], k[None, None], v[None, None], g[None, None], beta[None, None], state)
    return y[0, 0], state


@pytest.mark.skipif(not mx.metal.is_available(), reason="the Metal kernel needs an Apple GPU (MLX has none here)")
def test_the_metal_kernel_equals_the_ops_path():
    rng = np.random.default_rng(1)
    parents = np.array([-1, 0, 0, 1, 2, 3, 3, 5, 6, 6])
    n, H, Dk, Dv = len(parents), 4, 64, 32
    q, k = (mx.array(rng.normal(size=(n, H, Dk)) / 8, dtype=mx.float32) for _ in range(2))
    v = mx.array(rng.normal(size=(n, H, Dv)), dtype=mx.float32)
    g, beta = (mx.array(rng.uniform(0.2, 1.0, size=(n, H)), dtype=mx.float32) for _ in range(2))
    state = mx.array(rng.normal(size=(1, H, Dv, Dk)), dtype=mx.float32)
    plan = gated_delta.TreePlan(parents, kernel=4)
    with mx.stream(mx.gpu):
        y_gpu, s_gpu = gated_delta.metal_tree_recurrence(q, k, v, g, beta, state, plan)
    with mx.stream(mx.cpu):
        y_cpu, s_cpu = gated_delta.tree_recurrence(q, k, v, g, beta, state, plan)
    np.testing.assert_allclose(np.array(y_gpu), np.array(y_cpu), atol=1e-4, rtol=1e-4)
    for a, b in zip(s_gpu, s_cpu):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen3_5", "gpt_oss"])
def test_copies_from_the_context_are_lossless_on_hybrids_and_gpt_oss(family, tokenizer):
    """Copied branches hang below drafted ones: deeper, narrower trees than the drafter alone gives."""
    from treeflash_mlx.speculative import RoundStats

    target = tiny_target(family, seed=3)
    drafter = tiny_drafter(target, seed=1)
    stats = RoundStats()
    for p in random_prompts(2, seed=6):
        answer = mlx_lm_greedy(target, p, 20)
        prompt = p + answer + p + answer[:10]  # its last tokens occurred before: their sequel is copied
        got = [r.token for r in stream_generate(target, tokenizer, prompt, 40, drafter=drafter, draft_lookup=8,
                                                tree_size=16, stats=stats)]  # (auto may leave copies out)
        assert got == mlx_lm_greedy(target, prompt, 40)
    assert any(r.copied for r in stats.rounds), "some rounds should hold a copied branch"


@pytest.mark.parametrize("mode", ["treeflash", "chain", "ar"])
def test_a_quantized_kv_cache_on_a_hybrid_is_mlx_lms(mode, tokenizer):
    """mlx-lm quantizes the attention layers' K/V and leaves the recurrent states float; so do we."""
    target = tiny_target("qwen3_5", seed=5, hidden=128, extra={"head_dim": 32})
    drafter = tiny_drafter(target)
    kw = dict(kv_bits=4, kv_group_size=32, quantized_kv_start=6, prefill_step_size=4)
    for prompt in random_prompts(2, seed=9):
        steps = mlx_generate.generate_step(mx.array(prompt), target, max_tokens=30, **kw)
        reference = [int(t) for t, _ in steps]
        out = [r.token for r in stream_generate(target, tokenizer, prompt, 30, drafter=drafter, mode=mode, **kw)]
        assert out == reference


@pytest.fixture(scope="module")
def hybrid_pair():
    target = tiny_target("qwen3_5", seed=5)
    return target, tiny_drafter(target)


def run(target, tokenizer, prompt, drafter, cache=None, n=20):
    responses = list(stream_generate(target, tokenizer, prompt, n, drafter=drafter, prompt_cache=cache))
    return [r.token for r in responses], responses[-1]


def test_a_chat_on_a_hybrid_reuses_its_prefix_turn_after_turn(hybrid_pair, tokenizer):
    target, drafter = hybrid_pair
    cache = make_prompt_cache(target, drafter)
    conversation = random_prompts(1, seed=7)[0]
    for turn, user in enumerate(random_prompts(3, seed=8)):
        prompt = conversation + user
        got, last = run(target, tokenizer, prompt, drafter, cache)
        assert got == mlx_lm_greedy(target, prompt, 20)
        assert last.cached_tokens == (0 if turn == 0 else len(conversation) - 1)
        conversation = prompt + got


def test_a_diverging_prompt_resumes_from_the_last_checkpoint_before_it(hybrid_pair, tokenizer):
    """A recurrent state cannot be trimmed: the cache goes back to the state it kept at the end of the first
    prompt, and prefills the rest."""
    target, drafter = hybrid_pair
    cache = make_prompt_cache(target, drafter)
    first = random_prompts(1, seed=9)[0] + [10, 11, 12, 13, 14, 15]
    answer, _ = run(target, tokenizer, first, drafter, cache)
    assert [n for n, _ in cache.checkpoints] == [len(first), len(first) + len(answer) - 1]
    edited = first + [99] + answer  # the template changed the answer's start: divergence inside the cache
    got, last = run(target, tokenizer, edited, drafter, cache)
    assert got == mlx_lm_greedy(target, edited, 20) and last.cached_tokens == len(first)
    early = first[:4] + [200] + first[5:]  # divergence before any checkpoint: nothing to resume from
    got, last = run(target, tokenizer, early, drafter, cache)
    assert got == mlx_lm_greedy(target, early, 20) and last.cached_tokens == 0
    assert all(c.offset == len(cache.tokens) for c in cache.target)


def test_checkpoints_are_bounded_in_bytes(hybrid_pair, tokenizer):
    target, drafter = hybrid_pair
    cache = make_prompt_cache(target, drafter, max_checkpoint_bytes=1)
    conversation = random_prompts(1, seed=3)[0]
    for user in random_prompts(3, seed=4):
        conversation += user
        conversation += run(target, tokenizer, conversation, drafter, cache)[0]
    assert len(cache.checkpoints) == 1  # the newest is always kept
    assert cache.checkpoint_nbytes > 0 and cache.target_nbytes > cache.checkpoint_nbytes


def test_a_hybrid_cache_survives_a_file_and_a_prefix_copy(hybrid_pair, tokenizer, tmp_path):
    target, drafter = hybrid_pair
    cache = make_prompt_cache(target, drafter)
    prompt = random_prompts(1, seed=5)[0]
    answer, _ = run(target, tokenizer, prompt, drafter, cache)
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "c.safetensors"))
    follow = prompt + answer + [1, 2, 3]
    got, last = run(target, tokenizer, follow, drafter, loaded)
    assert got == mlx_lm_greedy(target, follow, 20) and last.cached_tokens == len(prompt) + len(answer) - 1
    copy = cache.prefix_copy(len(prompt) + 3)  # back to the checkpoint at the end of the prompt
    assert len(copy.tokens) == len(prompt) and all(c.offset == len(prompt) for c in copy.target)
    got, _ = run(target, tokenizer, follow, drafter, copy)
    assert got == mlx_lm_greedy(target, follow, 20)
