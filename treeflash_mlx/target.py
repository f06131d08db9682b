"""Tree forward passes over an mlx-lm target, feature capture and KV compaction (docs/algorithm.md, "Verification", "Commit").

mlx-lm's ``Model.__call__`` takes no mask, gives RoPE one offset per call and returns no hidden states, so
this module runs the target's own layers itself: same weights, same modules (quantized ones included),
with per-token positions, an ancestor mask, and the outputs of the layers the drafter reads.

Sliding-window layers (llama/mistral ``layer_types``, Gemma 3's local layers) keep a plain K/V cache like every
other layer, so compaction and prompt caches need nothing special; their attention is cut to the window instead.
mlx-lm gives them a ``RotatingKVCache(max_size=window)``, under which the token at position p sees exactly the
keys at positions p - window < j <= p (docs/algorithm.md, "Sliding windows"); the masks here give the same set.
"""

from __future__ import annotations

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import KVCache
from mlx_lm.models.gemma3_text import clip_residual  # the residual sum Gemma 3 clips in float16

from . import cpu_kernels
from .pipeline import Stage

SUPPORTED_FAMILIES = ("qwen3", "qwen3_moe", "qwen2", "llama", "gemma3_text")
SLIDING_FAMILIES = ("llama", "gemma3_text")  # the families whose sliding-window layers this module runs
SWIGLU_FAMILIES = ("qwen3", "qwen3_moe", "qwen2", "llama")  # their dense ``MLP``: down(swiglu(gate(x), up(x)))


def layer_windows(model: nn.Module, family: str) -> list[int | None]:
    """Each layer's attention window (None: the whole context), as mlx-lm's ``make_cache`` sizes its caches."""
    layers = [layer for layer in model.model.layers if layer is not None]  # pipelined: this rank's layers
    if family == "llama":
        sliding = [layer.use_sliding for layer in layers]
        window = model.model.sliding_window
    elif family == "gemma3_text":
        sliding = [layer.self_attn.is_sliding for layer in layers]
        window = model.args.sliding_window
    else:
        sliding = [getattr(layer, "use_sliding", False) or getattr(layer.self_attn, "is_sliding", False)
                   for layer in layers]
        window = None
        if any(sliding):
            raise ValueError(
                f"{family} targets with sliding-window attention layers are not supported; sliding windows run "
                f"in the {' and '.join(SLIDING_FAMILIES)} families"
            )
    if any(sliding) and (not isinstance(window, int) or window < 1):
        raise ValueError(f"the {family} config has sliding-window layers but sliding_window is {window!r}; set it")
    return [window if s else None for s in sliding]


def window_mask(base, offset: int, query_positions: mx.array, window: int):
    """The attention mask of a sliding layer over the keys at positions >= ``lo``, and ``lo``.

    Query q at position p sees key j iff ``base`` lets it and p - window < pos(j). The keys before
    lo = offset - window + 1 are out of every query's window (no query sits before ``offset``), so they are
    sliced off; a single causal token then sees exactly its window and needs no mask at all."""
    lo = max(0, offset - window + 1)
    n = query_positions.shape[0]
    if isinstance(base, str) or base is None:  # contiguous tokens after the prefix
        if n == 1:
            return None, lo
        if offset + n - lo <= window:  # the last query still sees the first kept key: plain causal
            return "causal", lo
        base = (mx.arange(lo, offset + n)[None] <= query_positions[:, None])[None, None]
    else:
        base = base[..., lo:]
    key_positions = mx.concatenate([mx.arange(lo, offset), query_positions])
    return base & (key_positions[None] > query_positions[:, None] - window)[None, None], lo


def _from_position(x, lo: int):
    """Keys or values from position ``lo`` on (a quantized cache gives a tuple of parts)."""
    return tuple(part[..., lo:, :] for part in x) if isinstance(x, (tuple, list)) else x[..., lo:, :]


