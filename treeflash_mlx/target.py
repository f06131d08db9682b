"""Tree forward passes over an mlx-lm target, feature capture and the commit (docs/algorithm.md, "Verification",
"Commit").

mlx-lm's ``Model.__call__`` takes no mask, gives RoPE one offset per call and returns no hidden states, so
this module runs the target's own layers itself through its family (``families/``): same weights, same modules
(quantized ones included), with per-token positions, an ancestor mask, and the outputs of the layers the drafter
reads. Layers with a recurrent state (Gated DeltaNet) run the tree node by node along each node's own path.

Sliding-window layers (llama/mistral ``layer_types``, Gemma 3's local layers, gpt-oss) keep a plain K/V cache like
every other layer, so compaction and prompt caches need nothing special; their attention is cut to the window
instead. mlx-lm gives them a ``RotatingKVCache(max_size=window)``, under which the token at position p sees
exactly the keys at positions p - window < j <= p (docs/algorithm.md, "Sliding windows"); the masks here give
the same set.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .families import SUPPORTED_FAMILIES, LayerPass, family_of, is_recurrent
from .families import gated_delta
from .pipeline import Stage

__all__ = ["SUPPORTED_FAMILIES", "Target", "cache_offset", "window_mask"]


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


def cache_offset(cache: list) -> int:
    """How many tokens a target cache holds (every layer holds the same number)."""
    return cache[0].offset


class Target:
    """An mlx-lm model of a supported family, seen as layers the speculative loop can drive."""

    def __init__(self, model: nn.Module):
        self.family = family_of(model)
        self.windows = self.family.windows()
        self.model = model
        self.family_name = self.family.name
        self.stage = Stage(self.family)  # a pipelined target: which layers this rank runs (docs/distributed.md)
        self.layers = self.stage.layers
        self.num_layers = self.stage.num_layers
        self.embed_tokens = self.family.text.embed_tokens
        self.norm = self.family.text.norm
        args = self.family.args
        self.hidden_size: int = args.hidden_size
        self.vocab_size: int = args.vocab_size
        self.max_context: int | None = getattr(args, "max_position_embeddings", None)
        self.head_dim: int = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
        # MLX's CPU backend computes exponentials one at a time (cpu_kernels.py): there attention and the
        # dense SwiGLU MLPs run our kernels; Metal's own are kept on the GPU.
        self.cpu_kernels = mx.default_device() == mx.cpu
        self.pending: dict = {}  # recurrent layers' per-node states of the last tree pass, until its commit

    def head_module(self) -> nn.Module:
        return self.family.head()

    def lm_head(self, normed: mx.array) -> mx.array:
        return self.family.logits(normed)

    def lm_head_weight(self) -> mx.array | None:
        """The (vocab, hidden) output projection when it is a plain matrix (None when quantized)."""
        head = self.family.head()
        return None if "scales" in head or "bias" in head else head.weight

    def make_cache(self) -> list:
        return self.family.make_cache()

    def embed(self, tokens: mx.array) -> mx.array:
        return self.family.embed(tokens)

    def forward(
        self,
        tokens: mx.array,
        cache: list,
        capture: list[int] = (),
        tree=None,
        last_only: bool = False,
    ) -> tuple[mx.array, mx.array | None]:
        """Run ``tokens`` (n,) after the cached prefix; returns logits (n, V) and features (n, F) or None.

        Without ``tree`` the tokens follow the prefix causally and are committed as they go (prefill). With a
        ``tree.DraftTree`` (a chain too) token i is node i: it sits at the root's position plus its depth and
        sees the whole prefix plus its own ancestors; ``commit`` then keeps the accepted path.
        """
        n = tokens.shape[0]
        offset = cache_offset(cache)
        if tree is None or tree.is_chain:
            mask = "causal" if n > 1 else None
            positions = None
        else:
            # (1, 1, n, offset + n): every node sees the whole prefix, then its own ancestors. Built on the
            # device from the (n, n) tree part, so the host does O(n²) work per round whatever the context.
            tree_mask = mx.array(tree.ancestor_mask())
            mask = mx.concatenate([mx.ones((n, offset), dtype=mx.bool_), tree_mask], axis=1)[None, None]
            positions = mx.array((offset + tree.depths).astype(np.int32))
        masks = {None: (mask, 0)}  # per window: (mask, first key kept)
        if any(self.windows):
            query_positions = mx.arange(offset, offset + n) if positions is None else positions
            for w in set(self.windows) - {None}:
                masks[w] = window_mask(mask, offset, query_positions, w)
        plan = None
        if tree is not None and any(is_recurrent(c) for c in cache):
            kernel = next(layer.linear_attn.conv_kernel_size for layer in self.layers if layer.is_linear)
            plan = gated_delta.TreePlan(tree.parents, kernel)
        self.pending = {}
        h = self.stage.receive(self.embed(tokens[None]))
        features = {}
        for i, (layer, c, w) in enumerate(zip(self.layers, cache, self.windows), start=self.stage.first):
            layer_mask, lo = masks[w]
            lp = LayerPass(i, c, layer_mask, lo, positions, plan, self.cpu_kernels, self.pending)
            h = self.family.block(layer, h, lp)
            if i in capture:
                features[i] = h
        if tree is None:
            for c in cache:
                if is_recurrent(c):
                    c.offset += n
        h, features = self.stage.gather(h, features, capture, cache)
        if last_only:
            h = h[:, -1:]
        logits = self.lm_head(self.norm(h))[0]
        if not capture:
            return logits, None
        return logits, mx.concatenate([features[i] for i in capture], axis=-1)[0]

    def verify(self, tree, cache: list, capture: list[int] = ()) -> tuple[mx.array, mx.array | None]:
        """One target pass over a draft tree after the cached prefix (chains take the causal fast path)."""
        return self.forward(mx.array(tree.tokens), cache, capture, tree=tree)

    def commit(self, cache: list, start: int, path: list[int]) -> None:
        """Keep the accepted ``path`` of the last tree pass (node indices, the root first) after ``start``:
        K/V layers keep those nodes' keys and values, recurrent layers the state of the path's last node."""
        compact([c for c in cache if not is_recurrent(c)], start, path)
        for i, c in enumerate(cache):
            if is_recurrent(c):
                gated_delta.commit(c, self.pending[i], path[-1])
                c.offset = start + len(path)
        self.pending = {}


def compact(cache: list, start: int, keep: list[int]) -> None:
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
