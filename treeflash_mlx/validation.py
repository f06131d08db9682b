"""Checks shared by the library, the loaders and the command lines: numbers, token ids and memory budgets.

Each raises ``ValueError`` with one line naming the value, what is wrong and what would be accepted.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Iterable, Sequence

import numpy as np

# The published drafters use blocks of 16; a block sets the drafter's pass (B queries), the tables
# (B - 1 depths) and the deepest tree. Far beyond that nothing is gained and a checkpoint is suspect.
MAX_BLOCK_SIZE = 256
# Layer counts and similar small integers of a drafter config (the largest published targets have < 128 layers).
MAX_LAYERS = 1024
# Share of the machine's memory one verification may plan to use.
MEMORY_SHARE = 0.5


def integer(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """An integer (bools refused) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"in [{low if low is not None else '-inf'}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def finite(
    name: str,
    value,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number (NaN and infinities refused) within the given bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if low is not None and high is not None:
        bounds = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        bounds = f"{'>' if low_open else '>='} {low}"
    elif high is not None:
        bounds = f"{'<' if high_open else '<='} {high}"
    else:
        bounds = "finite"
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number{'' if bounds == 'finite' else ' ' + bounds}, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def token_ids(tokens: Iterable, vocab_size: int, what: str = "the prompt") -> list[int]:
    """Integer token ids, each in [0, vocab_size): out-of-range ids would index past the embedding table."""
    out = []
    for i, t in enumerate(tokens):
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (numbers.Integral, np.integer)):
            raise ValueError(f"{what} must be token ids (integers); item {i} is {t!r}")
        t = int(t)
        if not 0 <= t < vocab_size:
            raise ValueError(
                f"{what} holds token id {t} at position {i}, outside the model's vocabulary [0, {vocab_size}); "
                f"encode it with the model's own tokenizer"
            )
        out.append(t)
    return out


def memory_bytes() -> int:
    """The memory MLX can plan with: the accelerator's on a GPU, else the machine's physical memory."""
    import mlx.core as mx

    info = mx.device_info()
    for key in ("max_recommended_working_set_size", "memory_size"):
        if info.get(key):
            return int(info[key])
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def verify_bytes(nodes: int, context: int, vocab_size: int, n_heads: int, itemsize: int = 4) -> int:
    """A lower estimate of what verifying ``nodes`` tree nodes after ``context`` tokens holds at once: the
    logits, their log-probabilities and the processed copy (nodes × vocabulary each), the boolean mask and
    one layer's attention scores (nodes × (context + nodes), per head)."""
    width = context + nodes
    return 3 * nodes * vocab_size * max(itemsize, 4) + nodes * width * (1 + 4 * n_heads)


def tree_capacity(mode: str, block_size: int, top_m: int, top_k: int) -> int:
    """The most nodes the tables of one round can ever give a tree (root included).

    chain: the block; treeflash: the root's row and one row per (depth, candidate), k children each;
    marginal: one row per depth, so up to k^d nodes at depth d."""
    if mode == "ar":
        return 1
    if mode == "chain":
        return block_size
    if mode == "treeflash":
        return 1 + top_k + max(0, block_size - 2) * top_m * top_k
    total, level = 1, 1
    for _ in range(block_size - 1):
        level *= top_k
        total += level
        if total > 1 << 40:
            break
    return total


def tables_bytes(block_size: int, top_m: int, vocab_size: int, hidden_size: int, head_vocab: int = 0) -> int:
    """A lower estimate of a treeflash round's head tables: the grid of 1 + (B-2)·m hidden rows and, per row,
    the logits and log-probabilities over the head's vocabulary (the whole one, or the marginal top-K)."""
    rows = 1 + max(0, block_size - 2) * min(top_m, vocab_size)
    width = head_vocab if 0 < head_vocab < vocab_size else vocab_size
    return rows * (hidden_size + 2 * width) * 4


def check_tree_budget(
    tree_size: int,
    mode: str,
    block_size: int,
    top_m: int,
    top_k: int,
    context: int,
    vocab_size: int,
    n_heads: int,
    available: int | None = None,
    hidden_size: int = 0,
    head_vocab: int = 0,
) -> None:
    """Refuse a tree budget the tables can never fill, or a round (tables and verification) that cannot fit in
    memory. top_m and top_k beyond the vocabulary are used as the vocabulary, as drafting does."""
    if mode in ("ar", "chain"):
        return  # the budget is not used
    top_m, top_k = min(top_m, vocab_size), min(top_k, vocab_size)
    capacity = tree_capacity(mode, block_size, top_m, top_k)
    if tree_size > capacity:
        raise ValueError(
            f"tree_size {tree_size} is more than the {capacity} nodes a {mode} tree can ever hold with block size "
            f"{block_size}, top_m {top_m} and top_k {top_k}; use a tree_size of at most {capacity}"
        )
    available = memory_bytes() if available is None else available
    need = verify_bytes(tree_size, context, vocab_size, n_heads)
    if mode == "treeflash":
        need += tables_bytes(block_size, top_m, vocab_size, hidden_size, head_vocab)
    if need > MEMORY_SHARE * available:
        raise ValueError(
            f"tree_size {tree_size} (top_m {top_m}) needs about {need / 2**30:.1f} GiB for one round over {context} "
            f"tokens of context and a vocabulary of {vocab_size}, more than {MEMORY_SHARE:.0%} of this machine's "
            f"{available / 2**30:.1f} GiB; use a smaller tree_size or top_m"
        )


def utf8_text(data: bytes | str, what: str) -> str:
    """Text that is valid UTF-8. Raw bytes are decoded strictly; text that came through the operating system
    with undecodable bytes (Python keeps them as lone surrogates) is refused too."""
    try:
        if isinstance(data, bytes):
            return data.decode("utf-8")
        data.encode("utf-8")
        return data
    except UnicodeError as err:
        raise ValueError(
            f"{what} is not valid UTF-8 (at character {err.start}); convert it first, e.g. with iconv -t UTF-8"
        ) from err


def stop_strings(value: str | Sequence[str]) -> list[str]:
    """Stop strings: one string is one stop string (never split into characters)."""
    items = [value] if isinstance(value, str) else list(value)
    if any(not isinstance(s, str) or not s for s in items):
        raise ValueError("stop strings must be non-empty text")
    return items
