"""Acceptance replayed on the target's own greedy answers, without running the target.

Greedy decoding is deterministic: given a prompt, the target commits exactly its greedy answer, and a
verification round rooted at position ``a`` accepts the longest path of the draft tree that spells
``answer[a+1], answer[a+2], ...``. A trainer that stored the answer together with the target's features at
every position (``train.answer_with_features``) therefore knows everything a round needs except the
drafter's tree. ``replay`` rebuilds the rounds one after another, as generation would run them:

    a = len(prompt)                    # the first root: the token the prefill sampled
    context = features[:a]             # the drafter has seen every committed position before the root
    loop: tree = draft(root = tokens[a]); k = accepted depth of tree against tokens[a+1:]
          context += features[a : a+k+1]; a += k + 1; τ_round = k + 1

so the mean τ it returns is the τ that greedy generation with the same drafting settings would measure on
that prompt (up to the rounding of the stored features), at the cost of the drafter's passes alone: the
held-out τ curve of a training run costs seconds, not the minutes of real decoding on a large target.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .drafting import Drafting
from .tree import DraftTree


def accepted_depth(tree: DraftTree, truth: np.ndarray) -> int:
    """How deep the walk from the root goes when every node's next token is ``truth[depth]``."""
    node, depth = 0, 0
    while depth < len(truth):
        children = np.flatnonzero((tree.parents == node) & (tree.tokens == truth[depth]))
        if not len(children):
            break
        node, depth = int(children[0]), depth + 1
    return depth


def _rows(features: np.ndarray, start: int, stop: int) -> mx.array:
    return mx.array(np.asarray(features[start:stop], dtype=np.float32))  # stored in float16, used as float32


def replay(drafting: Drafting, tokens: np.ndarray, prompt_len: int, features: np.ndarray,
           max_tokens: int | None = None) -> list[int]:
    """Per-round acceptance lengths of greedy generation on one stored answer.

    tokens (T,): prompt then the target's greedy answer; features (T, F): the captured target features of
    every position. ``max_tokens`` cuts the answer as generation's own limit would (the first answer token,
    which the prefill samples, counts as one). Returns τ of every verification round, the prefill's excluded."""
    end = len(tokens) if max_tokens is None else min(len(tokens), prompt_len + max_tokens)
    cache = drafting.make_cache()
    drafting.append_context(_rows(features, 0, prompt_len), cache)
    taus, a = [], prompt_len
    while a < end - 1:
        root = int(tokens[a])
        tree = drafting.finish(root, drafting.start(tokens[: a + 1], cache))
        k = accepted_depth(tree, tokens[a + 1 : end])
        taus.append(min(k + 1, end - 1 - a))  # the bonus token past the limit is never committed
        drafting.append_context(_rows(features, a, a + k + 1), cache)
        a += k + 1
    return taus