class Target:
    """An mlx-lm model of a supported family, seen as layers the speculative loop can drive."""

    def __init__(self, model: nn.Module):
        # The mlx-lm module, not model_type, decides: mistral and others are served by llama.py.
        family = type(model).__module__.rsplit(".", 1)[-1]
        if family not in SUPPORTED_FAMILIES:
            model_type = getattr(model, "model_type", None) or type(model).__name__
            raise ValueError(
                f"target model type {model_type!r} is not supported; use a model of the "
                f"{', '.join(SUPPORTED_FAMILIES)} families"
            )
        self.windows = layer_windows(model, family)
        self.model = model
        self.family = family
        self.stage = Stage(model)  # a pipelined target: which layers this rank runs (docs/distributed.md)
        self.layers = self.stage.layers
        self.num_layers = self.stage.num_layers
        self.embed_tokens = model.model.embed_tokens
        args = model.args
        self.hidden_size: int = args.hidden_size
        self.vocab_size: int = args.vocab_size
        self.max_context: int | None = getattr(args, "max_position_embeddings", None)
        # MLX's CPU backend computes exponentials one at a time (cpu_kernels.py): there attention and the
        # dense SwiGLU MLPs run our kernels; Metal's own are kept on the GPU.
        self.cpu_kernels = mx.default_device() == mx.cpu
        module = sys.modules[type(model).__module__]
        self.swiglu_mlp = getattr(module, "MLP", None) if family in SWIGLU_FAMILIES else None

    def lm_head(self, normed: mx.array) -> mx.array:
        if "lm_head" in self.model:
            return self.model.lm_head(normed)
        return self.embed_tokens.as_linear(normed)

    def lm_head_weight(self) -> mx.array | None:
        """The (vocab, hidden) output projection when it is a plain matrix (None when quantized)."""
        head = self.model.lm_head if "lm_head" in self.model else self.embed_tokens
        return None if "scales" in head or "bias" in head else head.weight

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def embed(self, tokens: mx.array) -> mx.array:
        h = self.embed_tokens(tokens)
        if self.family == "gemma3_text":  # Gemma scales its embeddings by sqrt(hidden), rounded through bf16
            h = h * mx.array(self.hidden_size**0.5, mx.bfloat16).astype(h.dtype)
        return h

    def _block(self, layer, h, mask, cache, positions, lo):
        attn = self._attention(layer.self_attn, layer.input_layernorm(h), mask, cache, positions, lo)
        if self.family == "gemma3_text":  # Gemma 3 also norms each sublayer's output before adding it
            h = clip_residual(h, layer.post_attention_layernorm(attn))
            return clip_residual(h, layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h))))
        h = h + attn
        return h + self._mlp(layer.mlp, layer.post_attention_layernorm(h))

    def _mlp(self, mlp, x):
        if self.cpu_kernels and x.dtype == mx.float32 and type(mlp) is self.swiglu_mlp:
            return mlp.down_proj(cpu_kernels.swiglu(mlp.gate_proj(x), mlp.up_proj(x)))
        return mlp(x)  # sparse MoE blocks, Gemma's GELU, other dtypes, the GPU

    def _attention(self, attn, x, mask, cache, positions, lo=0):
        B, L, _ = x.shape
        q = attn.q_proj(x).reshape(B, L, attn.n_heads, -1)
        k = attn.k_proj(x).reshape(B, L, attn.n_kv_heads, -1)
        v = attn.v_proj(x).reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if "q_norm" in attn:
            q, k = attn.q_norm(q), attn.k_norm(k)
        if positions is None:  # contiguous positions: one offset for the whole call
            q = attn.rope(q.transpose(0, 2, 1, 3), offset=cache.offset)
            k = attn.rope(k.transpose(0, 2, 1, 3), offset=cache.offset)
        else:  # one position per token: put tokens on the batch axis, where RoPE takes one offset per row
            q = attn.rope(q.transpose(1, 2, 0, 3), offset=positions).transpose(2, 1, 0, 3)
            k = attn.rope(k.transpose(1, 2, 0, 3), offset=positions).transpose(2, 1, 0, 3)
        k, v = cache.update_and_fetch(k, v)
        if lo:  # a sliding layer: the keys before lo are outside every query's window
            k, v = _from_position(k, lo), _from_position(v, lo)
        if (self.cpu_kernels and q.dtype == mx.float32 and not hasattr(cache, "bits")
                and q.shape[1] * L * k.shape[2] >= cpu_kernels.MIN_SCORES):
            out = cpu_kernels.attention(q, k, v, attn.scale, mask)  # exp at the speed of a multiply-add
        else:
            out = scaled_dot_product_attention(q, k, v, cache=cache, scale=attn.scale, mask=mask)
        return attn.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def forward(
        self,
        tokens: mx.array,
        cache: list[KVCache],
        capture: list[int] = (),
        positions: np.ndarray | None = None,
        parents_mask: np.ndarray | None = None,
        last_only: bool = False,
    ) -> tuple[mx.array, mx.array | None]:
        """Run ``tokens`` (n,) after the cached prefix; returns logits (n, V) and features (n, F) or None.

        Without ``positions`` the tokens follow the prefix causally (prefill, chains). With them, token i
        sits at ``positions[i]`` and sees the whole prefix plus the nodes ``parents_mask[i]`` marks.
        """
        n = tokens.shape[0]
        offset = cache[0].offset
        if positions is None:
            mask = "causal" if n > 1 else None
            rope_positions = None
        else:
            # (1, 1, n, offset + n): every node sees the whole prefix, then its own ancestors. Built on the
            # device from the (n, n) tree part, so the host does O(n²) work per round whatever the context.
            mask = mx.concatenate([mx.ones((n, offset), dtype=mx.bool_), mx.array(parents_mask)], axis=1)[None, None]
            rope_positions = mx.array(positions.astype(np.int32))
        masks = {None: (mask, 0)}  # per window: (mask, first key kept)
        if any(self.windows):
            query_positions = mx.arange(offset, offset + n) if positions is None else rope_positions
            for w in set(self.windows) - {None}:
                masks[w] = window_mask(mask, offset, query_positions, w)
        h = self.stage.receive(self.embed(tokens[None]))
        features = {}
        for i, (layer, c, w) in enumerate(zip(self.layers, cache, self.windows), start=self.stage.first):
            layer_mask, lo = masks[w]
            h = self._block(layer, h, layer_mask, c, rope_positions, lo)
            if i in capture:
                features[i] = h
        h, features = self.stage.gather(h, features, capture, cache)
        if last_only:
            h = h[:, -1:]
        logits = self.lm_head(self.model.model.norm(h))[0]
        if not capture:
            return logits, None
        return logits, mx.concatenate([features[i] for i in capture], axis=-1)[0]

    def verify(self, tree, cache: list[KVCache], capture: list[int] = ()) -> tuple[mx.array, mx.array | None]:
        """One target pass over a draft tree after the cached prefix (chains take the causal fast path)."""
        tokens = mx.array(tree.tokens)
        if tree.is_chain:
            return self.forward(tokens, cache, capture)
        start = cache[0].offset
        return self.forward(tokens, cache, capture, positions=start + tree.depths, parents_mask=tree.ancestor_mask())


def compact(cache: list[KVCache], start: int, keep: list[int]) -> None:
    """Keep only the K/V of tree nodes ``keep`` (indices after ``start``), moved to ``start, start+1, ...``."""
    n = len(keep)
    if keep != list(range(n)):
        index = mx.array(keep) + start
        for c in cache:
            for buf in (c.keys, c.values):  # quantized: (data, scales, biases), a list after to_quantized
                for part in buf if isinstance(buf, (tuple, list)) else (buf,):
                    part[..., start : start + n, :] = part[..., index, :]
    for c in cache:
        c.offset = start + n
