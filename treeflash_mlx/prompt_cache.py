"""A prompt cache that outlives one generation: the target's K/V and the drafter's context, with their tokens.

A chat's next turn repeats the whole conversation so far. With a cache from the previous turn, only the part of
the new prompt past the longest prefix it shares with the cached tokens is prefilled; the cache is first
trimmed back to that prefix (the previous answer's tail, or everything after an edited message, goes).

A quantized target cache (``kv_bits``) is trimmed and copied the same way: each position's K/V are quantized on
their own, so a prefix of them is still what quantizing that prefix gives.

A hybrid target's recurrent layers (Gated DeltaNet) hold one state for the whole prefix, which cannot be trimmed
back. The cache therefore keeps checkpoints of those states (MLX arrays are immutable, so a checkpoint holds
references, not copies): at the end of each prompt and of each generation (the turn boundaries of a chat). A
prompt that leaves the cache inside its tokens resumes from the last checkpoint at or before the divergence and
prefills the rest. Checkpoints are bounded in bytes (``max_checkpoint_bytes``, the oldest go first).

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
from .families import is_recurrent
from .families.common import recurrent_cache
from .target import Target, cache_offset

DEFAULT_CHECKPOINT_BYTES = 1 << 30  # recurrent-state checkpoints a hybrid target's prompt cache may hold

FORMAT = "treeflash-mlx prompt cache v1"


class PromptCache:
    """``target``: one K/V cache per target layer, holding exactly ``tokens``. ``drafter``: the drafter's context
    caches (None until a drafting mode first needs them), holding the features of ``tokens[:drafter_length]``.

    A cache belongs to one target (and one drafter); one generation at a time may use it."""

    def __init__(self, target: list, drafter: list | None = None, tokens: Sequence[int] = (),
                 max_checkpoint_bytes: int = DEFAULT_CHECKPOINT_BYTES):
        self.target = target
        self.drafter = drafter
        self.tokens = list(tokens)
        self.reused = 0  # prompt tokens the last generation took from the cache
        # recurrent layers' states at earlier lengths, oldest first: (length, [(conv, state) per recurrent layer])
        self.checkpoints: list[tuple[int, list]] = []
        self.max_checkpoint_bytes = max_checkpoint_bytes

    @property
    def recurrent(self) -> bool:
        return any(is_recurrent(c) for c in self.target)

    def checkpoint(self) -> None:
        """Remember the recurrent layers' states at the current length (nothing for attention-only targets)."""
        n = cache_offset(self.target)
        if not self.recurrent or (self.checkpoints and self.checkpoints[-1][0] == n):
            return
        self.checkpoints.append((n, [(c[0], c[1]) for c in self.target if is_recurrent(c)]))
        while len(self.checkpoints) > 1 and self.checkpoint_nbytes > self.max_checkpoint_bytes:
            del self.checkpoints[0]

    @property
    def checkpoint_nbytes(self) -> int:
        return sum(a.nbytes for _, states in self.checkpoints for pair in states for a in pair if a is not None)

    def resumable(self, n: int) -> int:
        """The longest prefix of at most ``n`` tokens this cache can go back to (any, without recurrent layers)."""
        n = min(n, cache_offset(self.target))
        if not self.recurrent or n == cache_offset(self.target):
            return n
        return max((length for length, _ in self.checkpoints if length <= n), default=0)

    def _restore(self, n: int) -> tuple[list, list | None]:
        """The recurrent states at length ``n`` (``resumable``), and the checkpoints up to it."""
        kept = [cp for cp in self.checkpoints if cp[0] <= n]
        if n == cache_offset(self.target):
            return kept, [(c[0], c[1]) for c in self.target if is_recurrent(c)]
        states = next((s for length, s in reversed(kept) if length == n), None)
        return kept, states

    @property
    def drafter_length(self) -> int:
        return self.drafter[0].offset if self.drafter else 0

    @property
    def nbytes(self) -> int:
        return self.target_nbytes + self.drafter_nbytes

    @property
    def target_nbytes(self) -> int:
        return sum(_nbytes(c) for c in self.target if not c.empty()) + self.checkpoint_nbytes

    @property
    def drafter_nbytes(self) -> int:
        return sum(c.nbytes for c in self.drafter or [] if not c.empty())

    def prefix_copy(self, n: int) -> "PromptCache":
        """A new cache holding the first ``n`` tokens of this one (which stays as it is)."""
        n = self.resumable(min(n, len(self.tokens)))
        kept, states = self._restore(n)
        states = iter(states or [])

        def cut(layers: list, length: int) -> list:
            out = []
            for c in layers:  # a quantized layer's keys and values are (data, scales, biases) triples
                if is_recurrent(c):
                    out.append(_recurrent(next(states, (None, None)), length))
                    continue
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
        copy = PromptCache(cut(self.target, n), drafter, self.tokens[:n], self.max_checkpoint_bytes)
        copy.checkpoints = list(kept)
        return copy

    def fit(self, prompt: Sequence[int], drafting: Drafting, n_layers: int) -> int:
        """Trim the cache to the longest prefix of ``prompt`` it can serve; returns that prefix's length.

        At least the prompt's last token is always left to prefill: its logits give the first token."""
        if len(self.target) != n_layers:
            raise ValueError(
                f"this prompt cache holds {len(self.target)} target layers but the model has {n_layers}; "
                "make one with make_prompt_cache(model, drafter) for this model"
            )
        shared = 0
        limit = min(len(self.tokens), len(prompt) - 1, cache_offset(self.target))
        while shared < limit and self.tokens[shared] == prompt[shared]:
            shared += 1
        if drafting.capture:
            self.drafter = drafting.adopt(self.drafter)  # none yet, or made for another window
            shared = min(shared, self.drafter_length)
        shared = self.resumable(shared)
        self.checkpoints, states = self._restore(shared)
        states = iter(states or [])
        for i, c in enumerate(self.target):
            if is_recurrent(c):
                self.target[i] = _recurrent(next(states, (None, None)), shared)
            else:
                c.trim(c.offset - shared)
        for c in self.drafter or []:
            c.trim(max(0, c.offset - shared))
        del self.tokens[shared:]
        self.reused = shared
        return shared


