"""Best-first draft trees (docs/algorithm.md, "Tree") against hand-worked examples and a brute-force search."""

from __future__ import annotations

import numpy as np

from treeflash_mlx.tree import best_first, chain, root_only

L = np.log


def test_marginal_tree_by_hand():
    tokens = np.array([[[10, 11]], [[20, 21]], [[30, 31]]])
    logp = L(np.array([[[0.6, 0.4]], [[0.7, 0.3]], [[0.9, 0.1]]]))
    tree = best_first(99, tokens, logp, np.zeros_like(tokens), tree_size=5)
    # pops: 10 (.6), 10-20 (.42), 11 (.4), 10-20-30 (.378)
    assert tree.tokens.tolist() == [99, 10, 20, 11, 30]
    assert tree.parents.tolist() == [-1, 0, 1, 0, 2]
    assert tree.depths.tolist() == [0, 1, 2, 1, 3]


def test_transition_rows_and_leaves_by_hand():
    tokens = np.array([[[10, 11], [10, 11]], [[20, 21], [22, 23]]])
    logp = L(np.array([[[0.6, 0.4], [0.6, 0.4]], [[0.5, 0.5], [0.9, 0.1]]]))
    next_row = np.array([[[1, -1], [1, -1]], [[-1, -1], [-1, -1]]])
    tree = best_first(7, tokens, logp, next_row, tree_size=10)
    # 10 continues in row 1 of depth 2 (22, 23); 11 is not among the depth-1 candidates: a leaf.
    assert tree.tokens.tolist() == [7, 10, 22, 11, 23]
    assert tree.parents.tolist() == [-1, 0, 1, 0, 1]
    assert tree.depths.tolist() == [0, 1, 2, 1, 2]


def test_budget_counts_the_root():
    tokens = np.array([[[1, 2, 3]], [[4, 5, 6]]])
    logp = L(np.full((2, 1, 3), 1 / 3))
    assert len(best_first(0, tokens, logp, np.zeros_like(tokens), tree_size=4)) == 4
    assert len(best_first(0, tokens, logp, np.zeros_like(tokens), tree_size=1)) == 1
    assert len(best_first(0, tokens, logp, np.zeros_like(tokens), tree_size=100)) == 1 + 3 + 9


def random_tables(rng, depths=4, rows=3, k=3):
    logits = rng.normal(size=(depths, rows, k)) * 2
    logp = np.sort(logits - np.log(np.exp(logits).sum(-1, keepdims=True)), axis=-1)[..., ::-1]
    tokens = np.stack([rng.permutation(50)[: rows * k].reshape(rows, k) for _ in range(depths)])
    next_row = rng.integers(-1, rows, size=(depths, rows, k))
    return tokens, logp.copy(), next_row


def all_paths(tokens, logp, next_row):
    """Every node reachable from the root: (rank path, score)."""
    out, frontier = [], [((), 0.0, 0)]
    for depth in range(tokens.shape[0]):
        nxt = []
        for ranks, score, row in frontier:
            if row == -1:
                continue
            for c in range(tokens.shape[2]):
                item = (ranks + (c,), score + logp[depth, row, c], next_row[depth, row, c])
                out.append(item[:2])
                nxt.append(item)
        frontier = nxt
    return out


def test_best_first_is_the_top_n_paths_and_parents_come_first():
    rng = np.random.default_rng(0)
    for _ in range(50):
        tokens, logp, next_row = random_tables(rng)
        budget = int(rng.integers(2, 30))
        tree = best_first(0, tokens, logp, next_row, budget)
        assert all(tree.parents[i] < i for i in range(1, len(tree)))
        assert all(tree.depths[i] == tree.depths[tree.parents[i]] + 1 for i in range(1, len(tree)))
        best = sorted(all_paths(tokens, logp, next_row), key=lambda p: -p[1])[: budget - 1]
        # Compare node sets as token paths: the tree's nodes are exactly the best-scoring reachable paths.
        want = set()
        for ranks, _ in best:
            row, toks = 0, []
            for d, c in enumerate(ranks):
                toks.append(int(tokens[d, row, c]))
                row = next_row[d, row, c]
            want.add(tuple(toks))
        got = {tuple(int(tree.tokens[j]) for j in tree.path(i)) for i in range(1, len(tree))}
        assert got == want


def test_siblings_carry_distinct_tokens():
    rng = np.random.default_rng(1)
    tokens, logp, next_row = random_tables(rng)
    tree = best_first(0, tokens, logp, next_row, 40)
    pairs = list(zip(tree.parents[1:], tree.tokens[1:]))
    assert len(pairs) == len(set(pairs))


def test_chain_and_root_only():
    tree = chain(5, np.array([8, 9, 10]))
    assert tree.tokens.tolist() == [5, 8, 9, 10]
    assert tree.parents.tolist() == [-1, 0, 1, 2] and tree.depths.tolist() == [0, 1, 2, 3]
    assert tree.ancestor_mask().tolist() == np.tril(np.ones((4, 4), bool)).tolist()
    assert root_only(3).tokens.tolist() == [3] and len(root_only(3)) == 1


def test_ancestor_mask_and_paths():
    tokens = np.array([[[10, 11]], [[20, 21]], [[30, 31]]])
    logp = L(np.array([[[0.6, 0.4]], [[0.7, 0.3]], [[0.9, 0.1]]]))
    tree = best_first(99, tokens, logp, np.zeros_like(tokens), tree_size=5)
    mask = tree.ancestor_mask()
    assert mask[4].tolist() == [True, True, True, False, True]  # 30 sees root, 10, 20, itself
    assert mask[3].tolist() == [True, False, False, True, False]  # 11 sees root and itself
    assert tree.path(4) == [1, 2, 4] and tree.path(0) == []


def test_empty_or_impossible_tables_give_the_root_alone():
    tokens = np.array([[[1, 2]]])
    assert len(best_first(0, tokens, np.full((1, 1, 2), -np.inf), np.zeros_like(tokens), 8)) == 1
    assert len(best_first(0, np.zeros((0, 1, 2), int), np.zeros((0, 1, 2)), np.zeros((0, 1, 2), int), 8)) == 1


def test_is_chain():
    assert chain(1, np.array([2, 3])).is_chain and root_only(4).is_chain
    tokens = np.array([[[10, 11]], [[20, 21]]])
    tree = best_first(0, tokens, L(np.full((2, 1, 2), 0.5)), np.zeros_like(tokens), 4)
    assert not tree.is_chain
