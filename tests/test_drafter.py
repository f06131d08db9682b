"""The MLX drafter and head against a direct numpy evaluation of docs/algorithm.md (Drafter, AR head)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_drafter, tiny_target
from mlx.utils import tree_flatten

from treeflash_mlx.drafter import default_target_layer_ids
from treeflash_mlx.drafting import DraftOptions, head_rows, transition_tables
from treeflash_mlx.target import Target


def rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, positions, theta):
    """Half-split ("non-traditional") RoPE on (..., T, D) with one position per row of T."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    ang = positions[:, None] * inv[None]
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def silu(x):
    return x / (1 + np.exp(-x))


def reference_block(W, cfg, features, block_emb, start):
    """Pre-norm drafter output for a block at `start`, context = features of positions 0..start-1."""
    eps, hd = cfg.rms_norm_eps, cfg.head_dim
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    ctx = rms(features @ W["model.fc.weight"].T, W["model.hidden_norm.weight"], eps)
    B = block_emb.shape[0]
    ctx_pos, blk_pos = np.arange(start), start + np.arange(B)
    x = block_emb
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        xn = rms(x, W[p + "input_layernorm.weight"], eps)
        q = (xn @ W[p + "self_attn.q_proj.weight"].T).reshape(B, nh, hd).transpose(1, 0, 2)
        q = rope(rms(q, W[p + "self_attn.q_norm.weight"], eps), blk_pos, cfg.rope_theta)
        kv_in = np.concatenate([ctx, xn])  # the context enters k/v raw: no input_layernorm
        k = (kv_in @ W[p + "self_attn.k_proj.weight"].T).reshape(-1, nkv, hd).transpose(1, 0, 2)
        k = rope(rms(k, W[p + "self_attn.k_norm.weight"], eps), np.concatenate([ctx_pos, blk_pos]), cfg.rope_theta)
        v = (kv_in @ W[p + "self_attn.v_proj.weight"].T).reshape(-1, nkv, hd).transpose(1, 0, 2)
        k, v = np.repeat(k, nh // nkv, axis=0), np.repeat(v, nh // nkv, axis=0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd)  # non-causal
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = (a @ v).transpose(1, 0, 2).reshape(B, -1) @ W[p + "self_attn.o_proj.weight"].T
        x = x + o
        xn = rms(x, W[p + "post_attention_layernorm.weight"], eps)
        g, u = xn @ W[p + "mlp.gate_proj.weight"].T, xn @ W[p + "mlp.up_proj.weight"].T
        x = x + (silu(g) * u) @ W[p + "mlp.down_proj.weight"].T
    return x


def reference_head(W, cfg, h, prev_emb):
    e = rms(prev_emb, W["ar_approximation.norm.weight"], 1e-6)
    xin = np.concatenate([e, rms(h, W["model.norm.weight"], cfg.rms_norm_eps)], axis=-1)
    ug = xin @ W["ar_approximation.ug.weight"].T + W["ar_approximation.ug.bias"]
    u, g = np.split(ug, 2, axis=-1)
    return h + (silu(g) * u) @ W["ar_approximation.d.weight"].T


@pytest.fixture(scope="module")
def setup():
    target = tiny_target("qwen3", seed=2)
    drafter = tiny_drafter(target, layers=2, block_size=8, seed=4)
    W = {k: np.array(v, dtype=np.float64) for k, v in tree_flatten(drafter.parameters())}
    E = np.array(target.model.embed_tokens.weight, dtype=np.float64)
    LM = np.array(target.lm_head.weight, dtype=np.float64)
    return target, drafter, W, E, LM


def test_block_pass_matches_reference_with_context_added_in_chunks(setup):
    target, drafter, W, E, _ = setup
    cfg = drafter.args
    rng = np.random.default_rng(0)
    features = rng.normal(size=(11, len(cfg.target_layer_ids) * cfg.hidden_size)).astype(np.float32)
    cache = drafter.make_cache()
    drafter.append_context(mx.array(features[None, :4]), cache)
    drafter.append_context(mx.array(features[None, 4:]), cache)
    block = [17] + [cfg.mask_token_id] * (cfg.block_size - 1)
    got = np.array(drafter(target.model.embed_tokens(mx.array(block)[None]), cache)[0])
    want = reference_block(W, cfg, features.astype(np.float64), E[block], start=11)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert cache[0].offset == 11, "block K/V must not stay in the drafter cache"


def test_head_and_transition_tables_match_reference(setup):
    target, drafter, W, E, LM = setup
    cfg = drafter.args
    rng = np.random.default_rng(1)
    B, m, k, temp = cfg.block_size, 5, 4, 0.7
    hidden = rng.normal(size=(B, cfg.hidden_size)).astype(np.float32)
    root = 42
    tokens, logp, next_row = transition_tables(
        drafter, Target(target), root, mx.array(hidden), DraftOptions("treeflash", 32, m, k, temp)
    )
    h = hidden.astype(np.float64)
    marginal = rms(h, W["model.norm.weight"], cfg.rms_norm_eps) @ LM.T
    cand = np.argsort(-marginal, axis=-1)[:, :m]  # cand[j]: top-m at block position j
    assert tokens.shape == logp.shape == next_row.shape == (B - 1, m, k)
    for d in range(1, B):
        for r in range(m):
            prev = root if d == 1 else cand[d - 1, r]
            corrected = reference_head(W, cfg, h[d], E[prev])
            z = rms(corrected, W["model.norm.weight"], cfg.rms_norm_eps) @ LM.T / temp
            lp = z - z.max() - np.log(np.exp(z - z.max()).sum())
            best = np.argsort(-lp)[:k]
            np.testing.assert_array_equal(tokens[d - 1, r], best)
            np.testing.assert_allclose(logp[d - 1, r], lp[best], rtol=1e-4, atol=1e-4)
            for c in range(k):
                hit = np.flatnonzero(cand[d] == best[c]) if d < B - 1 else []
                assert next_row[d - 1, r, c] == (hit[0] if len(hit) else -1)


def test_marginal_tables_are_one_row_per_depth(setup):
    target, drafter, W, _, LM = setup
    cfg = drafter.args
    hidden = np.random.default_rng(2).normal(size=(cfg.block_size, cfg.hidden_size)).astype(np.float32)
    tokens, logp, next_row = transition_tables(
        drafter, Target(target), 3, mx.array(hidden), DraftOptions("marginal", 32, 16, 6, 1.0)
    )
    z = rms(hidden.astype(np.float64), W["model.norm.weight"], cfg.rms_norm_eps) @ LM.T
    lp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    np.testing.assert_array_equal(tokens[:, 0], np.argsort(-lp, axis=-1)[1:, :6])
    np.testing.assert_allclose(logp[:, 0], -np.sort(-lp, axis=-1)[1:, :6], rtol=1e-4, atol=1e-4)
    assert tokens.shape[1] == 1 and (next_row == 0).all()


def test_default_layer_ids_follow_the_published_rule():
    assert default_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]
    assert default_target_layer_ids(28, 1) == [14]


