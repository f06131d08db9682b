"""Draft trees from transition tables (docs/algorithm.md, "Tree"), and a copied path grafted into one ("Copying
from the context"): plain numpy in, plain numpy out.

Tables, for depths d = 1..B-1 (index d-1) and candidate rows r:
  ``tokens[d-1, r, c]``   the c-th most likely token at depth d when the depth-(d-1) token is candidate r,
  ``logp[d-1, r, c]``     its log-probability,
  ``next_row[d-1, r, c]`` the row at depth d+1 that continues from that token, -1 when there is none.
Marginal drafting is the special case of one row per depth and ``next_row = 0``.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np


@dataclass
class DraftTree:
    """Node 0 is the root; parents precede children; ``depths[0] == 0``, ``parents[0] == -1``."""

    tokens: np.ndarray
    parents: np.ndarray
    depths: np.ndarray
    copied: int = 0  # the last nodes, added by a copy from the context (``graft``)
    scores: np.ndarray | None = None  # best-first trees: each node's path log-probability under the drafter

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def is_chain(self) -> bool:
        """One path: verification can then run causally with contiguous positions (the fast path)."""
        return bool(np.array_equal(self.parents, np.arange(len(self)) - 1))

    def ancestor_mask(self) -> np.ndarray:
        """(n, n) bool: node i sees exactly its ancestors and itself."""
        n = len(self)
        mask = np.zeros((n, n), dtype=bool)
        for i in range(n):
            if self.parents[i] >= 0:
                mask[i] = mask[self.parents[i]]
            mask[i, i] = True
        return mask

    def up_to_depth(self, depth: int) -> "DraftTree":
        """The nodes at most ``depth`` deep (parents come first, so it stays a tree; depth 0: the root alone)."""
        keep = np.flatnonzero(self.depths <= max(depth, 0))
        if len(keep) == len(self):
            return self
        renumber = np.full(len(self), -1)
        renumber[keep] = np.arange(len(keep))
        parents = np.where(self.parents[keep] >= 0, renumber[self.parents[keep]], -1)
        return DraftTree(self.tokens[keep], parents, self.depths[keep])

    def first(self, n: int) -> "DraftTree":
        """The first ``n`` nodes (parents precede children, so a tree; best-first trees: the n best)."""
        if n >= len(self):
            return self
        scores = None if self.scores is None else self.scores[:n]
        return DraftTree(self.tokens[:n], self.parents[:n], self.depths[:n], scores=scores)

    def path(self, node: int) -> list[int]:
        """Node indices from the root's first child down to ``node`` (empty for the root)."""
        out = []
        while node > 0:
            out.append(node)
            node = int(self.parents[node])
        return out[::-1]


def root_only(root: int) -> DraftTree:
    """The empty draft: verification is then one plain decoding step."""
    return DraftTree(np.array([root]), np.array([-1]), np.array([0]))


def chain(root: int, tokens: np.ndarray) -> DraftTree:
    """DFlash: one path, the depth-wise argmax tokens."""
    n = len(tokens) + 1
    return DraftTree(np.concatenate([[root], tokens]).astype(np.int64), np.arange(n) - 1, np.arange(n))


def best_first(
    root: int, tokens: np.ndarray, logp: np.ndarray, next_row: np.ndarray, tree_size: int
) -> DraftTree:
    """Grow the ``tree_size`` nodes (root included) of highest cumulative log-probability.

    A popped node pushes its next sibling and its first child, so the heap never holds more than two
    entries per emitted node. Ties break on the rank path, as in the published implementation.
    """
    depth_count, _, k = tokens.shape
    out_tokens, parents, depths, scores = [root], [-1], [0], [0.0]
    heap: list[tuple[float, tuple[int, ...], int, int, int, int]] = []
    if tree_size > 1 and depth_count > 0 and np.isfinite(logp[0, 0, 0]):
        # (-score, rank path, parent node, depth, table row, rank)
        heap.append((-float(logp[0, 0, 0]), (0,), 0, 1, 0, 0))
    while heap and len(out_tokens) < tree_size:
        neg, ranks, parent, depth, row, rank = heapq.heappop(heap)
        node = len(out_tokens)
        out_tokens.append(int(tokens[depth - 1, row, rank]))
        parents.append(parent)
        depths.append(depth)
        scores.append(-neg)
        parent_score = -neg - float(logp[depth - 1, row, rank])
        if rank + 1 < k:
            score = parent_score + float(logp[depth - 1, row, rank + 1])
            if np.isfinite(score):
                heapq.heappush(heap, (-score, ranks[:-1] + (rank + 1,), parent, depth, row, rank + 1))
        child_row = int(next_row[depth - 1, row, rank])
        if depth < depth_count and child_row != -1:
            score = -neg + float(logp[depth, child_row, 0])
            if np.isfinite(score):
                heapq.heappush(heap, (-score, ranks + (0,), node, depth + 1, child_row, 0))
    return DraftTree(np.array(out_tokens, dtype=np.int64), np.array(parents), np.array(depths),
                     scores=np.array(scores))


def walk(tree: DraftTree, tokens: np.ndarray) -> tuple[int, int]:
    """(node, depth): how far ``tokens`` can be followed down from the root along existing nodes."""
    node = 0
    for depth, token in enumerate(tokens):
        child = np.flatnonzero((tree.parents == node) & (tree.tokens == token))
        if not len(child):
            return node, depth
        node = int(child[0])
    return node, len(tokens)


def graft(tree: DraftTree, tokens: np.ndarray, tree_size: int) -> DraftTree:
    """``tree`` with the path ``tokens`` below its root, ``tree_size`` nodes at most.

    The path shares the nodes it already follows; its new nodes replace the tree's last ones (a best-first
    tree's lowest scored). With L = len(tokens): cut to n nodes, the tree follows the path m(n) deep, m growing
    with n. From n = tree_size - L, keeping n' = tree_size - (L - m(n)) ≥ n nodes instead still fits, since
    n' + L - m(n') ≤ n' + L - m(n) = tree_size; repeated until n stops growing (at most L times)."""
    tokens = np.asarray(tokens, dtype=np.int64)[: max(tree_size - 1, 0)]
    if not len(tokens):
        return tree.first(tree_size)
    n, (node, matched) = tree_size - len(tokens), walk(tree.first(tree_size - len(tokens)), tokens)
    while (grown := min(len(tree), tree_size - (len(tokens) - matched))) > n:
        n, (node, matched) = grown, walk(tree.first(grown), tokens)
    tree = tree.first(n)
    new = len(tokens) - matched
    parents = np.concatenate([tree.parents, [node], len(tree) + np.arange(new - 1)]) if new else tree.parents
    depths = np.concatenate([tree.depths, tree.depths[node] + 1 + np.arange(new)])
    return DraftTree(np.concatenate([tree.tokens, tokens[matched:]]), parents, depths, new)
