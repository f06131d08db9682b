"""Per-node sampling and the acceptance walk (docs/algorithm.md, "Acceptance").

Every tree node gets its own independent sample from the target's (processed) distribution at that node.
The walk then follows the child whose token equals the sample. Because the tree is fixed before any sample
is drawn and siblings carry distinct tokens, the committed tokens are distributed exactly as plain sampling
from the target; at temperature 0 they are exactly plain greedy decoding.
"""

from __future__ import annotations

from typing import Callable, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import greedy_sampler

from .tree import DraftTree

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


# The default sampler is mlx-lm's own, which ``make_sampler(0.0)`` also returns; ``sample_and_accept``
# recognises it.
greedy: Sampler = greedy_sampler


def node_logits(
    logits: mx.array,
    tree: DraftTree,
    history: Sequence[int],
    processors: Sequence[LogitsProcessor] = (),
) -> mx.array:
    """Logits at every node after the processors. A path-dependent processor (repetition penalty, ...) sees
    as history the committed tokens (root included) followed by the node's own path, nothing else."""
    if not processors:
        return logits
    rows = []
    for i in range(len(tree)):
        seen = mx.array(list(history) + [int(tree.tokens[j]) for j in tree.path(i)])
        row = logits[i : i + 1]
        for processor in processors:
            row = processor(seen, row)
        rows.append(row)
    return mx.concatenate(rows, axis=0)


def log_softmax(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # in the model's dtype, as mlx-lm does


def accept(tree: DraftTree, samples: np.ndarray) -> tuple[list[int], int]:
    """Walk from the root while some child carries the current node's sample.

    Returns the accepted nodes (root first) and the bonus token: the sample at the last accepted node."""
    children: dict[tuple[int, int], int] = {
        (int(p), int(t)): i for i, (p, t) in enumerate(zip(tree.parents, tree.tokens)) if i > 0
    }
    path, node = [0], 0
    while (node, int(samples[node])) in children:
        node = children[(node, int(samples[node]))]
        path.append(node)
    return path, int(samples[node])


def sample_and_accept(logits: mx.array, tree: DraftTree, sampler: Sampler) -> tuple[list[int], int, mx.array]:
    """Sample every node and walk the tree: the accepted nodes, the bonus token, and the committed tokens'
    log-probabilities (one row per accepted node).

    Greedy skips normalising every node (on CPUs the exp over nodes × vocabulary costs as much as several
    target layers): the argmax of the raw logits is that of the log-probabilities, except where the
    normalisation's rounding ties two values (in bf16 it can). So the committed path is checked against
    mlx-lm's exact choice, the argmax of the normalised rows, and walked again from normalised rows if any
    differs."""
    if sampler is greedy:
        path, bonus = accept(tree, np.array(greedy(logits)))
        rows = log_softmax(logits[mx.array(path)])
        if np.array_equal(np.array(greedy(rows)), np.append(tree.tokens[path[1:]], bonus)):
            return path, bonus, rows
    logprobs = log_softmax(logits)
    path, bonus = accept(tree, np.array(sampler(logprobs)))
    rows = logprobs[mx.array(path)]
    mx.async_eval(rows)  # gathered now, so that the nodes × vocabulary log-probabilities can be freed
    return path, bonus, rows
