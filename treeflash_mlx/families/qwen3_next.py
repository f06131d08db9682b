"""Qwen3-Next: Gated DeltaNet (linear attention) layers, three in every four, between gated full-attention
layers with partial rotary embeddings; sparse MoE (with a shared expert) or dense MLPs.

A full-attention layer: q_proj gives queries and an output gate per head; q and k are RMS-normed per head; RoPE
turns only the first ``partial_rotary_factor`` of each head; the output is o_proj(attention · sigmoid(gate)).
A linear layer keeps a recurrent state instead of keys and values (``gated_delta``): in prefill it runs as
mlx-lm runs it, over a tree every node continues its parent's state.
"""

from __future__ import annotations

import functools

import mlx.core as mx
from mlx_lm.models import qwen3_next

from . import gated_delta
from .common import Family, attend, recurrent_cache, rotate
from mlx_lm.models.cache import KVCache


class Qwen3Next(Family):
    name = "qwen3_next"
    dense_mlp = qwen3_next.Qwen3NextMLP

    recurrent_commit = "auto"  # "stored", "replay" or "auto" (gated_delta's module docs)
    STORED_BYTES = 512 << 20  # "auto" keeps the per-node states of a pass up to this many bytes, else replays

    def commit_by(self, nodes: int) -> str:
        """How this pass's recurrent states reach the commit: kept per node while they fit ``STORED_BYTES``
        (the commit is then a slice), else replayed along the accepted path (a few MiB per node saved)."""
        if self.recurrent_commit != "auto":
            return self.recurrent_commit
        return "stored" if nodes * self.state_bytes <= self.STORED_BYTES else "replay"

    @functools.cached_property
    def state_bytes(self) -> int:
        """One token's recurrent states over all linear layers (float32)."""
        return sum(layer.linear_attn.num_v_heads * layer.linear_attn.head_v_dim * layer.linear_attn.head_k_dim * 4
                   for layer in self.layers if layer.is_linear)

    def make_cache(self):
        return [recurrent_cache() if layer.is_linear else KVCache() for layer in self.layers]

    def block(self, layer, h, lp):
        x = layer.input_layernorm(h)
        h = h + (self.linear(layer.linear_attn, x, lp) if layer.is_linear else self.attention(layer.self_attn, x, lp))
        return h + self.mlp(layer.mlp, layer.post_attention_layernorm(h), lp)

    def attention(self, attn, x, lp):
        B, L, _ = x.shape
        q, gate = mx.split(attn.q_proj(x).reshape(B, L, attn.num_attention_heads, -1), 2, axis=-1)
        k = attn.k_proj(x).reshape(B, L, attn.num_key_value_heads, -1)
        v = attn.v_proj(x).reshape(B, L, attn.num_key_value_heads, -1).transpose(0, 2, 1, 3)
        q, k = rotate(attn.rope, attn.q_norm(q), lp), rotate(attn.rope, attn.k_norm(k), lp)
        out = attend(q, k, v, lp, attn.scale)
        return attn.o_proj(out * mx.sigmoid(gate.reshape(B, L, -1)))

    def linear(self, la, x, lp):
        if lp.tree is None:  # prefill: every token is committed, as mlx-lm runs the layer
            return la(x, None, lp.cache)
        return gated_delta.gated_delta_tree(la, *self.projections(la, x), lp.cache, lp, self.commit_by(lp.tree.n))

    @staticmethod
    def projections(la, x):
        """(qkv (1, n, conv_dim), z (1, n, Hv, Dv), b, a (1, n, Hv)) as the layer's convolution and gates read them."""
        B, S, _ = x.shape
        q, k, v, z, b, a = la.fix_query_key_value_ordering(la.in_proj_qkvz(x), la.in_proj_ba(x))
        qkv = mx.concatenate([q.reshape(B, S, -1), k.reshape(B, S, -1), v.reshape(B, S, -1)], axis=-1)
        return qkv, z, b, a
