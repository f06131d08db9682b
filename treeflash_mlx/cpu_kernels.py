"""The target's attention and SwiGLU for MLX's CPU backend, with exponentials that cost what multiplications cost.

On the CPU, MLX computes ``exp`` (and ``sigmoid``) one element at a time: about 15-30 ns each on the 2-core
machines here, against 0.3 ns for a multiply-add. Two places of a tree verification pay for it:

- attention: a tree of n nodes verified after L cached positions takes n·L exponentials per head and layer,
  so at 8K positions a 16-node verification of a 24-layer target spends more in them than in all its matrix
  products. Here the scores and the weighted sum are BLAS products around the polynomial exponential below.
- the gated MLP, silu(gate)·up: n × intermediate-size sigmoids per layer. For Qwen2.5-Coder-0.5B and a
  16-node tree that is 1.9M of them, ~50 ms of a ~440 ms verification with MLX's own; ~16 ms with ``swiglu``.

The exponential is a fused polynomial kernel (``mx.compile``):

    exp(x) = 2^t,  t = x·log2(e) = n + f   (n = floor(t), 0 <= f < 1)
           = 2^n · p(f),  p the degree-10 Taylor polynomial of 2^f = e^(f·ln 2) (error < 5e-10 on [0, 1))

with 2^n written straight into a float32's exponent bits. Its error is that of rounding t to float32, the same
as MLX's own ``exp`` (both about 3e-6 relative at x = -40, far less near the maximum, where the weights that
matter are). Arguments are <= 0 (scores minus their row maximum; -|gate|) and clamped at -126 (2^-126 ~ 1e-38).
"""

from __future__ import annotations

import math

import mlx.core as mx

# Below this many scores (heads × queries × keys) per layer MLX's fused kernel is faster: its one call costs
# less than our handful of operations, and the exponentials it saves are too few to pay for them.
MIN_SCORES = 32768

# e^(f ln 2) = sum_k (f ln 2)^k / k!
_COEFFS = [math.log(2) ** k / math.factorial(k) for k in range(11)]


@mx.compile
def exp_nonpositive(x: mx.array) -> mx.array:
    """exp(x) for float32 x <= 0 (see the module docstring)."""
    t = mx.maximum(x * 1.4426950408889634, -126.0)
    n = mx.floor(t)
    f = t - n
    p = _COEFFS[-1]
    for c in reversed(_COEFFS[:-1]):  # Horner
        p = p * f + c
    return p * mx.view((n.astype(mx.int32) + 127) << 23, mx.float32)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask, sinks: mx.array | None = None) -> mx.array:
    """softmax(q·kᵀ·scale, masked) · v for float32 q (B, Hq, L, D), k and v (B, Hkv, S, D), Hq a multiple of
    Hkv (grouped queries). ``mask``: None (every key), "causal" (the L queries are the last L positions) or a
    bool array broadcastable to (B, Hq, L, S). Every query must see at least one key.

    ``sinks`` (Hq,): gpt-oss's attention sinks, one more logit per head that joins the softmax's normalisation
    and carries no value: weights_j = e^(s_j − m) / (Σ_i e^(s_i − m) + e^(sink − m)), m = max(max_i s_i, sink)."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    r = Hq // Hkv
    # (B, Hkv, r·L, D): the r query heads of a key head share its keys, so one product serves them all.
    scores = ((q * scale).reshape(B, Hkv, r * L, D) @ k.swapaxes(-1, -2)).reshape(B, Hkv, r, L, S)
    if isinstance(mask, str):  # causal: query i (position S - L + i) sees keys j <= S - L + i
        mask = (mx.arange(S)[None] <= mx.arange(S - L, S)[:, None])[None, None]
    if mask is not None:
        mask = _grouped(mask, Hkv, r)
        scores = mx.where(mask, scores, -mx.inf)
    top = scores.max(axis=-1, keepdims=True)
    if sinks is not None:
        sink = sinks.astype(scores.dtype).reshape(1, Hkv, r, 1, 1)
        top = mx.maximum(top, sink)
    weights = exp_nonpositive(scores - top)
    if mask is not None:
        weights = mx.where(mask, weights, 0.0)
    total = weights.sum(axis=-1, keepdims=True)
    if sinks is not None:
        total = total + exp_nonpositive(sink - top)
    weights = weights / total
    return (weights.reshape(B, Hkv, r * L, S) @ v).reshape(B, Hq, L, D)


@mx.compile
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) · up for float32 arrays, as mlx-lm's ``swiglu`` to float32 rounding.

    With e = exp(-|g|) <= 1: sigmoid(g) = 1 / (1 + e) for g >= 0 and e / (1 + e) for g < 0, so only
    ``exp_nonpositive`` is needed and nothing overflows."""
    e = exp_nonpositive(-mx.abs(gate))
    return gate * (mx.where(gate >= 0, 1.0, e) / (1.0 + e)) * up


def _grouped(mask: mx.array, kv_heads: int, r: int) -> mx.array:
    """A (B|1, Hq|1, L, S) mask as (B|1, Hkv|1, r|1, L, S), query head h = g·r + j in group g."""
    b, h, L, S = mask.shape
    return mask.reshape(b, 1, 1, L, S) if h == 1 else mask.reshape(b, kv_heads, r, L, S)
