"""Per-node sampling and the acceptance walk (docs/algorithm.md, "Acceptance").

Every node the walk reaches gets its own independent sample from the target's (processed) distribution at
that node; the walk then follows the child whose token equals the sample. Because the tree is fixed before any sample
is drawn and siblings carry distinct tokens, the committed tokens are distributed exactly as plain sampling
from the target; at temperature 0 they are exactly plain greedy decoding.

Seeded sampling does not depend on the tree: each generated position owns one random seed, drawn in
position order (``PositionKeys``), and a node at depth d is sampled with the seed of the position it would
fill. The walk samples only the nodes it visits, one per depth, so every seed is used once, for the
distribution at its position given the committed prefix: the output is the one plain sampling with those
seeds gives, whatever the mode, tree size or drafter.
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


class PositionKeys:
    """One sampling seed per generated position, drawn in position order.

    The stream starts from one draw of MLX's global random state (so ``mx.random.seed`` pins it) when a
    first sample is needed; greedy decoding draws nothing. ``seed(d)`` is the seed of the d-th position after
    the committed ones; ``commit(n)`` moves past n committed positions."""

    def __init__(self):
        self._rng: np.random.Generator | None = None
        self._ahead: list[int] = []

    def seed(self, depth: int) -> int:
        if self._rng is None:
            # 124 bits of the global state: a narrower start would make successive generations a walk on
            # few states, which can cycle (and repeat outputs) within tens of thousands of generations.
            self._rng = np.random.default_rng(np.array(mx.random.randint(0, 2**31 - 1, (4,))).tolist())
        while len(self._ahead) <= depth:
            self._ahead.append(int(self._rng.integers(0, 2**63 - 1)))
        return self._ahead[depth]

    def commit(self, n: int) -> None:
        del self._ahead[:n]


class _NodeSamples:
    """``samples[node]``: the node's sample, drawn on first use with the seed of the node's depth."""

    def __init__(self, logits: mx.array, tree: DraftTree, sampler: Sampler, keys: PositionKeys):
        self.logits, self.tree, self.sampler, self.keys = logits, tree, sampler, keys
        self.rows: dict[int, mx.array] = {}
        self.samples: dict[int, int] = {}

    def row(self, node: int) -> mx.array:
        if node not in self.rows:
            self.rows[node] = log_softmax(self.logits[node : node + 1])
        return self.rows[node]

    def __getitem__(self, node: int) -> int:
        node = int(node)
        if node not in self.samples:
            mx.random.seed(self.keys.seed(int(self.tree.depths[node])))
            self.samples[node] = int(self.sampler(self.row(node)).reshape(-1)[0].item())
        return self.samples[node]


def check_token(token: int, vocab_size: int) -> int:
    if not 0 <= token < vocab_size:
        raise ValueError(f"the sampler returned token id {token}, outside the vocabulary [0, {vocab_size}); "
                         "a sampler must return an index into the logits it is given")
    return token


def accept(tree: DraftTree, samples) -> tuple[list[int], int]:
    """Walk from the root while some child carries the current node's sample (``samples[node]``: an array,
    or ``_NodeSamples``, which draws a node's sample when the walk first asks for it).

    Returns the accepted nodes (root first) and the bonus token: the sample at the last accepted node."""
    children: dict[tuple[int, int], int] = {
        (int(p), int(t)): i for i, (p, t) in enumerate(zip(tree.parents, tree.tokens)) if i > 0
    }
    path, node = [0], 0
    while (node, int(samples[node])) in children:
        node = children[(node, int(samples[node]))]
        path.append(node)
    return path, int(samples[node])


def sample_and_accept(
    logits: mx.array, tree: DraftTree, sampler: Sampler, keys: PositionKeys | None = None
) -> tuple[list[int], int, mx.array]:
    """Sample the nodes the walk visits and walk the tree: the accepted nodes, the bonus token, and the
    committed tokens' log-probabilities (one row per accepted node). ``keys`` are the generation's position
    seeds (see ``PositionKeys``); the committed positions are consumed from them.

    Greedy skips normalising every node (on CPUs the exp over nodes × vocabulary costs as much as several
    target layers): the argmax of the raw logits is that of the log-probabilities, except where the
    normalisation's rounding ties two values (in bf16 it can). So the committed path is checked against
    mlx-lm's exact choice, the argmax of the normalised rows, and walked again from normalised rows if any
    differs."""
    vocab_size = logits.shape[-1]
    if sampler is greedy:
        path, bonus = accept(tree, np.array(greedy(logits)))
        rows = log_softmax(logits[mx.array(path)])
        if np.array_equal(np.array(greedy(rows)), np.append(tree.tokens[path[1:]], bonus)):
            return path, check_token(bonus, vocab_size), rows
        logprobs = log_softmax(logits)
        path, bonus = accept(tree, np.array(greedy(logprobs)))
        return path, check_token(bonus, vocab_size), logprobs[mx.array(path)]
    keys = keys or PositionKeys()
    samples = _NodeSamples(logits, tree, sampler, keys)
    path, bonus = accept(tree, samples)
    keys.commit(len(path))
    rows = mx.concatenate([samples.row(n) for n in path])
    mx.async_eval(rows)
    return path, check_token(bonus, vocab_size), rows
