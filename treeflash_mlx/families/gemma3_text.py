"""Gemma 3 (text): embeddings scaled by sqrt(hidden), each sublayer's output normed before the (clipped)
residual sum, GELU MLPs, local sliding layers between global ones."""

import mlx.core as mx
from mlx_lm.models.gemma3_text import clip_residual  # the residual sum Gemma 3 clips in float16

from .common import Family
from .llama import checked_window


class Gemma3Text(Family):
    name = "gemma3_text"

    def windows(self):
        sliding = [layer.self_attn.is_sliding for layer in self.layers]
        return checked_window(self.name, sliding, self.args.sliding_window)

    def embed(self, tokens):
        h = self.text.embed_tokens(tokens)  # scaled by sqrt(hidden), the factor rounded through bfloat16
        return h * mx.array(self.args.hidden_size**0.5, mx.bfloat16).astype(h.dtype)

    def block(self, layer, h, lp):
        attn = self.attention(layer.self_attn, layer.input_layernorm(h), lp)
        h = clip_residual(h, layer.post_attention_layernorm(attn))
        return clip_residual(h, layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h))))
