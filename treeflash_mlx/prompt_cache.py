"""A prompt cache that outlives one generation: the target's K/V and the drafter's context, with their tokens.

A chat's next turn repeats the whole conversation so far. With a cache from the previous turn, only the part of
the new prompt past the longest prefix it shares with the cached tokens is prefilled; the cache is first
trimmed back to that prefix (the previous answer's tail, or everything after an edited message, goes).

A quantized target cache (``kv_bits``) is trimmed and copied the same way: each position's K/V are quantized on
their own, so a prefix of them is still what quantizing that prefix gives.

Files use mlx-lm's prompt-cache format (``mlx_lm.models.cache.save_prompt_cache``): the target's layer caches,
then the drafter's, plus metadata naming how many are the target's and the cached tokens (docs/checkpoints.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import mlx.nn as nn
from mlx_lm.models import cache as mlx_cache
from mlx.utils import tree_map
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from .drafter import ContextWindow, Drafter
from .drafting import Drafting
from .target import Target

FORMAT = "treeflash-mlx prompt cache v1"


class PromptCache:
    """``target``: one K/V cache per target layer, holding exactly ``tokens``. ``drafter``: the drafter's context
    caches (None until a drafting mode first needs them), holding the features of ``tokens[:drafter_length]``.

    A cache belongs to one target (and one drafter); one generation at a time may use it."""

    def __init__(self, target: list, drafter: list | None = None, tokens: Sequence[int] = ()):
        self.target = target
        self.drafter = drafter
        self.tokens = list(tokens)
        self.reused = 0  # prompt tokens the last generation took from the cache

    @property
    def drafter_length(self) -> int:
        return self.drafter[0].offset if self.drafter else 0

    @property
    def nbytes(self) -> int:
        return self.target_nbytes + self.drafter_nbytes

    @property
    def target_nbytes(self) -> int:
        return sum(c.nbytes for c in self.target if not c.empty())

    @property
    def drafter_nbytes(self) -> int:
        return sum(c.nbytes for c in self.drafter or [] if not c.empty())

    def prefix_copy(self, n: int) -> "PromptCache":
        """A new cache holding the first ``n`` tokens of this one (which stays as it is)."""
        n = min(n, len(self.tokens), self.target[0].offset)

        def cut(layers: list, length: int) -> list:
            out = []
            for c in layers:  # a quantized layer's keys and values are (data, scales, biases) triples
                if isinstance(c, ContextWindow):
                    copy = c.copy()
                    copy.trim(copy.offset - length)
                    out.append(copy)
                    continue
                copy = QuantizedKVCache(c.group_size, c.bits) if hasattr(c, "bits") else KVCache()
                if length > 0:
                    copy.keys, copy.values = tree_map(lambda x: x[..., :length, :], c.keys_and_values())
                    copy.offset = length
                out.append(copy)
            return out

        drafter = cut(self.drafter, min(n, self.drafter_length)) if self.drafter else None
        return PromptCache(cut(self.target, n), drafter, self.tokens[:n])

    def fit(self, prompt: Sequence[int], drafting: Drafting, n_layers: int) -> int:
        """Trim the cache to the longest prefix of ``prompt`` it can serve; returns that prefix's length.

        At least the prompt's last token is always left to prefill: its logits give the first token."""
        if len(self.target) != n_layers:
            raise ValueError(
                f"this prompt cache holds {len(self.target)} target layers but the model has {n_layers}; "
                "make one with make_prompt_cache(model, drafter) for this model"
            )
        shared = 0
        limit = min(len(self.tokens), len(prompt) - 1, self.target[0].offset)
        while shared < limit and self.tokens[shared] == prompt[shared]:
            shared += 1
        if drafting.capture:
            self.drafter = drafting.adopt(self.drafter)  # none yet, or made for another window
            shared = min(shared, self.drafter_length)
        for c in self.target:
            c.trim(c.offset - shared)
        for c in self.drafter or []:
            c.trim(max(0, c.offset - shared))
        del self.tokens[shared:]
        self.reused = shared
        return shared


def make_prompt_cache(model: nn.Module, drafter: Drafter | None = None) -> PromptCache:
    """An empty prompt cache for ``model`` (and ``drafter``): pass it as ``stream_generate(..., prompt_cache=)``."""
    return PromptCache(Target(model).make_cache(), drafter.make_cache() if drafter is not None else None)


def save_prompt_cache(file_name: str, cache: PromptCache, metadata: dict[str, str] | None = None) -> None:
    """Write ``cache`` to a ``.safetensors`` file (mlx-lm's prompt-cache format, plus our metadata)."""
    info = dict(metadata or {})
    info.update(treeflash_format=FORMAT, treeflash_target_layers=str(len(cache.target)),
                treeflash_tokens=json.dumps(cache.tokens))
    drafter = cache.drafter or []
    windows = [(c.window, c.sinks, c.offset) for c in drafter if isinstance(c, ContextWindow)]
    if windows:  # mlx-lm's format knows only its own classes: a window is saved as a KVCache of what it holds
        info.update(treeflash_drafter_windows=json.dumps(windows))
        drafter = [_as_kv_cache(c) for c in drafter]
    mlx_cache.save_prompt_cache(file_name, cache.target + drafter, info)


def _as_kv_cache(window: ContextWindow) -> KVCache:
    out = KVCache()
    if window.held:
        out.update_and_fetch(window.keys, window.values)
    return out


def _as_window(held: KVCache, window: int, sinks: int, offset: int) -> ContextWindow:
    out = ContextWindow(sinks, window)
    if held.offset:
        out.keys, out.values = held.keys_and_values()
    out.offset = offset
    return out


def load_prompt_cache(file_name: str, return_metadata: bool = False):
    """Read a cache written by ``save_prompt_cache``; with ``return_metadata`` also the caller's metadata."""
    if not Path(file_name).is_file():
        raise FileNotFoundError(f"no prompt cache file '{file_name}'")
    try:
        layers, info = mlx_cache.load_prompt_cache(str(file_name), return_metadata=True)
    except Exception as err:
        raise ValueError(f"'{file_name}' is not a readable prompt cache file ({err})") from err
    if info.get("treeflash_format") != FORMAT:
        raise ValueError(f"'{file_name}' is not a treeflash-mlx prompt cache (no '{FORMAT}' metadata)")
    try:
        n_target = int(info.pop("treeflash_target_layers"))
        tokens = [int(t) for t in json.loads(info.pop("treeflash_tokens"))]
        windows = json.loads(info.pop("treeflash_drafter_windows", "[]"))
        if windows and len(windows) != len(layers) - n_target:
            raise ValueError("one context window per drafter layer was expected")
        drafter = [_as_window(c, int(w), int(s), int(o)) for c, (w, s, o) in zip(layers[n_target:], windows)]
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(f"'{file_name}' has damaged treeflash-mlx metadata ({err})") from err
    info.pop("treeflash_format")
    cache = PromptCache(layers[:n_target], drafter or layers[n_target:] or None, tokens)
    if not cache.target or cache.target[0].offset != len(tokens):
        raise ValueError(f"'{file_name}' is inconsistent: its target cache does not hold its tokens")
    return (cache, info) if return_metadata else cache
