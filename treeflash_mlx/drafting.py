"""One drafting step: drafter pass → transition tables (SPEC §3) → draft tree (SPEC §4).

All model work of a round's drafting happens in MLX and is evaluated once; only the small tables cross to
numpy for the best-first search.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .drafter import Drafter
from .target import Target
from .tree import DraftTree, best_first, chain

MODES = ("treeflash", "marginal", "chain", "ar")


@dataclass
class DraftOptions:
    mode: str = "treeflash"
    tree_size: int = 64  # node budget, root included
    top_m: int = 16  # candidate previous tokens per depth (head rows)
    top_k: int = 16  # branching: children kept per table row
    temperature: float = 1.0  # drafter temperature: shapes the tree's scores only, never the output
    head_vocab: int = 0  # >0: the head's distribution at depth d covers only the marginal top-K of depth d


def _top(values: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The k largest entries of each row, unsorted (sorted later in numpy, where it is cheap)."""
    idx = mx.argpartition(-values, kth=k - 1, axis=-1)[..., :k]
    return idx, mx.take_along_axis(values, idx, axis=-1)


def _sorted(idx: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-vals, axis=-1, kind="stable")
    return np.take_along_axis(idx, order, -1), np.take_along_axis(vals, order, -1)


def _log_softmax(logits: mx.array, temperature: float) -> mx.array:
    logits = logits.astype(mx.float32) / temperature
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def transition_tables(
    drafter: Drafter, target: Target, root: int, hidden: mx.array, opts: DraftOptions
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tables (tokens, logp, next_row), each (B-1, rows, k), from the block's pre-norm hidden (B, H)."""
    B = hidden.shape[0]
    k = min(opts.top_k, target.vocab_size)
    normed = drafter.model.norm(hidden)
    if opts.mode == "marginal" or not drafter.has_head:
        idx, logp = _top(_log_softmax(target.lm_head(normed[1:]), opts.temperature), k)
        mx.eval(idx, logp)
        tokens, logp = _sorted(np.array(idx), np.array(logp))
        return tokens[:, None], logp[:, None], np.zeros(tokens[:, None].shape, dtype=np.int64)

    m = min(opts.top_m, target.vocab_size)
    marginal = target.lm_head(normed[1:])  # depths 1..B-1
    # Candidate previous tokens: the marginal top-m at depths 1..B-2.
    marg_idx, marg_val = _top(marginal[: B - 2], m)
    marg_idx = mx.take_along_axis(marg_idx, mx.argsort(-marg_val, axis=-1), axis=-1)  # row r = rank r
    embed = target.embed_tokens
    # Depth 1 has a single previous token, the root; depths 2..B-1 have m candidates each.
    first = drafter.correct(hidden[1:2], embed(mx.array([root])))
    rest = drafter.correct(hidden[2:, None, :], embed(marg_idx[: B - 2]))
    corrected = mx.concatenate([first, rest.reshape(-1, rest.shape[-1])], axis=0)
    normed = drafter.model.norm(corrected)  # (1 + (B-2)·m, H)
    if opts.head_vocab and opts.head_vocab < target.vocab_size:
        # On CPUs the lm_head, exp and selection over the whole vocabulary for every row cost more than the
        # head itself: score each row only over its depth's marginal top-K (tree scores only; lossless).
        k = min(k, opts.head_vocab)
        vocab, _ = _top(marginal, opts.head_vocab)  # (B-1, K)
        row_vocab = mx.concatenate([vocab[:1], mx.repeat(vocab[1:], m, axis=0)], axis=0)
        weight = target.lm_head_weight()
        if weight is None:  # quantized head: project fully, then keep the candidates
            logits = mx.take_along_axis(target.lm_head(normed), row_vocab, axis=-1)
        else:  # project onto the K candidate rows of the head only
            first_logits = normed[:1] @ weight[vocab[0]].T
            rest_logits = normed[1:].reshape(B - 2, m, -1) @ weight[vocab[1:]].transpose(0, 2, 1)
            logits = mx.concatenate([first_logits, rest_logits.reshape(-1, vocab.shape[-1])], axis=0)
        idx, logp = _top(_log_softmax(logits, opts.temperature), k)
        idx = mx.take_along_axis(row_vocab, idx, axis=-1)
    else:
        idx, logp = _top(_log_softmax(target.lm_head(normed), opts.temperature), k)
    mx.eval(idx, logp, marg_idx)

    cand = np.array(marg_idx)  # (B-2, m)
    idx, logp = _sorted(np.array(idx), np.array(logp))
    tokens = np.concatenate([np.repeat(idx[:1, None], m, axis=1), idx[1:].reshape(B - 2, m, k)], axis=0)
    logps = np.concatenate([np.repeat(logp[:1, None], m, axis=1), logp[1:].reshape(B - 2, m, k)], axis=0)
    # next_row[d-1, r, c]: rank of tokens[d-1, r, c] among the depth-d candidates, -1 if absent.
    next_row = np.full(tokens.shape, -1, dtype=np.int64)
    match = tokens[: B - 2, :, :, None] == cand[:, None, None, :]
    next_row[: B - 2] = np.where(match.any(-1), match.argmax(-1), -1)
    return tokens, logps, next_row


def untimed(stage: str, *arrays) -> None:
    """The default stage timer: no profiling, so no syncs between stages."""


def draft(drafter: Drafter, target: Target, root: int, cache, opts: DraftOptions, timer=untimed) -> DraftTree:
    """Propose a tree rooted at the last committed token; the drafter cache holds the committed prefix.

    ``timer(stage, *arrays)`` closes each stage (see ``speculative.RoundStats``)."""
    B = drafter.args.block_size
    block = mx.array([root] + [drafter.args.mask_token_id] * (B - 1))
    hidden = drafter(target.embed_tokens(block[None]), cache)[0]
    timer("drafter", hidden)
    if opts.mode == "chain":
        best = np.array(mx.argmax(target.lm_head(drafter.model.norm(hidden[1:])), axis=-1))
        timer("tables")
        tree = chain(root, best)
    else:
        tokens, logp, next_row = transition_tables(drafter, target, root, hidden, opts)
        timer("tables")
        tree = best_first(root, tokens, logp, next_row, opts.tree_size)
    timer("tree")
    return tree