def _recurrent(conv_and_state: tuple, offset: int):
    """A recurrent layer's cache holding ``conv_and_state`` after ``offset`` tokens (None, None: empty)."""
    c = recurrent_cache()
    c[0], c[1] = conv_and_state
    c.offset = offset if c[0] is not None else 0
    return c


def _nbytes(c) -> int:
    if is_recurrent(c):
        return sum(a.nbytes for a in c.cache if a is not None)
    return c.nbytes


def make_prompt_cache(model: nn.Module, drafter: Drafter | None = None,
                      max_checkpoint_bytes: int = DEFAULT_CHECKPOINT_BYTES) -> PromptCache:
    """An empty prompt cache for ``model`` (and ``drafter``): pass it as ``stream_generate(..., prompt_cache=)``.

    ``max_checkpoint_bytes``: for hybrid targets, the bytes of recurrent-state checkpoints kept (module docs)."""
    return PromptCache(Target(model).make_cache(), drafter.make_cache() if drafter is not None else None,
                       max_checkpoint_bytes=max_checkpoint_bytes)


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
    for c in layers[:n_target]:
        if is_recurrent(c):  # mlx-lm's file keeps the state, not our token count
            c.offset = len(tokens) if c[0] is not None else 0
    cache = PromptCache(layers[:n_target], drafter or layers[n_target:] or None, tokens)
    if not cache.target or cache_offset(cache.target) != len(tokens):
        raise ValueError(f"'{file_name}' is inconsistent: its target cache does not hold its tokens")
    return (cache, info) if return_metadata else cache
