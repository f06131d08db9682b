"""The TreeFlash drafter: a DFlash block drafter with an optional AR-approximation head (docs/algorithm.md).

The drafter owns no embedding and no lm_head: block inputs are the target's embeddings of
``[root, MASK, ..., MASK]`` and logits come from the target's lm_head over ``model.norm(h)``. It reads
target features (outputs of the target layers ``target_layer_ids``) of every committed position once, keeps
their K/V in a cache, and drafts a whole block in one non-causal pass.

Parameter names follow the published TreeFlash layout (``model.layers...``, ``ar_approximation...``) so that
a TreeFlash checkpoint loads as it is and a DFlash one only gains the ``model.`` prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache
from mlx_lm.models.rope_utils import initialize_rope

from .validation import MAX_BLOCK_SIZE, MAX_LAYERS, finite, integer


def _first_given(*values):
    return next(v for v in values if v is not None)


def default_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """The published default: the middle layer for one draft layer, else spread over [1, n_target - 3]."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    span = num_target_layers - 4
    return [int(round(1 + i * span / (num_draft_layers - 1))) for i in range(num_draft_layers)]


@dataclass
class DrafterConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    num_target_layers: int
    mask_token_id: int
    head_dim: int | None = None
    block_size: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 40960
    attention_bias: bool = False
    target_layer_ids: list[int] = field(default_factory=list)
    ar_approximation: str | None = None
    candidate_tokens: int = 16
    sub_vocab_size: int | None = None  # ours: the drafter scores only these target tokens (docs/checkpoints.md)
    # per layer "full_attention" or "sliding_attention" (None: all full); a sliding layer sees the context
    # positions within ``sliding_window`` of each block query, and the block causally (docs/checkpoints.md)
    layer_types: list[str] | None = None
    sliding_window: int | None = None

    def __post_init__(self):
        """Every field's type and range, so that a hand-edited or hostile config.json fails here in one line
        rather than deep in MLX (or silently, e.g. ``"false"`` read as true)."""
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "vocab_size", "num_target_layers", "block_size", "max_position_embeddings",
                     "candidate_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        integer("mask_token_id", self.mask_token_id, low=0)
        if self.block_size < 2:
            raise ValueError(f"block_size must be at least 2 (the root and one draft token), got {self.block_size}")
        if self.block_size > MAX_BLOCK_SIZE:
            raise ValueError(f"block_size {self.block_size} is far beyond any published drafter's (16); "
                             f"at most {MAX_BLOCK_SIZE} is accepted")
        for name in ("num_hidden_layers", "num_target_layers"):
            integer(name, getattr(self, name), low=1, high=MAX_LAYERS)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        integer("head_dim", self.head_dim, low=1)
        finite("rms_norm_eps", self.rms_norm_eps, low=0, low_open=True)
        finite("rope_theta", self.rope_theta, low=0, low_open=True)
        if not isinstance(self.attention_bias, bool):
            raise ValueError(f"attention_bias must be true or false, got {self.attention_bias!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ValueError(f"rope_scaling must be an object or null, got {self.rope_scaling!r}")
        if not isinstance(self.target_layer_ids, (list, tuple)):
            raise ValueError(f"target_layer_ids must be a list of layer indices, got {self.target_layer_ids!r}")
        for i in self.target_layer_ids:
            integer("each of target_layer_ids", i)
        bad_ids = [i for i in self.target_layer_ids if not 0 <= i < self.num_target_layers]
        if bad_ids:  # worded as checkpoints.validate words it against a target
            raise ValueError(f"target_layer_ids {bad_ids} out of range for {self.num_target_layers} layers")
        if not self.target_layer_ids:
            self.target_layer_ids = default_target_layer_ids(self.num_target_layers, self.num_hidden_layers)
        if self.sub_vocab_size is not None and not (
            isinstance(self.sub_vocab_size, int) and 1 <= self.sub_vocab_size <= self.vocab_size
        ):
            raise ValueError(f"sub_vocab_size must be an integer in [1, vocab_size {self.vocab_size}], "
                             f"got {self.sub_vocab_size!r}")
        if self.ar_approximation not in (None, "swiglu"):
            raise ValueError(f"ar_approximation must be 'swiglu' or null, got {self.ar_approximation!r}")
        if self.layer_types is not None:
            if (not isinstance(self.layer_types, (list, tuple)) or len(self.layer_types) != self.num_hidden_layers
                    or any(t not in ("full_attention", "sliding_attention") for t in self.layer_types)):
                raise ValueError(f"layer_types must list 'full_attention' or 'sliding_attention' for each of the "
                                 f"{self.num_hidden_layers} layers, got {self.layer_types!r}")
            self.layer_types = list(self.layer_types)
            if "sliding_attention" in self.layer_types:
                integer("sliding_window (needed by the sliding_attention layers)", self.sliding_window, low=2)

    def window(self, layer: int) -> int | None:
        """Layer ``layer``'s attention window (None: it sees the whole context)."""
        sliding = self.layer_types is not None and self.layer_types[layer] == "sliding_attention"
        return self.sliding_window if sliding else None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "DrafterConfig":
        """Read a published TreeFlash/DFlash config.json (or ours): nested or top-level options,
        ``rope_theta`` or ``rope_parameters``. Raises KeyError naming the first missing required key."""
        dflash = config.get("dflash_config") or {}
        treeflash = config.get("treeflash_config") or {}
        rope = config.get("rope_parameters") or {}
        rope_scaling = config.get("rope_scaling")
        if rope_scaling is None and rope.get("rope_type", "default") != "default":
            rope_scaling = rope
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        for key in required:
            if key not in config:
                raise KeyError(key)
        mask_token_id = dflash.get("mask_token_id", config.get("mask_token_id"))
        if mask_token_id is None:
            raise KeyError("dflash_config.mask_token_id")
        layer_ids = dflash.get("target_layer_ids", config.get("target_layer_ids")) or []
        if not isinstance(layer_ids, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in layer_ids):
            raise ValueError(f"target_layer_ids must be a list of integers, got {layer_ids!r}")
        num_target_layers = config.get("num_target_layers")
        if num_target_layers is None:
            if not layer_ids:
                raise KeyError("num_target_layers")
            num_target_layers = max(layer_ids) + 1
        return cls(
            hidden_size=config["hidden_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=config["num_attention_heads"],
            num_key_value_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            intermediate_size=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            num_target_layers=num_target_layers,
            mask_token_id=mask_token_id,
            head_dim=config.get("head_dim"),
            block_size=dflash.get("block_size", config.get("block_size", 16)),
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=_first_given(config.get("rope_theta"), rope.get("rope_theta"), 1_000_000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=config.get("max_position_embeddings", 40960),
            attention_bias=config.get("attention_bias", False),
            target_layer_ids=list(layer_ids),
            ar_approximation=treeflash.get("ar_approximation", config.get("ar_approximation")),
            candidate_tokens=treeflash.get("candidate_tokens", config.get("candidate_tokens", 16)),
            sub_vocab_size=treeflash.get("sub_vocab_size", config.get("sub_vocab_size")),
            layer_types=config.get("layer_types"),
            sliding_window=config.get("sliding_window"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The published TreeFlash config layout, every option explicit."""
        return {
            "architectures": ["TreeFlashDraftModel" if self.ar_approximation else "DFlashDraftModel"],
            "model_type": "qwen3",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias,
            "block_size": self.block_size,
            "num_target_layers": self.num_target_layers,
            "dflash_config": {"target_layer_ids": self.target_layer_ids, "mask_token_id": self.mask_token_id},
            "treeflash_config": {
                "ar_approximation": self.ar_approximation,
                "candidate_tokens": self.candidate_tokens,
                **({"sub_vocab_size": self.sub_vocab_size} if self.sub_vocab_size else {}),
            },
            **({"layer_types": self.layer_types, "sliding_window": self.sliding_window} if self.layer_types else {}),
        }


class ContextWindow:
    """A drafter layer's context K/V bounded to the first ``sinks`` positions and the ``window`` most recent.

    A drafter attends to its context without a causal mask, so the order of the held entries does not matter,
    and positions stay absolute: RoPE is applied when a position is appended (``offset`` is the next one). So
    memory and each round's attention stay at sinks + window entries however long the context grows. It only
    changes what the drafter sees, so the trees (speed), never the output. Held entries, in order: the sinks
    (positions ``[0, min(sinks, offset))``), then the most recent ones. Trimming the newest ``n`` positions (a
    chat's edited turn) is exact for what is held; the window then refills as new positions are appended.
    """

    def __init__(self, sinks: int, window: int):
        self.sinks, self.window = sinks, window
        self.keys = self.values = None  # (1, kv_heads, held, head_dim)
        self.offset = 0

    @property
    def held(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def _keep(self, sinks: int, start: int, stop: int) -> None:
        """Keep the first ``sinks`` held entries and the entries ``[start, stop)``."""
        if sinks == start and stop == self.held:
            return
        self.keys = mx.concatenate([self.keys[..., :sinks, :], self.keys[..., start:stop, :]], axis=2)
        self.values = mx.concatenate([self.values[..., :sinks, :], self.values[..., start:stop, :]], axis=2)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = mx.concatenate([self.keys, keys], axis=2)
            self.values = mx.concatenate([self.values, values], axis=2)
        self.offset += keys.shape[2]
        sinks = min(self.sinks, self.offset)
        self._keep(sinks, max(sinks, self.held - self.window), self.held)
        return self.keys, self.values

    def keys_and_values(self) -> tuple[mx.array, mx.array]:
        return self.keys, self.values

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]

    def trim(self, n: int) -> int:
        n = min(n, self.offset)
        if n and self.keys is not None:  # held: sinks, then the positions [offset - recent, offset)
            sinks = min(self.sinks, self.offset)
            self._keep(min(sinks, self.offset - n), sinks, max(sinks, self.held - n))
        self.offset -= n
        return n

    @classmethod
    def of_whole(cls, cache: KVCache, sinks: int, window: int) -> "ContextWindow":
        """The window of a cache that holds the whole context (positions 0 .. offset-1): exact."""
        out = cls(sinks, window)
        if cache.offset:
            out.keys, out.values = cache.keys_and_values()
            out.offset = cache.offset
            kept = min(sinks, out.offset)
            out._keep(kept, max(kept, out.held - window), out.held)
        return out

    def copy(self) -> "ContextWindow":
        out = ContextWindow(self.sinks, self.window)
        out.keys, out.values, out.offset = self.keys, self.values, self.offset  # arrays are immutable values
        return out

    def is_trimmable(self) -> bool:
        return True

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def context_window(cache) -> tuple[int, int]:
    """(window, sinks) of a drafter layer's context cache; (0, 0) when it holds the whole context."""
    return (cache.window, cache.sinks) if isinstance(cache, ContextWindow) else (0, 0)


def held_positions(cache) -> np.ndarray:
    """The positions of the context entries a drafter layer's cache holds, increasing."""
    if isinstance(cache, ContextWindow):
        sinks = min(cache.sinks, cache.offset)
        return np.concatenate([np.arange(sinks), np.arange(cache.offset - (cache.held - sinks), cache.offset)])
    return np.arange(cache.offset)


class Attention(nn.Module):
    """Block queries attend, without a causal mask, to the cached context K/V and to the block's own K/V.

    A sliding layer (``window``) instead lets the query at position p see the context positions j with
    p - j < window, and the block causally (the published sliding DFlash layers' rule)."""

    def __init__(self, args: DrafterConfig, window: int | None = None):
        super().__init__()
        self.window = window
        dim, hd = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.scale = hd**-0.5
        bias = args.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, dim, bias=bias)
        self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.rope = initialize_rope(
            hd,
            base=args.rope_theta,
            traditional=False,
            scaling_config=args.rope_scaling,
            max_position_embeddings=args.max_position_embeddings,
        )

    def _keys_values(self, x: mx.array, offset: int) -> tuple[mx.array, mx.array]:
        B, L, _ = x.shape
        k = self.k_norm(self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        return self.rope(k, offset=offset), v

    def append_context(self, ctx: mx.array, cache: KVCache) -> None:
        cache.update_and_fetch(*self._keys_values(ctx, cache.offset))

    def __call__(self, x: mx.array, cache: KVCache) -> mx.array:
        B, L, _ = x.shape
        start = cache.offset  # the root's position: the cache holds exactly the committed prefix
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
        q = self.rope(q, offset=start)
        k, v = self._keys_values(x, start)
        ctx_k, ctx_v = cache.keys_and_values()
        mask = None
        if self.window is not None:
            pos = held_positions(cache)
            first = int(np.searchsorted(pos, start - self.window, side="right"))  # out of every query's window
            ctx_k, ctx_v, pos = ctx_k[..., first:, :], ctx_v[..., first:, :], pos[first:]
            query = start + np.arange(L)[:, None]  # (L, held + L): context within the window, block causal
            mask = mx.array(np.concatenate([query - pos[None] < self.window, np.tri(L, dtype=bool)], axis=1))
        k = mx.concatenate([ctx_k, k], axis=2)
        v = mx.concatenate([ctx_v, v], axis=2)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: DrafterConfig, window: int | None = None):
        super().__init__()
        self.self_attn = Attention(args, window)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cache: KVCache) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, args: DrafterConfig):
        super().__init__()
        self.layers = [DecoderLayer(args, args.window(i)) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.fc = nn.Linear(len(args.target_layer_ids) * args.hidden_size, args.hidden_size, bias=False)
        self.hidden_norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class ARApproximation(nn.Module):
    """SwiGLU correction of the depth-d hidden state given the depth-(d-1) token (docs/algorithm.md, "AR head")."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.ug = nn.Linear(2 * hidden_size, 2 * intermediate_size, bias=True)
        self.d = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.norm = nn.RMSNorm(hidden_size, eps=1e-6)

    def __call__(self, prev_embedding: mx.array, normed_hidden: mx.array) -> mx.array:
        u, g = mx.split(self.ug(mx.concatenate([self.norm(prev_embedding), normed_hidden], axis=-1)), 2, axis=-1)
        return self.d(nn.silu(g) * u)


class Drafter(nn.Module):
    def __init__(self, args: DrafterConfig):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        if args.ar_approximation == "swiglu":
            self.ar_approximation = ARApproximation(args.hidden_size, args.intermediate_size)
        if args.sub_vocab_size:
            # Target ids of the tokens the drafter scores, most frequent first: drafting projects onto these
            # rows of the target's head only. Data, not a parameter: never trained.
            self.sub_vocab = mx.zeros((args.sub_vocab_size,), dtype=mx.int32)
            self.freeze(keys=["sub_vocab"], recurse=False)

    @property
    def has_head(self) -> bool:
        return "ar_approximation" in self

    def unfreeze(self, *args, **kwargs):
        super().unfreeze(*args, **kwargs)
        if "sub_vocab" in self:
            self.freeze(keys=["sub_vocab"], recurse=False)
        return self

    def make_cache(self, window: int = 0, sinks: int = 0) -> list[KVCache | ContextWindow]:
        """One context cache per layer: the whole context, or (``window`` > 0) ``sinks`` + ``window`` positions."""
        if window:
            return [ContextWindow(sinks, window) for _ in self.model.layers]
        return [KVCache() for _ in self.model.layers]

    def append_context(self, features: mx.array, cache: list[KVCache]) -> None:
        """Cache the context K/V of newly committed positions; ``features`` is (1, n, len(ids) * hidden)."""
        ctx = self.model.hidden_norm(self.model.fc(features))
        for layer, c in zip(self.model.layers, cache):
            layer.self_attn.append_context(ctx, c)

    def __call__(self, block_embeddings: mx.array, cache: list[KVCache]) -> mx.array:
        """One block pass; returns the pre-norm hidden states (1, B, hidden). Block K/V are not cached."""
        h = block_embeddings
        for layer, c in zip(self.model.layers, cache):
            h = layer(h, c)
        return h

    def correct(self, hidden: mx.array, prev_embedding: mx.array) -> mx.array:
        """The head: ``h + d(silu(g) * u)``, still pre-norm; ``hidden`` broadcasts over candidate rows."""
        hidden = mx.broadcast_to(hidden, prev_embedding.shape)
        return hidden + self.ar_approximation(prev_embedding, self.model.norm(hidden))
