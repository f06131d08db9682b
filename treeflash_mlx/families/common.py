"""What every target family shares: one pass's view of a layer, attention at per-token positions, the dense MLP.

A target pass runs the family's own modules (same weights, quantized ones included) with what mlx-lm's
``Model.__call__`` cannot give: one position per token (tree nodes at the same depth share one), an ancestor
mask, sliding windows cut by that mask, and the hidden states of the layers the drafter reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import ArraysCache, KVCache

from .. import cpu_kernels


@dataclass
class LayerPass:
    """What one layer needs of the current pass.

    ``mask``: the attention mask for this layer's window (None, "causal" or a bool array (1, 1, n, keys)).
    ``lo``: the first cached key inside the window (0 for full layers). ``positions``: (n,) RoPE position of each
    token, None when the tokens follow the cache contiguously. ``tree``: the recurrent layers' view of the draft
    tree (``gated_delta.TreePlan``), None when the tokens are committed as they go (prefill). ``pending``: where a
    recurrent layer leaves its per-node states until the commit picks the accepted node's."""

    index: int
    cache: Any
    mask: Any = None
    lo: int = 0
    positions: mx.array | None = None
    tree: Any = None
    cpu_kernels: bool = False
    pending: dict = field(default_factory=dict)


def rotate(rope: nn.Module, x: mx.array, lp: LayerPass) -> mx.array:
    """RoPE on (B, L, H, D) queries or keys, returned as (B, H, L, D)."""
    if lp.positions is None:  # contiguous positions: one offset for the whole call
        return rope(x.transpose(0, 2, 1, 3), offset=lp.cache.offset)
    # one position per token: put tokens on the batch axis, where RoPE takes one offset per row
    return rope(x.transpose(1, 2, 0, 3), offset=lp.positions).transpose(2, 1, 0, 3)


def _from_position(x, lo: int):
    """Keys or values from position ``lo`` on (a quantized cache gives a tuple of parts)."""
    return tuple(part[..., lo:, :] for part in x) if isinstance(x, (tuple, list)) else x[..., lo:, :]


def attend(q: mx.array, k: mx.array, v: mx.array, lp: LayerPass, scale: float, sinks: mx.array | None = None):
    """Attention of rotated q (B, Hq, L, D) over the cache plus k, v (B, Hkv, L, D); returns (B, L, Hq·D).

    The new keys and values join the cache (a tree's all of them: the commit keeps the accepted ones)."""
    B, _, L, _ = q.shape
    k, v = lp.cache.update_and_fetch(k, v)
    if lp.lo:  # a sliding layer: the keys before lo are outside every query's window
        k, v = _from_position(k, lp.lo), _from_position(v, lp.lo)
    if (lp.cpu_kernels and q.dtype == mx.float32 and not hasattr(lp.cache, "bits")
            and q.shape[1] * L * k.shape[2] >= cpu_kernels.MIN_SCORES):
        out = cpu_kernels.attention(q, k, v, scale, lp.mask, sinks)  # exp at the speed of a multiply-add
    else:
        out = scaled_dot_product_attention(q, k, v, cache=lp.cache, scale=scale, mask=lp.mask, sinks=sinks)
    return out.transpose(0, 2, 1, 3).reshape(B, L, -1)


def swiglu_mlp(mlp: nn.Module, x: mx.array, lp: LayerPass) -> mx.array:
    """down(silu(gate(x))·up(x)); on the CPU in float32 with the fused kernel (MLX's sigmoid is one at a time)."""
    if lp.cpu_kernels and x.dtype == mx.float32:
        return mlp.down_proj(cpu_kernels.swiglu(mlp.gate_proj(x), mlp.up_proj(x)))
    return mlp(x)


def is_recurrent(cache) -> bool:
    """A layer cache holding a recurrent state (mlx-lm's ``ArraysCache``) rather than keys and values."""
    return isinstance(cache, ArraysCache)


def recurrent_cache(size: int = 2) -> ArraysCache:
    """mlx-lm's cache of a linear-attention layer, plus the token count that K/V caches keep as ``offset``."""
    cache = ArraysCache(size)
    cache.offset = 0
    return cache


class Family:
    """The standard pre-norm decoder block: h += attn(norm(h)); h += mlp(norm(h)) (Qwen3, Qwen2, Llama, ...).

    A family module subclasses this for what its block does differently; ``Target`` drives it."""

    name = ""
    dense_mlp: type | None = None  # the family's dense SwiGLU MLP class, which the CPU kernel may run

    def __init__(self, model: nn.Module):
        self.model = model
        self.text = model.model  # embed_tokens, layers, norm
        self.args = model.args

    @property
    def layers(self) -> list:
        """The layers this process runs: all of them, or this rank's of a pipelined model (mlx-lm's ``pipeline``
        leaves the others None)."""
        return [layer for layer in self.text.layers if layer is not None]

    def head(self) -> nn.Module:
        """The output projection: ``lm_head`` or the tied embedding."""
        return self.model.lm_head if "lm_head" in self.model else self.text.embed_tokens

    def logits(self, normed: mx.array) -> mx.array:
        """The output projection of the final norm's output."""
        head = self.head()
        return head.as_linear(normed) if head is self.text.embed_tokens else head(normed)

    def windows(self) -> list[int | None]:
        """Each layer's attention window (None: the whole context), as mlx-lm sizes its caches."""
        if any(getattr(layer, "use_sliding", False) or getattr(getattr(layer, "self_attn", None), "is_sliding", False)
               for layer in self.layers):
            raise ValueError(f"{self.name} targets with sliding-window attention layers are not supported; sliding "
                             "windows run in the llama, gemma3_text and gpt_oss families")
        return [None] * len(self.layers)

    def make_cache(self) -> list:
        return [KVCache() for _ in self.layers]

    def embed(self, tokens: mx.array) -> mx.array:
        return self.text.embed_tokens(tokens)

    def block(self, layer: nn.Module, h: mx.array, lp: LayerPass) -> mx.array:
        h = h + self.attention(layer.self_attn, layer.input_layernorm(h), lp)
        return h + self.mlp(layer.mlp, layer.post_attention_layernorm(h), lp)

    def attention(self, attn: nn.Module, x: mx.array, lp: LayerPass) -> mx.array:
        B, L, _ = x.shape
        q = attn.q_proj(x).reshape(B, L, attn.n_heads, -1)
        k = attn.k_proj(x).reshape(B, L, attn.n_kv_heads, -1)
        v = attn.v_proj(x).reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if "q_norm" in attn:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = rotate(attn.rope, q, lp), rotate(attn.rope, k, lp)
        return attn.o_proj(attend(q, k, v, lp, attn.scale))

    def mlp(self, mlp: nn.Module, x: mx.array, lp: LayerPass) -> mx.array:
        if self.dense_mlp is not None and type(mlp) is self.dense_mlp:
            return swiglu_mlp(mlp, x, lp)
        return mlp(x)  # sparse MoE blocks, other activations
