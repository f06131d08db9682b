"""One drafting step: drafter pass → transition tables → draft tree (docs/algorithm.md, "AR head", "Tree").

All model work of a round's drafting is one MLX graph: ``start_draft`` builds it and starts its evaluation
before the caller emits the previous round's tokens (MLX lets only the tail of a long graph run on while
the caller goes on), and ``finish_draft`` takes the small tables across to numpy for the best-first search.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import NamedTuple, Sequence

import mlx.core as mx
import numpy as np

from . import _blas, autotune
from .drafter import ContextWindow, Drafter, context_window
from .sampling import log_softmax
from .target import Target
from .validation import check_tree_budget, finite, integer
from .lookup import Lookup
from .tree import DraftTree, best_first, chain, graft, root_only, walk

MODES = ("treeflash", "marginal", "chain", "ar")


DEFAULT_SINKS = 64  # context positions a drafter window always keeps (the first ones: attention sinks)
DEFAULT_LOOKUP_MATCH = 2  # last tokens a context copy must repeat (fewer: more copies, more of them wrong)


@dataclass
class DraftOptions:
    mode: str = "treeflash"
    tree_size: int = 64  # node budget, root included (with tree_size "auto": the largest a round may draft)
    top_m: int = 16  # candidate previous tokens per depth (head rows)
    top_k: int = 16  # branching: children kept per table row
    temperature: float = 1.0  # drafter temperature: shapes the tree's scores only, never the output
    head_vocab: int = 0  # >0: the head's distribution at depth d covers only the marginal top-K of depth d
    window: int = 0  # >0: the drafter sees only the first `sinks` and the last `window` context positions
    sinks: int = DEFAULT_SINKS
    lookup: int = 0  # >0: up to this many tokens copied from the context join the tree (lookup.py)
    lookup_match: int = DEFAULT_LOOKUP_MATCH  # the fewest last tokens an earlier occurrence must repeat


PUBLISHED_SETTINGS = {"tree_size": 64, "top_m": 16, "head_vocab": 0, "window": 0, "lookup": 0}
GPU_SETTINGS = {"tree_size": "auto", "top_m": 16, "head_vocab": 0, "window": 0, "lookup": 15}
CPU_SETTINGS = {"tree_size": "auto", "top_m": 8, "head_vocab": 64, "window": 1024, "lookup": 15}
AUTO = "auto"  # tree_size: each round's budget and copy length chosen as it runs (autotune.py)


def device_settings() -> dict[str, int | str]:
    """Defaults for the budget, top-m, head vocabulary, drafter window and copies. The budget is ``auto`` on
    every device: measured costs and acceptance choose each round's tree and copy length, down to a plain step
    (``AutoDrafting``). On a GPU the published head settings, the drafter seeing the whole context; on the CPU
    backend the fastest measured on the demo pair (docs/benchmarks.md), since there the head's exp over the vocabulary costs
    far more, and a 1024-position drafter window (with the sinks) bounds the drafter's cost on long prompts.
    Copies from the context are offered everywhere: auto drops them where they do not pay. They shape the tree
    only, never the output."""
    return dict(CPU_SETTINGS if mx.default_device() == mx.cpu else GPU_SETTINGS)


@dataclass
class DraftHead:
    """The target's output projection as drafting sees it (docs/checkpoints.md, "Sub-vocabulary").

    Without a sub-vocabulary the columns are the target's token ids and the target's own lm_head computes
    them. A drafter with a sub-vocabulary (FR-Spec's idea: the most frequent tokens of its training data)
    scores only those tokens: its rows of the target's head are gathered (dequantized if need be) once, so
    each round projects onto V' rows instead of the whole vocabulary. Columns are then draft ids, and
    ``to_target`` maps them back. It shapes the tree only: verification is the target's, so output is the same.
    """

    target: Target
    weight: mx.array | None  # (V', H) rows of the head; None: quantized whole head, use target.lm_head
    ids: mx.array | None = None  # (V',) target id of each column; None: the columns are the target ids

    @property
    def size(self) -> int:
        return self.target.vocab_size if self.ids is None else self.ids.shape[0]

    def logits(self, normed: mx.array) -> mx.array:
        if self.ids is None:
            return self.target.lm_head(normed)
        return normed @ self.weight.T

    def to_target(self, columns: mx.array) -> mx.array:
        return columns if self.ids is None else self.ids[columns]


def make_head(drafter: Drafter, target: Target) -> DraftHead:
    """The drafter's view of the target's head; built once per generation (the gather is not free)."""
    if "sub_vocab" not in drafter:
        return DraftHead(target, target.lm_head_weight())
    ids = drafter.sub_vocab
    head = target.head_module()
    if head.weight.shape[0] < target.vocab_size:  # a tensor-parallel Qwen3.5 splits its head by vocabulary
        raise ValueError(f"the target's output head holds {head.weight.shape[0]} of its {target.vocab_size} token "
                         "rows on this process (split over the ranks by vocabulary), so a drafter's sub-vocabulary "
                         "cannot be gathered from it; use a drafter that scores the whole vocabulary")
    if "scales" in head:
        biases = head["biases"][ids] if "biases" in head else None
        weight = mx.dequantize(head.weight[ids], head.scales[ids], biases, group_size=head.group_size,
                               bits=head.bits, mode=getattr(head, "mode", "affine"))
        weight = weight.astype(head.scales.dtype)
    else:
        weight = head.weight[ids]
    if "bias" in head:  # a head with a bias: fold it in as an extra input column of ones is not worth it here
        raise ValueError("drafters with a sub-vocabulary need a target head without bias")
    mx.eval(weight)
    return DraftHead(target, weight, ids)


def _top(values: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The k largest entries of each row, unsorted (sorted later in numpy, where it is cheap)."""
    idx = mx.argpartition(-values, kth=k - 1, axis=-1)[..., :k]
    return idx, mx.take_along_axis(values, idx, axis=-1)


def _sorted(idx: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-vals, axis=-1, kind="stable")
    return np.take_along_axis(idx, order, -1), np.take_along_axis(vals, order, -1)


def _log_softmax(logits: mx.array, temperature: float) -> mx.array:
    return log_softmax(logits.astype(mx.float32) / temperature)


def table_arrays(drafter: Drafter, target: Target, root: int, hidden: mx.array, opts: DraftOptions,
                 head: DraftHead | None = None) -> tuple:
    """The tables' MLX graph (nothing evaluated) from the block's pre-norm hidden states (B, H).

    Token ids in the result are the target's; inside, they are the head's columns (draft ids, with a draft
    vocabulary), mapped back at the end."""
    head = head or make_head(drafter, target)
    B = hidden.shape[0]
    k = min(opts.top_k, head.size)
    normed = drafter.model.norm(hidden)
    marginal = head.logits(normed[1:])  # depths 1..B-1
    if opts.mode == "marginal" or not drafter.has_head:
        idx, logp = _top(_log_softmax(marginal, opts.temperature), k)
        return head.to_target(idx), logp

    m = min(opts.top_m, head.size)
    K = opts.head_vocab if 0 < opts.head_vocab < head.size else 0
    # Candidate previous tokens: the marginal top-m at depths 1..B-2, row r = rank r. With a restricted head
    # vocabulary they are the first m of the (sorted) marginal top-K, found in the same selection.
    vocab, value = _top(marginal, max(K, m))
    vocab = mx.take_along_axis(vocab, mx.argsort(-value, axis=-1), axis=-1)
    cand = vocab[: B - 2, :m]
    # Head rows: depth 1 after the root, then depth j+1 after each of the first counts[j-1] candidates of depth j.
    counts = head_rows(B, m, opts.tree_size)
    depth = np.repeat(np.arange(B - 2), counts)
    rank = np.arange(len(depth)) - np.repeat(np.cumsum(counts) - counts, counts)
    prev = mx.concatenate([mx.array([root]), head.to_target(cand[mx.array(depth), mx.array(rank)])])
    rows = drafter.correct(hidden[mx.array(np.concatenate([[1], depth + 2]))], target.embed_tokens(prev))
    # Into the grid of 1 + (B-2)·m rows; rows past a depth's count stay empty and are never used.
    grid = mx.zeros((1 + (B - 2) * m, hidden.shape[-1]), dtype=rows.dtype)
    grid[mx.array(np.concatenate([[0], 1 + depth * m + rank]))] = rows
    normed = drafter.model.norm(grid)
    if not K:
        idx, logp = _top(_log_softmax(head.logits(normed), opts.temperature), k)
        return head.to_target(idx), logp, head.to_target(cand)
    # On CPUs the lm_head, exp and selection over the whole vocabulary for every row cost more than the head
    # itself: score each row only over its depth's marginal top-K (tree scores only; lossless).
    k = min(k, K)
    vocab = vocab[:, :K]
    row_vocab = mx.concatenate([vocab[:1], mx.repeat(vocab[1:], m, axis=0)], axis=0)
    if head.weight is None:  # quantized head: project fully, then keep the candidates
        logits = mx.take_along_axis(head.logits(normed), row_vocab, axis=-1)
    else:  # project onto the K candidate rows of the head only, depth by depth
        logits = normed[:1] @ head.weight[vocab[0]].T
        if B > 2:
            rest = normed[1:].reshape(B - 2, m, -1) @ head.weight[vocab[1:]].transpose(0, 2, 1)
            logits = mx.concatenate([logits, rest.reshape(-1, K)], axis=0)
    idx, logp = _top(_log_softmax(logits, opts.temperature), k)
    return head.to_target(mx.take_along_axis(row_vocab, idx, axis=-1)), logp, head.to_target(cand)


def tables(arrays: tuple, opts: DraftOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tables (tokens, logp, next_row), each (B-1, rows, k), from the evaluated ``table_arrays``."""
    idx, logp = _sorted(np.array(arrays[0]), np.array(arrays[1]))
    if len(arrays) == 2:  # marginal: one row per depth
        return idx[:, None], logp[:, None], np.zeros(idx[:, None].shape, dtype=np.int64)
    cand = np.array(arrays[2])  # (B-2, m)
    (D, m), k = cand.shape, idx.shape[-1]
    counts = head_rows(D + 2, m, opts.tree_size)
    tokens = np.concatenate([np.repeat(idx[:1, None], m, axis=1), idx[1:].reshape(D, m, k)], axis=0)
    logps = np.concatenate([np.repeat(logp[:1, None], m, axis=1), logp[1:].reshape(D, m, k)], axis=0)
    logps[1:][np.arange(m) >= counts[:, None]] = -np.inf  # the empty rows
    # next_row[d-1, r, c]: rank of tokens[d-1, r, c] among the depth-d candidates that have a row, else -1.
    cand = np.where(np.arange(m) < counts[:, None], cand, -1)
    next_row = np.full(tokens.shape, -1, dtype=np.int64)
    match = tokens[:D, :, :, None] == cand[:, None, None, :]
    next_row[:D] = np.where(match.any(-1), match.argmax(-1), -1)
    return tokens, logps, next_row


def transition_tables(
    drafter: Drafter, target: Target, root: int, hidden: mx.array, opts: DraftOptions, head: DraftHead | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tables (tokens, logp, next_row), each (B-1, rows, k), from the block's pre-norm hidden (B, H)."""
    return tables(table_arrays(drafter, target, root, hidden, opts, head), opts)


def head_rows(block_size: int, top_m: int, tree_size: int) -> np.ndarray:
    """Head rows computed per candidate depth j = 1..B-2. A tree of n nodes can give children to at most
    ⌊(n-j)/2⌋ nodes of depth j (each needs a child, and depth j needs j-1 ancestors and the root), so small
    budgets keep only that many top-ranked candidates. A heuristic: a lower-ranked candidate could have been
    one of them, so trees can change (never the output). The published budget (64, B=16) keeps all m."""
    return np.array([min(top_m, max(0, (tree_size - j) // 2)) for j in range(1, block_size - 1)], dtype=np.int64)


def untimed(stage: str, *arrays) -> None:
    """The default stage timer: no profiling, so no syncs between stages."""


def start_draft(drafter: Drafter, target: Target, root: int, cache, opts: DraftOptions, timer=untimed,
                head: DraftHead | None = None) -> tuple:
    """Build the drafting graph for a tree rooted at the last committed token and start evaluating it.

    The drafter cache holds the committed prefix. ``timer(stage, *arrays)`` closes each stage (see
    ``speculative.RoundStats``); ``head`` is ``make_head(drafter, target)``, made once per generation."""
    head = head or make_head(drafter, target)
    B = drafter.args.block_size
    block = mx.array([root] + [drafter.args.mask_token_id] * (B - 1))
    hidden = drafter(target.embed_tokens(block[None]), cache)[0]
    timer("drafter", hidden)
    if opts.mode == "chain":
        arrays = (head.to_target(mx.argmax(head.logits(drafter.model.norm(hidden[1:])), axis=-1)),)
    else:
        arrays = table_arrays(drafter, target, root, hidden, opts, head)
    mx.async_eval(arrays)
    timer("tables", *arrays)
    return arrays


def finish_draft(root: int, arrays: tuple, opts: DraftOptions, timer=untimed) -> DraftTree:
    """The tree from a started draft (waits for its evaluation)."""
    if opts.mode == "chain":
        tree = chain(root, np.array(arrays[0]))
    else:
        tree = best_first(root, *tables(arrays, opts), opts.tree_size)
    timer("tree")
    return tree



def default_mode(drafter: Drafter | None) -> str:
    if drafter is None:
        return "ar"
    return "treeflash" if drafter.has_head else "marginal"


class Drafting:
    """How a round's draft is made, behind one interface, so the round loop has no mode branches.

    ``start(history, cache)`` builds (and starts evaluating) the model work of a draft rooted at the last
    committed token, ``history[-1]`` (``history``: the prompt and every committed token); ``finish(root, pending)``
    turns it into the tree to verify. ``capture`` names the target layers whose
    outputs the drafter reads, and ``append_context`` hands it the features of newly committed positions.
    This base class is plain decoding (mode ``ar``): no drafter, the root alone, so a round's verification is
    one ordinary decoding step. Tests subclass it to inject oracle drafters."""

    mode = "ar"
    capture: list[int] = []

    def make_cache(self) -> list:
        return []

    def adopt(self, cache: list | None) -> list:
        """The drafter part of a prompt cache, made fit for this drafting (see ``DrafterDrafting``)."""
        return cache if cache is not None else self.make_cache()

    def append_context(self, features: mx.array, cache: list) -> None:
        """``features`` (n, F): the captured target features of n newly committed positions."""

    def start(self, history: Sequence[int], cache: list, timer=untimed):
        return None

    def finish(self, root: int, pending, timer=untimed) -> DraftTree:
        return root_only(root)

    def max_nodes(self) -> int:
        """The most nodes a tree of this drafting has (the root alone here)."""
        return 1

    def check_budget(self, context: int) -> None:
        """Refuse, before any work, a round that cannot fit in memory over ``context`` tokens (none here)."""

    def observe(self, tree: DraftTree, path: list[int]) -> None:
        """Called once a round's ``tree`` is verified, ``path`` its accepted nodes (the root first)."""

    def is_plain(self, pending) -> bool:
        """Whether the round ``start`` just began (``pending``) is a plain step: the root alone, nothing drafted
        or copied. Plain decoding: always."""
        return True

    def plain_ahead(self, history: Sequence[int]) -> bool:
        """Whether the round after the next one is a plain step, decided now, before the next round's token
        (the one after ``history``) is known. The loop then builds and starts it at once, as mlx-lm builds each
        step before it waits for the last one's token. Plain decoding: always."""
        return True

    def observe_plain(self, context: int, seconds: float | None = None, steps: int = 0) -> None:
        """Called for each plain step the loop ran ahead (``plain_ahead``), ``context`` the tokens before it.
        Every few steps, and at the last one of a run of them, ``seconds`` is their mean time over the last
        ``steps`` steps (``speculative.plain_steps``); otherwise None."""

    def end(self, cache: list) -> None:
        """Called when a generation ends (or its caller stops it): the drafter ``cache`` must then hold the
        context of every committed position, as a prompt cache left behind expects."""


class DrafterDrafting(Drafting):
    """Drafting with a block drafter: chain (DFlash), marginal tree (DDTree) or TreeFlash tree."""

    def __init__(self, drafter: Drafter, target: Target, opts: DraftOptions):
        self.drafter, self.target, self.opts = drafter, target, opts
        self.mode = opts.mode
        self.capture = list(drafter.args.target_layer_ids)
        self.head = make_head(drafter, target)  # the sub-vocabulary's rows are gathered once, not per round
        self.lookup = Lookup(opts.lookup, opts.lookup_match) if opts.lookup else None

    def make_cache(self) -> list:
        return self.drafter.make_cache(self.opts.window, self.opts.sinks)

    def adopt(self, cache: list | None) -> list:
        """A prompt cache's drafter part made fit for this drafting: kept when it has this context window, cut
        to the window when it holds the whole context (exact), else replaced by an empty one (whose context the
        prompt cache then prefills again)."""
        window = (self.opts.window, self.opts.sinks) if self.opts.window else (0, 0)
        if cache is None or len(cache) != len(self.drafter.model.layers):
            return self.make_cache()
        if all(context_window(c) == window for c in cache):
            return cache
        if window[0] and all(context_window(c) == (0, 0) for c in cache):
            return [ContextWindow.of_whole(c, self.opts.sinks, self.opts.window) for c in cache]
        return self.make_cache()

    def append_context(self, features: mx.array, cache: list) -> None:
        self.drafter.append_context(features[None], cache)

    def start(self, history: Sequence[int], cache: list, timer=untimed):
        """The drafter's graph, started, and the context's copy for the tree (empty when off or none)."""
        arrays = start_draft(self.drafter, self.target, int(history[-1]), cache, self.opts, timer, self.head)
        return arrays, self._copy(history)

    def _copy(self, history: Sequence[int]) -> np.ndarray:
        """The copy from the context after ``history`` (``lookup.Lookup``); empty when copies are off."""
        return self.lookup(history) if self.lookup else np.zeros(0, np.int64)

    def finish(self, root: int, pending, timer=untimed) -> DraftTree:
        """The drafted tree; a copy from the context replaces its lowest-scored nodes (``tree.graft``), and in
        chain mode the chain's deepest ones, so the budget (the chain's length there) holds."""
        arrays, copy = pending
        tree = finish_draft(root, arrays, self.opts, timer)
        if not len(copy):
            return tree
        return graft(tree, copy, len(tree) if self.opts.mode == "chain" else self.opts.tree_size)

    def is_plain(self, pending) -> bool:
        return False

    def plain_ahead(self, history: Sequence[int]) -> bool:
        return False

    def max_nodes(self) -> int:
        """A chain holds the root and block_size - 1 tokens; a tree (a copy grafted in included) tree_size nodes."""
        return self.drafter.args.block_size if self.opts.mode == "chain" else self.opts.tree_size

    def check_budget(self, context: int) -> None:
        o, t = self.opts, self.target
        check_tree_budget(o.tree_size, o.mode, self.drafter.args.block_size, o.top_m, o.top_k, context, t.vocab_size,
                          t.family.args.num_attention_heads, hidden_size=t.hidden_size, head_vocab=o.head_vocab)


class _Pending(NamedTuple):
    arrays: tuple | None  # None: a plain step, nothing drafted
    copy: np.ndarray
    opts: DraftOptions
    context: int
    seconds: float  # spent before the caller got the previous round's tokens


class AutoDrafting(DrafterDrafting):
    """``tree_size="auto"``: each round's budget and copy length chosen by an ``autotune.Tuner`` from the draft's
    scores and the rounds' own timings (docs/autotune.md); a round that cannot beat a plain step is one, drafting
    nothing. Timing adds no sync: drafting ends when its tables reach numpy, verification when its samples do.
    ``opts.tree_size`` is the largest budget a round may draft. It shapes trees only, never the output."""

    def __init__(self, drafter: Drafter, target: Target, opts: DraftOptions, knowledge: autotune.Knowledge,
                 cache_key: str | None = None):
        super().__init__(drafter, target, opts)
        self.tuner = autotune.Tuner(knowledge, opts.tree_size)
        self.cache_key = cache_key  # the cache file's entry for this pair on this machine; None: no file
        self._round: tuple | None = None
        self._defer = False  # the round just verified did not draft: its context features can wait
        self._decided: bool | None = None  # the next round's draft-or-not, decided early by ``plain_ahead``
        self._deferred: tuple[list, list[mx.array]] | None = None  # (drafter cache, features waiting for it)
        self._waiting = 0  # the positions those features hold
        self._last_end: float | None = None  # when the last round of this generation ended (``observe``)
        self._flushed = 0.0  # seconds this round spent appending what plain steps deferred: their cost, not its

    DEFER_LIMIT = 256  # positions whose features may wait; then they are appended anyway (bounded memory)

    def adopt(self, cache: list | None) -> list:
        self._deferred, self._defer, self._decided = None, False, None  # a new generation: what waited stays out
        self._last_end = None
        # (``PromptCache.fit``)
        return super().adopt(cache)

    def append_context(self, features: mx.array, cache: list) -> None:
        """After rounds without drafting, the drafter's context waits: their features are appended in one pass
        when a round drafts again, ``DEFER_LIMIT`` positions have waited or the generation ends (``end``), so that
        plain steps cost what a plain step costs."""
        if not self._defer:
            self._flush(cache)
            return super().append_context(features, cache)
        self._defer = False
        if self._deferred is None or self._deferred[0] is not cache:
            self._deferred, self._waiting = (cache, []), 0
        mx.async_eval(features)
        self._deferred[1].append(features)
        self._waiting += features.shape[0]
        if self._waiting >= self.DEFER_LIMIT:
            self._flush(cache)

    def end(self, cache: list) -> None:
        self._flush(cache)

    def _flush(self, cache: list) -> None:
        if self._deferred is not None and self._deferred[0] is cache and self._deferred[1]:
            super().append_context(mx.concatenate(self._deferred[1], axis=0), cache)
        self._deferred = None

    def start(self, history: Sequence[int], cache: list, timer=untimed) -> _Pending:
        copy = self._copy(history)
        decided, self._decided = self._decided, None
        if decided is None:
            decided = self.tuner.wants_draft(len(history), np.arange(1, len(copy) + 1))
        if not decided:
            return _Pending(None, copy, self.opts, len(history), 0.0)  # no drafter pass: the root, and the copy
        tic = time.perf_counter()
        if self._deferred is not None:  # what plain steps deferred is no cost of this round's: timed apart
            self._flush(cache)
            mx.eval([c.state for c in cache])
        self._flushed = time.perf_counter() - tic
        tic += self._flushed
        opts = replace(self.opts, tree_size=self.tuner.draft_size())
        arrays = start_draft(self.drafter, self.target, int(history[-1]), cache, opts, timer, self.head)
        return _Pending(arrays, copy, opts, len(history), time.perf_counter() - tic)

    def is_plain(self, pending: _Pending) -> bool:
        """Nothing drafted, and no copy, or one the tuner would not verify (its best round without drafting is
        the root alone)."""
        return pending.arrays is None and (not len(pending.copy) or self._root_alone())

    def _root_alone(self) -> bool:
        return self.tuner.alone is not None and self.tuner.alone.size == 1

    def plain_ahead(self, history: Sequence[int]) -> bool:
        """The tuner's draft-or-not for the round after the next, from ``history`` (one token short of that
        round's own): a plain step where it would not draft nor verify a copy from the context. Otherwise the
        decision is kept for that round's ``start``, so that the tuner's backoff counts each round once."""
        copy = self._copy(history)
        self._decided = self.tuner.wants_draft(len(history) + 1, np.arange(1, len(copy) + 1))
        if self._decided or (len(copy) and not self._root_alone()):
            return False
        self._decided = None
        return True

    def observe_plain(self, context: int, seconds: float | None = None, steps: int = 0) -> None:
        self._defer = True  # its context features wait for the next drafted round (``append_context``)
        if steps:
            self.tuner.observe(1, False, 1, context, 0.0, seconds, rounds=steps)
            self._last_end = time.perf_counter()
            self._save()

    def _save(self) -> None:
        """Write what was learnt to the cache file, when it is due (``Tuner.wants_saving``)."""
        if self.cache_key is not None and self.tuner.wants_saving():
            autotune.write_cache(autotune.cache_path(), self.cache_key, self.tuner.knowledge)

    def finish(self, root: int, pending: _Pending, timer=untimed) -> DraftTree:
        tic = time.perf_counter()
        self._defer = pending.arrays is None
        if pending.arrays is None:
            tree, draft_seconds = root_only(root), None
            tree.scores = np.zeros(1)
        else:
            tree = finish_draft(root, pending.arrays, pending.opts, timer)
        copy = pending.copy
        matched = walk(tree, copy)[1] if len(copy) else 0
        if pending.arrays is not None:
            draft_seconds = pending.seconds + time.perf_counter() - tic
        plan = self.tuner.choose(tree.scores[1:], tree.depths[1:], np.arange(matched + 1, len(copy) + 1),
                                 pending.context, draft_seconds)
        out = graft(tree, copy[: matched + plan.copied], plan.size) if plan.copied else tree.first(plan.size)
        kept = len(out) - out.copied  # the tree's first nodes, as drafted
        self._round = (pending.context, draft_seconds, (tree.scores[1:kept], tree.depths[1:kept]), time.perf_counter())
        return out

    def observe(self, tree: DraftTree, path: list[int]) -> None:
        context, draft_seconds, scored, tic = self._round
        now = time.perf_counter()
        verify_seconds = now - tic
        # The round's host work: all the time since the last round ended (the caller's handling of that round's
        # tokens, this round's lookup, search and plan, its commit) but its drafting, its verification and the
        # context that plain steps left for its drafter (their cost, not its)
        host = float("nan") if self._last_end is None else \
            now - self._last_end - (draft_seconds or 0.0) - verify_seconds - self._flushed
        self._last_end, self._flushed = now, 0.0
        if len(tree) == 1 and draft_seconds is None:  # a plain step that the loop could not run ahead (logits
            verify_seconds, host = verify_seconds + host, float("nan")  # processors, a sharded target): all of it
        elif len(tree) == 1:  # the root alone after a tree round's work: not what a plain step costs
            verify_seconds = float("nan")  # (``Tuner``: size 1 is priced by plain steps only)
        accepted = None
        if len(tree) - tree.copied == len(scored[0]) + 1:  # (not cut by a K/V quantization switch)
            on_path = np.zeros(len(tree), dtype=bool)
            on_path[path] = True
            kept = len(tree) - tree.copied
            accepted = (*scored, on_path[1:kept], tree.depths[kept:], on_path[kept:])
        drafted = draft_seconds is not None
        self.tuner.observe(len(tree), drafted, len(path), context, draft_seconds or 0.0, verify_seconds, accepted,
                           host, tree.copied)
        self._save()

    def check_budget(self, context: int) -> None:
        """The largest budget that fits becomes the most a round may draft; refused only when none does."""
        o, t = self.opts, self.target
        error = None
        for size in sorted({n for n in autotune.CANDIDATES if n <= o.tree_size} | {o.tree_size}, reverse=True):
            try:
                check_tree_budget(size, o.mode, self.drafter.args.block_size, o.top_m, o.top_k, context,
                                  t.vocab_size, t.family.args.num_attention_heads, hidden_size=t.hidden_size,
                                  head_vocab=o.head_vocab)
            except ValueError as err:
                error = error or err
                continue
            self.tuner.limit(size)
            return
        raise error


def auto_drafting(drafter: Drafter, target: Target, opts: DraftOptions) -> AutoDrafting:
    """An ``AutoDrafting`` that goes on from what this process (or, for models loaded from disk, the cache file)
    has learnt of this pair and settings on this machine."""
    o = opts
    setup = f"{o.mode} m{o.top_m} k{o.top_k} t{o.temperature} v{o.head_vocab} w{o.window}/{o.sinks} l{o.lookup}/{o.lookup_match}"
    paths = getattr(target.model, "model_path", None), getattr(drafter, "path", None)
    if None in paths:  # built in memory: known to this process only
        return AutoDrafting(drafter, target, opts, autotune.knowledge_for(f"{id(target.model)} {id(drafter)} {setup}", None))
    device = str(mx.default_device())
    if mx.default_device() != mx.cpu and hasattr(mx, "metal"):
        device += " " + str(mx.metal.device_info().get("device_name", ""))
    else:  # the CPU's costs are the BLAS's: a process left with the reference one must not teach the next ones
        device += " " + os.path.basename(_blas.active_blas or "reference BLAS")
    model, drafter_path = (os.path.realpath(p) for p in paths)  # one key whatever the directory it is run from
    key = f"{model} | {drafter_path} | {setup} | {autotune.machine(device)}"
    return AutoDrafting(drafter, target, opts, autotune.knowledge_for(key, autotune.cache_path()), key)


def make_drafting(
    drafter: Drafter | None,
    target: Target,
    mode: str | None = None,
    tree_size: int | None = None,
    draft_top_m: int | None = None,
    draft_top_k: int | None = None,
    draft_temp: float | None = None,
    draft_vocab: int | None = None,
    draft_window: int | None = None,
    draft_sinks: int | None = None,
    draft_lookup: int | None = None,
    draft_lookup_match: int | None = None,
) -> Drafting:
    """The drafting of ``mode`` (default: ``default_mode(drafter)``) with its settings checked. Settings left at
    None take ``device_settings()`` (tree size, top-m, head vocabulary, window, lookup) or the published values.
    ``tree_size="auto"`` (the default): each round's budget is chosen as it runs (``AutoDrafting``)."""
    mode = mode or default_mode(drafter)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    given = {"tree_size": tree_size, "top_m": draft_top_m, "head_vocab": draft_vocab, "window": draft_window,
             "lookup": draft_lookup}
    settings = device_settings() | {k: v for k, v in given.items() if v is not None}
    if isinstance(settings["tree_size"], str) and settings["tree_size"] != AUTO:
        raise ValueError(f"tree_size must be a node count or 'auto', got {settings['tree_size']!r}")
    auto = settings["tree_size"] == AUTO
    if auto:
        settings["tree_size"] = max(autotune.CANDIDATES)
    opts = DraftOptions(mode, top_k=16 if draft_top_k is None else draft_top_k,
                        temperature=1.0 if draft_temp is None else draft_temp,
                        sinks=DEFAULT_SINKS if draft_sinks is None else draft_sinks,
                        lookup_match=DEFAULT_LOOKUP_MATCH if draft_lookup_match is None else draft_lookup_match,
                        **settings)
    for name, value in (("tree_size", opts.tree_size), ("draft_top_m", opts.top_m), ("draft_top_k", opts.top_k)):
        integer(name, value, low=1)
    integer("draft_vocab (0: the whole vocabulary)", opts.head_vocab, low=0)
    integer("draft_window (0: the whole context)", opts.window, low=0)
    integer("draft_sinks", opts.sinks, low=0)
    integer("draft_lookup (0: no copies from the context)", opts.lookup, low=0)
    integer("draft_lookup_match", opts.lookup_match, low=1)
    finite("draft_temp", opts.temperature, low=0, low_open=True)
    if mode == "ar":
        return Drafting()
    if drafter is None:
        raise ValueError(f"mode '{mode}' needs a drafter; pass one or use mode 'ar'")
    if mode == "treeflash" and not drafter.has_head:
        raise ValueError("mode 'treeflash' needs a drafter with an AR-approximation head; use 'marginal' or 'chain'")
    if auto and mode != "chain":  # a chain is the drafter's block: no budget to choose
        return auto_drafting(drafter, target, opts)
    return DrafterDrafting(drafter, target, opts)