def test_head_vocab_restricts_each_depth_to_its_marginal_top_k(setup):
    target, drafter, W, _, LM = setup
    cfg = drafter.args
    hidden = np.random.default_rng(3).normal(size=(cfg.block_size, cfg.hidden_size)).astype(np.float32)
    full = transition_tables(drafter, Target(target), 9, mx.array(hidden), DraftOptions("treeflash", 32, 4, 4, 1.0))
    same = transition_tables(drafter, Target(target), 9, mx.array(hidden),
                             DraftOptions("treeflash", 32, 4, 4, 1.0, head_vocab=cfg.vocab_size))
    assert all(np.array_equal(a, b) for a, b in zip(full, same)), "K >= vocabulary means no restriction"
    tokens, logp, _ = transition_tables(drafter, Target(target), 9, mx.array(hidden),
                                        DraftOptions("treeflash", 32, 4, 4, 1.0, head_vocab=20))
    marginal = rms(hidden.astype(np.float64), W["model.norm.weight"], cfg.rms_norm_eps) @ LM.T
    for d in range(1, cfg.block_size):
        allowed = set(np.argsort(-marginal[d])[:20].tolist())
        assert set(tokens[d - 1].ravel().tolist()) <= allowed
    assert (logp <= 0).all() and (np.diff(logp, axis=-1) <= 1e-6).all()


def test_small_budgets_compute_only_the_head_rows_a_tree_can_use(setup):
    target, drafter, *_ = setup
    B, m = drafter.args.block_size, 4
    hidden = mx.array(np.random.default_rng(4).normal(size=(B, drafter.args.hidden_size)).astype(np.float32))
    full = transition_tables(drafter, Target(target), 9, hidden, DraftOptions("treeflash", 64, m, 4, 1.0))
    small = transition_tables(drafter, Target(target), 9, hidden, DraftOptions("treeflash", 8, m, 4, 1.0))
    counts = head_rows(B, m, 8)  # candidates of depth j = 1..B-2 that get a row at depth j + 1
    assert list(counts) == [min(m, max(0, (8 - j) // 2)) for j in range(1, B - 1)] and counts.min() < m
    assert (head_rows(16, 16, 64) == 16).all(), "the published budget keeps every candidate row"
    np.testing.assert_array_equal(small[0][0], full[0][0])  # depth 1: the root's row
    rows = [m, *counts]  # rows that exist at depths 1..B-1
    for j, kept in enumerate(counts, start=1):
        np.testing.assert_array_equal(small[0][j, :kept], full[0][j, :kept])
        np.testing.assert_allclose(small[1][j, :kept], full[1][j, :kept], rtol=1e-5, atol=1e-5)
        assert np.isneginf(small[1][j, kept:]).all(), "rows no tree of this budget can use stay empty"
        parent_rows = rows[j - 1]  # depth-j tokens continue to a depth-(j+1) row only if it exists
        want = np.where(full[2][j - 1, :parent_rows] < kept, full[2][j - 1, :parent_rows], -1)
        np.testing.assert_array_equal(small[2][j - 1, :parent_rows], want)
