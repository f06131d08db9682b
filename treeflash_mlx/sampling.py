"""Per-node sampling and the acceptance walk (SPEC §5.2–5.3).

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


# The default sampler is mlx-lm's own, which ``make_sampler(0.0)`` also returns: the loop recognises it and,
# since the argmax of the raw logits is that of the log-probabilities, skips the normalisation over
# nodes × vocabulary (on CPUs that exp costs as much as several target layers).
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
