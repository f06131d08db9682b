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

from .tree import DraftTree

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def node_logprobs(
    logits: mx.array,
    tree: DraftTree,
    history: Sequence[int],
    processors: Sequence[LogitsProcessor] = (),
) -> mx.array:
    """Log-probabilities at every node. A path-dependent processor (repetition penalty, ...) sees as
    history the committed tokens (root included) followed by the node's own path, nothing else."""
    if processors:
        rows = []
        for i in range(len(tree)):
            seen = mx.array(list(history) + [int(tree.tokens[j]) for j in tree.path(i)])
            row = logits[i : i + 1]
            for processor in processors:
                row = processor(seen, row)
            rows.append(row)
        logits = mx.concatenate(rows, axis=0)
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
