"""The CPU kernels: MLX's own attention and mlx-lm's SwiGLU to float32 rounding, for every mask trees give."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from treeflash_mlx.cpu_kernels import attention, exp_nonpositive, swiglu


def test_the_exponential_is_as_accurate_as_mlxs():
    x = mx.array(np.concatenate([np.linspace(-1, 0, 200001), -np.abs(np.random.default_rng(0).normal(size=200000)) * 20,
                                 [-87.0, -100.0, -1e4, -np.inf]]).astype(np.float32))
    want = np.exp(np.array(x).astype(np.float64))
    got, theirs = np.array(exp_nonpositive(x)).astype(np.float64), np.array(mx.exp(x)).astype(np.float64)
    normal = want > 1.2e-38  # float32 normal numbers
    rel = np.abs(got - want)[normal] / want[normal]
    assert rel.max() <= max(2e-7, 1.1 * (np.abs(theirs - want)[normal] / want[normal]).max())
    assert (got[~normal] <= 1.2e-38).all(), "beyond float32's normal range it is (next to) zero"
    assert got[x == 0] == 1.0


@pytest.mark.parametrize("heads,kv_heads,queries,keys", [(4, 2, 5, 37), (14, 2, 16, 300), (8, 8, 1, 9), (6, 1, 3, 3)])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "tree"])
def test_attention_equals_mlxs_fused_attention(heads, kv_heads, queries, keys, mask_kind):
    rng = np.random.default_rng(heads * 100 + queries)
    q = mx.array(rng.normal(size=(1, heads, queries, 16)).astype(np.float32) * 2)
    k = mx.array(rng.normal(size=(1, kv_heads, keys, 16)).astype(np.float32) * 2)
    v = mx.array(rng.normal(size=(1, kv_heads, keys, 16)).astype(np.float32))
    mask = {"none": None, "causal": "causal"}.get(mask_kind)
    if mask_kind == "tree":  # the whole prefix, then a random set of earlier nodes and itself
        tree = np.tril(rng.random((queries, queries)) < 0.5) | np.eye(queries, dtype=bool)
        mask = mx.array(np.concatenate([np.ones((queries, keys - queries), bool), tree], axis=1))[None, None]
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    got = attention(q, k, v, 0.25, mask)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("mask_kind", ["none", "causal", "tree"])
def test_attention_with_sinks_equals_mlxs(mask_kind):
    """gpt-oss's sinks: one more logit per head in the normalisation (large ones take most of the mass)."""
    rng = np.random.default_rng(7)
    heads, kv_heads, queries, keys = 8, 2, 6, 20
    q = mx.array(rng.normal(size=(1, heads, queries, 16)).astype(np.float32) * 2)
    k = mx.array(rng.normal(size=(1, kv_heads, keys, 16)).astype(np.float32) * 2)
    v = mx.array(rng.normal(size=(1, kv_heads, keys, 16)).astype(np.float32))
    sinks = mx.array(rng.normal(size=heads).astype(np.float32) * 4)
    mask = {"none": None, "causal": "causal"}.get(mask_kind)
    if mask_kind == "tree":
        tree = np.tril(rng.random((queries, queries)) < 0.5) | np.eye(queries, dtype=bool)
        mask = mx.array(np.concatenate([np.ones((queries, keys - queries), bool), tree], axis=1))[None, None]
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask, sinks=sinks)
    got = attention(q, k, v, 0.25, mask, sinks)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-6, rtol=1e-5)
    assert not np.allclose(np.array(attention(q, k, v, 0.25, mask)), np.array(want), atol=1e-3), "sinks matter"


def test_a_per_head_mask_is_applied_to_its_own_head():
    rng = np.random.default_rng(3)
    q = mx.array(rng.normal(size=(1, 4, 3, 8)).astype(np.float32))
    k = mx.array(rng.normal(size=(1, 2, 6, 8)).astype(np.float32))
    v = mx.array(rng.normal(size=(1, 2, 6, 8)).astype(np.float32))
    mask = mx.array(rng.random((1, 4, 3, 6)) < 0.6) | (mx.arange(6) == 0)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)
    np.testing.assert_allclose(np.array(attention(q, k, v, 0.3, mask)), np.array(want), atol=2e-6, rtol=1e-5)


def test_swiglu_equals_mlx_lms_to_float32_rounding():
    from mlx_lm.models.activations import swiglu as mlx_lm_swiglu

    rng = np.random.default_rng(4)
    gate = np.concatenate([rng.normal(size=50000) * 6, np.linspace(-90, 90, 10001), [0.0, -0.0, 1e-30, -1e-30]])
    gate, up = mx.array(gate.astype(np.float32)), mx.array(rng.normal(size=gate.size).astype(np.float32))
    exact = np.array(gate).astype(np.float64) / (1 + np.exp(-np.array(gate).astype(np.float64))) * np.array(up)
    got, theirs = np.array(swiglu(gate, up)).astype(np.float64), np.array(mlx_lm_swiglu(gate, up)).astype(np.float64)
    scale = np.abs(np.array(up)) * np.maximum(1.0, np.abs(np.array(gate)))  # the size of the product's terms
    assert (np.abs(got - exact) / scale).max() <= max(3e-7, 1.1 * (np.abs(theirs - exact) / scale).max())
    np.testing.assert_allclose(got, theirs, rtol=1e-5, atol=1e-6 * scale.max())
