"""Optional quantization of the target's K/V cache, switched on where mlx-lm's ``generate_step`` switches it
(docs/algorithm.md, "Quantized K/V cache").

mlx-lm converts the cache after any model call that leaves it holding at least ``quantized_kv_start`` tokens. A
query therefore attends to float K/V when its call started below the switch, to quantized K/V after. Here the
prompt is prefilled in other chunks and the rest in tree passes, so the switch offset mlx-lm would reach is
worked out in advance (``switch_offset``), no pass is let across it (prefill chunks are split there, trees cut
to the depths before it) and the cache is converted as soon as it holds exactly that many tokens.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START

from .tree import DraftTree
from .validation import integer

KV_BITS = (1, 2, 3, 4, 5, 6, 8)  # what mx.quantize supports
KV_GROUP_SIZES = (32, 64, 128)
DEFAULT_KV_GROUP_SIZE = 64


@dataclass(frozen=True)
class KVQuantization:
    bits: int
    group_size: int = DEFAULT_KV_GROUP_SIZE
    start: int = DEFAULT_QUANTIZED_KV_START


def kv_quantization(
    kv_bits: int | None,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
    head_dim: int | None = None,
) -> KVQuantization | None:
    """The checked settings (None: the cache stays float). ``head_dim``: the target's, which groups must divide."""
    group_size = integer("kv_group_size", kv_group_size)
    start = integer("quantized_kv_start", quantized_kv_start, low=0)
    if kv_bits is None:
        return None
    bits = integer("kv_bits", kv_bits)
    if bits not in KV_BITS:
        raise ValueError(f"kv_bits must be one of {', '.join(map(str, KV_BITS))}, got {bits}")
    if group_size not in KV_GROUP_SIZES:
        raise ValueError(f"kv_group_size must be one of {', '.join(map(str, KV_GROUP_SIZES))}, got {group_size}")
    if head_dim is not None and head_dim % group_size:
        fits = [g for g in KV_GROUP_SIZES if head_dim % g == 0]
        hint = f"use {' or '.join(map(str, fits))}" if fits else "this model's K/V cannot be quantized"
        raise ValueError(f"kv_group_size {group_size} does not divide the target's head dimension {head_dim}; {hint}")
    return KVQuantization(bits, group_size, start)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """mlx-lm's flags: ``--kv-bits``, ``--kv-group-size``, ``--quantized-kv-start``."""
    p.add_argument("--kv-bits", type=int, default=None,
                   help="quantize the target's K/V cache to this many bits, as mlx-lm does (default: no quantization)")
    p.add_argument("--kv-group-size", type=int, default=DEFAULT_KV_GROUP_SIZE,
                   help="group size for K/V cache quantization")
    p.add_argument("--quantized-kv-start", type=int, default=DEFAULT_QUANTIZED_KV_START,
                   help="with --kv-bits, quantize the K/V cache from this many tokens on")


def check_arguments(args: argparse.Namespace) -> dict:
    """The flags checked (errors name them as flags), as ``stream_generate`` keyword arguments."""
    names = {"kv_bits": "--kv-bits", "kv_group_size": "--kv-group-size", "quantized_kv_start": "--quantized-kv-start"}
    given = {name: getattr(args, name) for name in names}
    try:
        kv_quantization(**given)
    except ValueError as err:
        message = str(err)
        for name, flag in names.items():
            message = message.replace(name, flag)
        raise ValueError(message) from None
    return given


def kv_layers(cache: list) -> list:
    """The layer caches holding keys and values (a hybrid target's recurrent layers hold a state instead)."""
    return [c for c in cache if hasattr(c, "keys")]


def is_quantized(cache: list) -> bool:
    return any(hasattr(c, "bits") for c in cache)


def check_cache(cache: list, kv: KVQuantization | None) -> None:
    """A prompt cache already quantized continues only with the same bits and group size."""
    if not is_quantized(cache):
        return
    first = kv_layers(cache)[0]
    held = f"kv_bits={first.bits}, kv_group_size={first.group_size}"
    if kv is None or (kv.bits, kv.group_size) != (first.bits, first.group_size):
        given = "no kv_bits" if kv is None else f"kv_bits={kv.bits}, kv_group_size={kv.group_size}"
        raise ValueError(f"this prompt cache holds a quantized K/V cache ({held}) but {given} was given; "
                         f"pass {held} or start a new prompt cache")


def switch_offset(kv: KVQuantization | None, cache: list, cached: int, n_prompt: int, step: int) -> int | None:
    """The cache length at which mlx-lm's ``generate_step`` would convert the cache (None: never, or done).

    mlx-lm, given the ``cached`` prefix in its cache and the rest of the prompt, makes calls that end at
    ``cached + step, cached + 2·step, ...`` below ``n_prompt - 1``, at ``n_prompt - 1`` (the prompt but its last
    token, when that is more than the cached part), then at ``n_prompt, n_prompt + 1, ...`` (one token each).
    It converts after the first of them that ends at or past ``kv.start``."""
    if kv is None or is_quantized(cache):
        return None
    if n_prompt - cached >= 2 and kv.start <= n_prompt - 1:
        chunks = max(1, -(-(kv.start - cached) // step))  # ceil, and at least the first call
        return min(cached + chunks * step, n_prompt - 1)
    return max(kv.start, n_prompt)


def quantize_at(cache: list, switch: int | None, kv: KVQuantization | None) -> int | None:
    """Convert ``cache`` (in place, every layer) once it holds ``switch`` tokens; returns the switch still ahead."""
    if switch is None or cache[0].offset < switch:
        return switch
    for i, c in enumerate(cache):  # as mlx-lm: the layers that can be quantized (not a recurrent state)
        if hasattr(c, "to_quantized"):
            cache[i] = c.to_quantized(group_size=kv.group_size, bits=kv.bits)
    return None


def prefill_chunks(start: int, end: int, step: int, switch: int | None) -> list[tuple[int, int]]:
    """[start, end) in chunks of ``step``, one of them cut at ``switch`` so that no chunk straddles it."""
    ends = set(range(start + step, end, step)) | {end}
    if switch is not None and start < switch < end:
        ends.add(switch)
    bounds = [start, *sorted(ends)]
    return list(zip(bounds, bounds[1:]))


def before_switch(tree: DraftTree, root_position: int, switch: int | None) -> DraftTree:
    """The tree without the nodes that would sit at or past the switch: they must see the quantized cache, the
    nodes before it the float one, and one pass sees one kind. The round then ends at most at the switch."""
    if switch is None:
        return tree
    return tree.up_to_depth(switch - 1 - root_position)
