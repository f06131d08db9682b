"""``--tree-size auto``: each round's tree chosen for the most expected tokens per second (docs/autotune.md).

Plain numpy, no MLX: the loop hands in seconds, scores and accepted paths, and gets back a budget.

    rate(n, k) = E[τ(n, k)] / (D + V(n, ctx) + H)

- ``V(n, ctx)``  seconds to verify n nodes (root included) after ctx tokens of context: ``CostModel``, fitted to
  the rounds' own timings (n = 1 is one plain decoding step);
- ``D(s)``       seconds of drafting a round for trees of up to s nodes (the head rows it computes grow with s),
                also timed (a plain step drafts nothing: D = 0);
- ``H``          a tree round's host work besides drafting and verifying (the lookup, search and plan, the
  commit, the caller's handling of its tokens), timed too; a plain step's is inside V(1);
- ``E[τ(n, k)]`` expected tokens committed by verifying the first n - k nodes of the best-first tree plus k
  nodes copied from the context: one (the bonus token) plus the sum, over the kept nodes, of the probability
  that the node is on the accepted path (a sum of indicators: at most one node per depth is accepted, and the
  expected number of accepted nodes is the sum of each node's probability). ``Acceptance`` gives each node's
  probability from its draft path probability and depth, calibrated on the acceptance observed.

The round with the best rate is chosen; a round drafts at all only while drafted rounds are expected to deliver
more tokens per second than the round would without drafting (``Tuner.wants_draft``). The choice shapes the tree
only: output is unchanged.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # budgets (root included) a round may choose
PROBES = (4, 16, 64)  # verified once each early on, where no cost is known yet (the root alone: a plain step)
# While drafting loses, a drafted round now and then looks whether it pays again. The gap between two looks
# doubles up to a cap: at least MIN_LOOK_GAP rounds, more where a look costs many rounds without drafting (a tiny
# target, a slow drafter), so that the looks take at most LOOK_SHARE of the time; never more than MAX_BACKOFF.
MIN_LOOK_GAP = 32
MAX_BACKOFF = 512
LOOK_SHARE = 0.02
COPY_LOOK_SHARE = LOOK_SHARE / 2  # the same for the copies verified while copies lose (``Tuner._copy_look``):
# together the looks take at most 3% of the time
FAR_BEHIND = 0.5  # drafting at under this share of the undrafted rate: the gap goes straight to its cap (an
# untrained drafter, text far from the drafter's training), rather than doubling from one round


class CostModel:
    """Seconds to verify n nodes after ctx tokens: ``V(n, ctx) = c_n + (β + α·n)·ctx``.

    One intercept ``c_n`` per measured size (machines are not smooth in n: a BLAS kernel may make 12 rows dearer
    than 16) and an attention term linear in the context, shared by all sizes, each query row reading every
    cached key. Fitted by weighted least squares over the last ``per_size`` observations of each size, each
    weighing ``decay`` less for every later observation (of any size), so that costs that drift (a loaded machine,
    a cache grown cold) are followed, while sizes chosen rarely keep what they last measured. Sizes never measured
    are interpolated linearly in n between measured neighbours, except that a tree smaller than the smallest one
    measured costs what that one does (not a share of a plain step's cost: a tree round's host work, and a matrix
    product of a few rows, cost about as much). The root alone (n = 1) is never dearer than a tree."""

    CTX_UNIT = 1024.0  # context in units of 1024 tokens keeps the normal equations well scaled
    MIN_SPREAD = 64.0  # tokens of context spread (within sizes) before the slopes are fitted

    def __init__(self, per_size: int = 32, decay: float = 0.99):
        self.per_size = per_size
        self.by_size: dict[int, deque[tuple[int, float, float]]] = {}  # size → (index, ctx, seconds), oldest first
        self.added = 0  # observations ever added: each one's index, for its age
        self.decay = decay
        self._fit: tuple[np.ndarray, np.ndarray, float, float] | None = None
        self._unfitted = 0  # observations added since the last fit
        self._measured: tuple[tuple, dict[int, float]] | None = None  # (the fit, its c_n by size): ``cost``'s

    OUTLIER = 2.0  # a time beyond this multiple of the prediction counts as that multiple (a stall, not a cost)
    REFIT = 8  # observations between two fits once a size has a few, or an eighth of those kept if more: a fit
    # per round would cost more host time than a plain step of a small target leaves free

    def add(self, n: int, ctx: int, seconds: float) -> None:
        if not (math.isfinite(seconds) and seconds > 0):
            return
        if self.count(n) >= 3:
            seconds = min(seconds, self.OUTLIER * self.cost(n, ctx))
        self.by_size.setdefault(int(n), deque(maxlen=self.per_size)).append((self.added, float(ctx), float(seconds)))
        self.added += 1
        self._unfitted += 1
        if self.count(n) <= 3 or self._unfitted >= max(self.REFIT, self.added_kept // 8):
            self._fit = None

    def count(self, n: int) -> int:
        return len(self.by_size.get(n, ()))

    @property
    def added_kept(self) -> int:
        """Observations kept, all sizes."""
        return sum(len(q) for q in self.by_size.values())

    @property
    def sizes(self) -> list[int]:
        return sorted(self.by_size)

    @property
    def observations(self) -> list[tuple[int, float, float]]:
        """(n, ctx, seconds) of every observation kept, oldest first."""
        rows = sorted((i, n, ctx, s) for n, q in self.by_size.items() for i, ctx, s in q)
        return [(n, ctx, s) for _, n, ctx, s in rows]

    def fit(self) -> tuple[np.ndarray, np.ndarray, float, float]:
        """(sizes, intercepts c_n, β, α): seconds, and seconds per 1024 context tokens (α: per node too).

        The slopes are fitted only once the contexts seen at each size spread over ``MIN_SPREAD`` tokens (they
        are told apart from the intercepts only by that spread, and noise would otherwise make them up); until
        then, and if the fit is not physical (a negative cost), each size's cost is its weighted mean."""
        if self._fit is None:
            self._unfitted = 0
            rows = np.array([(n, i, ctx, y) for n, q in self.by_size.items() for i, ctx, y in q], dtype=np.float64)
            sizes = np.array(self.sizes)
            n, age, ctx, y = rows[:, 0], self.added - 1 - rows[:, 1], rows[:, 2] / self.CTX_UNIT, rows[:, 3]
            onehot = (n[:, None] == sizes[None]).astype(np.float64)
            w = self.decay ** np.minimum(age, 1000)  # (a size unused for 1000 rounds keeps a weight all the same)
            per_size = (onehot * w[:, None]).sum(0)
            means = (onehot * (w * y)[:, None]).sum(0) / per_size
            self._fit = (sizes, means, 0.0, 0.0)
            centred = ctx - onehot @ ((onehot * (w * ctx)[:, None]).sum(0) / per_size)
            if np.sqrt(np.sum(w * centred**2) / np.sum(w)) * self.CTX_UNIT >= self.MIN_SPREAD:
                X = np.concatenate([onehot, ctx[:, None], (n * ctx)[:, None]], 1)
                coef = np.linalg.lstsq(X * np.sqrt(w)[:, None], y * np.sqrt(w), rcond=None)[0]
                beta, alpha = max(coef[-2], 0.0), max(coef[-1], 0.0)  # attention never makes a round cheaper
                c = means - (beta + alpha * sizes) * (onehot.T @ (w * ctx)) / per_size
                if np.all(c > 0):
                    self._fit = (sizes, c, beta, alpha)
            sizes, c, beta, alpha = self._fit
            if sizes[0] == 1 and len(sizes) > 1:  # the root alone is part of every tree's work: never dearer
                c = c.copy()  # (a lone stalled timing of it would otherwise rule plain steps out, and with them
                c[0] = min(c[0], c[1:].min())  # the very timings that would correct it)
                self._fit = (sizes, c, beta, alpha)
        return self._fit

    def predict(self, n, ctx: float) -> np.ndarray:
        """V(n, ctx) for an array of sizes; needs at least one observation."""
        sizes, c, beta, alpha = self.fit()
        n = np.asarray(n, dtype=np.float64)
        if len(sizes) == 1:  # one size known: cost grows no faster than the node count
            base = c[0] * np.maximum(1.0, n / sizes[0]) ** 0.5
        else:
            base = np.interp(n, sizes, c)
            if sizes[0] == 1:  # below the smallest tree measured: what it costs (a tree round's host work, and a
                base = np.where((n > 1) & (n < sizes[1]), c[1], base)  # product of a few rows, cost about as much)
            above = n > sizes[-1]  # beyond the largest: the last measured slope per node
            slope = max((c[-1] - c[-2]) / (sizes[-1] - sizes[-2]), 0.0)
            base = np.where(above, c[-1] + slope * (n - sizes[-1]), base)
        return np.maximum(base + (beta + alpha * n) * ctx / self.CTX_UNIT, 1e-9)

    def cost(self, n: int, ctx: float) -> float:
        """``predict`` for one size, in plain floats where the size was measured: every plain step asks for V(1)
        and adds its own time, and on a small target numpy's overhead per call is a share of the step."""
        fit = self.fit()
        if self._measured is None or self._measured[0] is not fit:
            self._measured = (fit, dict(zip(fit[0].tolist(), fit[1].tolist())))
        c = self._measured[1].get(n)
        if c is None:
            return float(self.predict([n], ctx)[0])
        return max(c + (fit[2] + fit[3] * n) * ctx / self.CTX_UNIT, 1e-9)

    def state(self, per_size: int = 8) -> list[list[float]]:
        """The latest ``per_size`` observations of each size, oldest first: what a cache file keeps."""
        keep = {(n, i) for n, q in self.by_size.items() for i, _, _ in list(q)[-per_size:]}
        rows = sorted((i, n, ctx, s) for n, q in self.by_size.items() for i, ctx, s in q if (n, i) in keep)
        return [[n, ctx, s] for _, n, ctx, s in rows]


class Acceptance:
    """P(a node is on the accepted path), from its draft path probability p and its depth.

    A drafter's scores are not acceptance probabilities: calibrated online, per depth and per bin of log p, as
    the observed rate of acceptance of the verified nodes of that bin, shrunk, while the bin has seen few nodes,
    towards p scaled by how its depth's nodes fared against their scores (itself shrunk towards all depths'):

        g   = (Σ accepted + W) / (Σ p + W)                    all verified nodes
        f_d = (Σ_d accepted + W·g) / (Σ_d p + W)              the nodes of depth d
        q   = (accepted_db + w·f_d·p) / (seen_db + w)         the nodes of depth d in p's bin b

    so that a drafter whose scores mean little (an untrained one) is found out after a round or two, long before
    each of its bins has been seen. Copies from the context have no score: a copied node's probability is the rate
    observed at its position along the copy, shrunk towards ``COPY_PRIOR`` (``copy_prob``)."""

    EDGES = np.array([-8.0, -6.0, -5.0, -4.0, -3.0, -2.5, -2.0, -1.5, -1.0, -0.75, -0.5, -0.25, -0.1])  # log p
    PRIOR = 2.0  # w: pseudo-nodes of the depth-scaled p in every bin
    MASS = 1.0  # W: pseudo-acceptances behind the depth and overall factors
    COPY_PRIOR = (0.5, 1.0)  # (rate, pseudo-nodes) of a copy's first position never seen
    COPY_CARRY = 0.9  # a later position's prior: this share of the position before it

    def __init__(self, depths: int = 64, copy_length: int = 64, decay: float = 0.998):
        self.seen = np.zeros((depths + 1, len(self.EDGES) + 1))
        self.accepted = np.zeros_like(self.seen)
        self.mass = np.zeros(depths + 1)  # Σ p of the verified nodes per depth
        self.copy_seen = np.zeros(copy_length + 1)
        self.copy_accepted = np.zeros(copy_length + 1)
        self.decay = decay
        self._copy_table: np.ndarray | None = None  # copy_prob's, from the tables as they are

    def _cells(self, logp: np.ndarray, depths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.minimum(depths, len(self.seen) - 1), np.searchsorted(self.EDGES, logp)

    def factors(self) -> np.ndarray:
        """f_d: observed over predicted acceptance per depth."""
        accepted = self.accepted.sum(1)
        g = (accepted.sum() + self.MASS) / (self.mass.sum() + self.MASS)
        return (accepted + self.MASS * g) / (self.mass + self.MASS)

    def prob(self, logp: np.ndarray, depths: np.ndarray) -> np.ndarray:
        d, b = self._cells(np.asarray(logp), np.asarray(depths))
        p = np.minimum(np.exp(np.minimum(logp, 0.0)) * self.factors()[d], 1.0)
        return (self.accepted[d, b] + self.PRIOR * p) / (self.seen[d, b] + self.PRIOR)

    def copy_prob(self, positions: np.ndarray) -> np.ndarray:
        """P(the copy is accepted up to and including ``positions``): each position's observed rate, shrunk
        towards a prior, and never above the position before it (a copied token is accepted only after all
        those before it). The first position's prior is ``COPY_PRIOR``; each later one's is ``COPY_CARRY`` of
        the position before it, so a copy that keeps matching is believed to go on, while deep positions that
        copies which fail early seldom reach cannot keep a prior's hopes of their own:

            q_1 = (accepted_1 + w·r) / (seen_1 + w),   q_j = min(q_{j-1}, (accepted_j + w·c·q_{j-1}) / (seen_j + w))
        """
        if self._copy_table is None:
            rate, weight = self.COPY_PRIOR
            q, last, prior = np.zeros(len(self.copy_seen)), 1.0, rate
            for j in range(1, len(q)):  # (positions count from 1)
                q[j] = last = min(last, (self.copy_accepted[j] + weight * prior) / (self.copy_seen[j] + weight))
                prior = self.COPY_CARRY * last
            self._copy_table = q  # (until the next observation)
        return self._copy_table[np.minimum(positions, len(self.copy_seen) - 1)]

    def observe(self, logp: np.ndarray, depths: np.ndarray, accepted: np.ndarray,
                copy_positions: np.ndarray = np.zeros(0, np.int64), copy_accepted: np.ndarray = np.zeros(0, bool)):
        """One round: the verified drafted nodes (root excluded) and the new copied ones, each accepted or not."""
        for table in (self.seen, self.accepted, self.mass, self.copy_seen, self.copy_accepted):
            table *= self.decay
        self._copy_table = None
        logp = np.asarray(logp, dtype=np.float64)
        d, b = self._cells(logp, np.asarray(depths))
        np.add.at(self.seen, (d, b), 1.0)
        np.add.at(self.accepted, (d, b), np.asarray(accepted, dtype=np.float64))
        np.add.at(self.mass, d, np.exp(np.minimum(logp, 0.0)))
        j = np.minimum(copy_positions, len(self.copy_seen) - 1)
        np.add.at(self.copy_seen, j, 1.0)
        np.add.at(self.copy_accepted, j, np.asarray(copy_accepted, dtype=np.float64))


def merged_gains(tree_gains: np.ndarray, copy_gains: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cumulative gain, copied count) of the best j nodes, j = 1, 2, ...: a node from the tree (best-first
    order) or the next copied one, whichever adds more. Both streams must be taken in order (a tree's prefix, a
    copy's prefix); each is nearly decreasing, so the greedy merge picks the best split at every size."""
    i = j = 0
    gains, copied = [], []
    while i < len(tree_gains) or j < len(copy_gains):
        if j >= len(copy_gains) or (i < len(tree_gains) and tree_gains[i] >= copy_gains[j]):
            gains.append(tree_gains[i])
            i += 1
        else:
            gains.append(copy_gains[j])
            j += 1
        copied.append(j)
    return np.cumsum(gains), np.array(copied, dtype=np.int64)


@dataclass
class Plan:
    """A round's choice: verify ``size`` nodes (root included), ``copied`` of them copied from the context."""

    size: int
    copied: int
    expected: float  # E[τ]
    seconds: float  # predicted D + V


def _gap(extra: float, share: float) -> int:
    """The longest gap between two looks that cost ``extra`` rounds each (beyond the rounds they replace), for
    the looks to take at most ``share`` of the time: between MIN_LOOK_GAP and MAX_BACKOFF."""
    return int(np.clip(np.ceil(max(extra, 0.0) / share), MIN_LOOK_GAP, MAX_BACKOFF))


def plan(tree_gains: np.ndarray, copy_gains: np.ndarray, costs: CostModel, ctx: int, draft_seconds: float,
         candidates=CANDIDATES, host_seconds: float = 0.0) -> Plan:
    """The candidate budget with the most expected tokens per second; size 1 (the root alone) is always one.
    ``host_seconds`` (H) is paid by every tree round: all but the root alone of a round that drafted nothing,
    which is a plain step."""
    cum, copied = merged_gains(np.asarray(tree_gains, float), np.asarray(copy_gains, float))
    sizes = np.array([n for n in candidates if n - 1 <= len(cum)])
    expected = 1.0 + np.concatenate([[0.0], cum])[sizes - 1]
    host = np.where((sizes > 1) | (draft_seconds > 0), host_seconds, 0.0)
    seconds = draft_seconds + costs.predict(sizes, ctx) + host
    best = int(np.argmax(expected / seconds))
    n = int(sizes[best])
    return Plan(n, int(copied[n - 2]) if n > 1 else 0, float(expected[best]), float(seconds[best]))


@dataclass
class Knowledge:
    """What a model pair on a machine has taught so far: costs and acceptance, kept across generations."""

    costs: CostModel = field(default_factory=CostModel)
    acceptance: Acceptance = field(default_factory=Acceptance)
    drafts: dict = field(default_factory=dict)  # draft size → deque of its last drafting times, seconds
    hosts: deque = field(default_factory=lambda: deque(maxlen=31))  # the last tree rounds' host work, seconds
    drafted: tuple[float, float] | None = None  # EMA of (tokens expected, seconds predicted) of drafted rounds' plans
    recent: deque = field(default_factory=lambda: deque(maxlen=16))  # the budgets the last drafted rounds chose
    backoff: int = 1  # plain steps between two drafted rounds while drafting loses (``Tuner.wants_draft``)
    copy_backoff: int = 1  # undrafted rounds with a copy between two copies verified while copies lose (``Tuner``)

    def add_draft(self, seconds: float, size: int = max(CANDIDATES)) -> None:
        """A drafting time of a round drafted for trees of up to ``size`` nodes."""
        if math.isfinite(seconds) and seconds >= 0:
            self.drafts.setdefault(int(size), deque(maxlen=31)).append(seconds)

    def add_host(self, seconds: float) -> None:
        if math.isfinite(seconds):
            self.hosts.append(max(seconds, 0.0))

    @property
    def host_seconds(self) -> float:
        """A tree round's host work (H): the median of the last ones, 0 before any."""
        return statistics.median(self.hosts) if self.hosts else 0.0  # (not numpy's: asked for every plan)

    def draft_seconds(self, size: int = max(CANDIDATES)) -> float | None:
        """D(size): the median of the last drafting times at that size (a busy machine's stalls are outliers, not
        cost); a size never drafted takes the next larger one drafted (more head rows never cost less), else the
        largest; None before any."""
        if not self.drafts:
            return None
        known = sorted(self.drafts)
        near = next((n for n in known if n >= size), known[-1])
        return statistics.median(self.drafts[near])

    def add_drafted(self, tokens: int, seconds: float, ema: float = 0.25) -> None:
        old = self.drafted or (float(tokens), seconds)
        self.drafted = ((1 - ema) * old[0] + ema * tokens, (1 - ema) * old[1] + ema * seconds)

    @property
    def drafted_rate(self) -> float | None:
        return None if self.drafted is None else self.drafted[0] / self.drafted[1]


class Tuner:
    """One generation's choices, over a ``Knowledge`` shared by the generations of one drafting setup.

    Per round the loop calls ``wants_draft(ctx)`` (False: no drafting at all), then ``choose(...)`` with the full
    draft's scores (if drafted) and the copy from the context (if any), and finally ``observe(...)`` with the
    timings and the path.
    The first drafted round warms up (kernels, caches) and is not timed; then, where the root alone has no
    cost yet, one round is a plain step, and the next ones verify each of ``PROBES`` once where its cost is not
    known; then every round takes ``plan``'s choice.

    Size 1 is priced by plain steps only: a drafted round (or a copy alone) whose plan keeps the root alone
    still pays for a tree round's host work, which a plain step does not, so its time teaches no cost."""

    SAVE_EVERY = 128  # rounds between two writes of the cache file (after a first one once the probes are done)

    def __init__(self, knowledge: Knowledge | None = None, max_size: int = 64):
        self.knowledge = knowledge or Knowledge()
        self.limit(max_size)
        # The first round of a process warms up (kernels, caches): it is neither timed nor, where nothing is known
        # yet, chosen. A generation that goes on from what is known chooses from its first round.
        self.warm = bool(self.knowledge.costs.count(1))
        self.timed = False
        self.plain_streak = 0
        self.copy_streak = 0  # undrafted rounds since a copy was last verified, of those that had one
        self.copy_look: Plan | None = None  # a copy verified against the model's choice, to see whether copies pay
        self.capped = False  # the last drafted round chose all its draft could give
        self._planned = float("nan")  # the seconds the last plan predicted
        self._expected = float("nan")  # and the tokens it expected
        self.chosen: Counter[int] = Counter()  # budgets of the verified rounds; 1: the root alone
        self.plain_steps = 0  # rounds that skipped drafting
        self.alone: Plan | None = None  # the best round without drafting, as the last ``wants_draft`` saw it
        self.drafting = self.max_size  # the draft size of the round under way (``draft_size``)
        self._alone_key: tuple | None = None  # what the kept plans of a copy alone were made from
        self._alone_plans: dict[tuple[int, int], Plan] = {}  # (first position, length) → the plan
        self._unsaved = 0

    def limit(self, max_size: int) -> None:
        """The largest budget a round may draft (memory, or what the drafter's tables can hold)."""
        self.max_size = max_size
        self.candidates = tuple(n for n in CANDIDATES if n < max_size) + (max_size,)
        self.probes = [n for n in PROBES if n <= max_size and not self.knowledge.costs.count(n)]

    def wants_saving(self) -> bool:
        """Whether the costs learnt are worth writing to the cache file now: once the probes are done, then every
        ``SAVE_EVERY`` rounds."""
        if not self.warm or self.probes:
            return False
        self._unsaved += 1
        if self._unsaved == 1 or self._unsaved > self.SAVE_EVERY:
            self._unsaved = 1
            return True
        return False

    DRAFT_QUANTILE = 75  # the draft size covers this percentile of the recent rounds' drafted nodes

    def draft_size(self) -> int:
        """The budget to draft for this round, remembered as ``drafting``: how many head rows the drafter
        computes (``drafting.head_rows``), which costs (D grows with it). The candidate that covers the drafted
        nodes (copies apart) of three in four recent choices, one candidate more when the last choice took the
        whole draft; a one-off large tree does not make the next 16 rounds pay for its rows."""
        if not self.warm or self.probes or not self.knowledge.recent:
            self.drafting = self.max_size
        else:
            need = np.percentile(self.knowledge.recent, self.DRAFT_QUANTILE)
            need = max(need, min(PROBES[0], self.max_size))  # (a draft for the root alone would be no draft)
            i = next((i for i, n in enumerate(self.candidates) if n >= need), len(self.candidates) - 1)
            self.drafting = self.candidates[min(i + self.capped, len(self.candidates) - 1)]
        return self.drafting

    def wants_draft(self, ctx: int, copy_positions: np.ndarray = np.zeros(0, np.int64)) -> bool:
        """Draft this round, or not (a plain step, or the copy from the context alone, at ``copy_positions``).

        Not while drafted rounds gave fewer tokens per second than this round's best plan without drafting is
        expected to. The drafted rounds' tokens are those their plans expected (the calibrated acceptance: the
        tokens one round commits vary too much to go by), their seconds those the fitted costs predict for
        their plans (one round's timing on a busy machine is noise). While
        drafting loses, a round drafts anyway after ``backoff`` rounds (doubled each time it still loses, or
        straight to ``look_gap`` where drafting is ``FAR_BEHIND``) to see whether the text has changed."""
        k = self.knowledge
        self.alone = self.copy_look = None
        if self.timed and not k.costs.count(1):  # the root alone has no cost yet: a plain step times it
            self.alone = Plan(1, 0, 1.0, float("nan"))
            return False
        if not self.warm or self.probes or k.drafted_rate is None:
            return True
        if len(copy_positions):
            alone = self._copy_alone(copy_positions, ctx)
        else:  # the root alone (the common case, every plain step of a run: no more host work than needed)
            alone = Plan(1, 0, 1.0, k.costs.cost(1, ctx))
        self.alone = alone
        if k.drafted_rate >= alone.expected / alone.seconds:
            self.plain_streak, k.backoff = 0, 1
            return True
        if self.plain_streak >= k.backoff:
            far, gap = k.drafted_rate < FAR_BEHIND * alone.expected / alone.seconds, self.look_gap(alone)
            self.plain_streak, k.backoff = 0, gap if far else min(2 * k.backoff, gap)
            return True
        self.plain_streak += 1
        if len(copy_positions):
            self.alone = self._copy_look(alone, len(copy_positions))
        return False

    def _copy_look(self, alone: Plan, length: int) -> Plan:
        """``alone``, or now and then, while copies from the context do not pay, the whole copy (a copy look).
        The copies' calibration learns only from the copies verified: without looks, one copy that failed early
        could rule copies out for the rest of a run, however well they would match later (an untrained drafter's
        greedy text repeats itself, and copies gave it 1.3x plain decoding). The looks are spaced as the drafted
        ones are: the gap doubles while copies still lose, up to a cost of COPY_LOOK_SHARE of the time."""
        k = self.knowledge
        if alone.copied:  # copies pay, as the model sees them
            self.copy_streak, k.copy_backoff = 0, 1
            return alone
        if self.copy_streak < k.copy_backoff:
            self.copy_streak += 1
            return alone
        look = Plan(min(length + 1, self.max_size), min(length, self.max_size - 1), float("nan"), float("nan"))
        gap = _gap((k.costs.cost(look.size, 0.0) + k.host_seconds) / alone.seconds - 1.0, COPY_LOOK_SHARE)
        self.copy_streak, k.copy_backoff, self.copy_look = 0, min(2 * k.copy_backoff, gap), look
        return look

    CTX_DRIFT = 64  # context tokens after which a kept plan of a copy alone is made again

    def _copy_alone(self, copy_positions: np.ndarray, ctx: int) -> Plan:
        """The best plan of the copy alone. Plain steps ask on every token where the text repeats its context,
        and on a small target a plan costs a share of the step, so plans are kept by the copy's positions until
        what they depend on changes: the costs' fit, a tree round (the copies' calibration and the host work),
        or ``CTX_DRIFT`` tokens of context."""
        k = self.knowledge
        key = (k.costs.fit(), ctx // self.CTX_DRIFT)
        if self._alone_key is None or self._alone_key[0] is not key[0] or self._alone_key[1] != key[1]:
            self._alone_key, self._alone_plans = key, {}
        where = (int(copy_positions[0]), len(copy_positions))
        if where not in self._alone_plans:
            self._alone_plans[where] = plan(np.zeros(0), k.acceptance.copy_prob(copy_positions), k.costs, ctx, 0.0,
                                            self.candidates, k.host_seconds)
        return self._alone_plans[where]

    def look_gap(self, alone: Plan) -> int:
        """The longest gap between two looks: a look costs a drafted round (the fitted seconds of the drafted
        rounds) in place of ``alone``, the best round without drafting; it may take LOOK_SHARE of the time."""
        return _gap(self.knowledge.drafted[1] / alone.seconds - 1.0, LOOK_SHARE)

    def choose(self, tree_logp: np.ndarray, tree_depths: np.ndarray, copy_positions: np.ndarray, ctx: int,
               draft_seconds: float | None) -> Plan:
        """The plan of a round: ``tree_logp``/``tree_depths`` of the drafted nodes past the root in best-first
        order (none: not drafted, ``draft_seconds`` None), ``copy_positions`` the positions along the copy of the
        nodes a copy would add."""
        k = self.knowledge
        self._planned = float("nan")  # (stays so for the warm-up and the probes: no choice of the model's)
        look, self.copy_look = self.copy_look, None
        if draft_seconds is None:
            if look is not None and len(copy_positions):  # (``wants_draft`` chose to look at the copy)
                return Plan(min(look.size, len(copy_positions) + 1), min(look.copied, len(copy_positions)),
                            float("nan"), float("nan"))
            draft_seconds = 0.0
        elif self.timed and self.probes:  # (the first round is not timed: no probe there)
            n = self.probes.pop(0)
            return Plan(n, 0, float("nan"), float("nan"))
        elif k.draft_seconds(self.drafting) is not None:
            draft_seconds = k.draft_seconds(self.drafting)  # the median: this round's own time is noisier
        if not self.warm or not k.costs.count(1):
            return Plan(min(16, self.max_size) if len(tree_logp) else 1, 0, float("nan"), float("nan"))
        tree_gains = k.acceptance.prob(tree_logp, tree_depths)
        copy_gains = k.acceptance.copy_prob(copy_positions)
        chosen = plan(tree_gains, copy_gains, k.costs, ctx, draft_seconds, self.candidates, k.host_seconds)
        if len(tree_logp):
            self.capped = chosen.size - chosen.copied >= len(tree_logp) + 1
        self._planned = chosen.seconds
        self._expected = chosen.expected
        return chosen

    def observe(self, size: int, drafted: bool, tokens: int, ctx: int, draft_seconds: float, verify_seconds: float,
                accepted: tuple | None = None, host_seconds: float = float("nan"), copied: int = 0,
                rounds: int = 1) -> None:
        """A verified round: ``size`` nodes (``copied`` of them from the context), ``tokens`` committed, its
        timings (``draft_seconds`` 0 for a plain step; ``host_seconds`` a tree round's host work, NaN for a plain
        step or where not timed) and, for a tree round, ``accepted`` = (logp, depths, accepted) of its drafted
        nodes and (positions, accepted) of its copied ones, for ``Acceptance.observe``. Plain steps may come as
        ``rounds`` steps at once, timed as their mean."""
        k = self.knowledge
        self.chosen[size] += rounds
        if not drafted:
            self.plain_steps += rounds
        if accepted is not None or drafted or size > 1:  # (what kept plans of a copy alone depend on)
            self._alone_key = None
        if accepted is not None:
            k.acceptance.observe(*accepted)
        if not drafted and size > 1 and k.costs.count(1):  # a copy alone: did it beat a plain step? Then copies
            if tokens * k.costs.cost(1, ctx) >= k.costs.cost(size, ctx) + k.host_seconds:  # may pay again: look
                k.copy_backoff = 1  # soon (``_copy_look``)
        if not self.timed:  # the first round pays for warming up: not a cost to learn
            self.warm = self.timed = True
            return
        k.costs.add(size, ctx, verify_seconds)
        k.add_host(host_seconds)
        if drafted:
            k.add_draft(draft_seconds, self.drafting)
            if np.isfinite(self._planned):  # a choice (not the warm-up or a probe)
                self.knowledge.recent.append(size - copied)
                k.add_drafted(self._expected, self._planned)

    def summary(self) -> str:
        """One line: the histogram of the budgets chosen and the plain steps."""
        r = self.report()
        sizes = ", ".join(f"{n}: {c}" for n, c in r["tree_sizes"].items())
        return f"Tree sizes (auto): {{{sizes}}} over {r['rounds']} rounds, plain steps {r['plain_step_fraction']:.0%}"

    def report(self) -> dict:
        """The budgets chosen (a histogram over the verified rounds; 1: the root alone) and the plain steps."""
        rounds = sum(self.chosen.values())
        return {"tree_sizes": dict(sorted(self.chosen.items())), "rounds": rounds,
                "plain_step_fraction": self.plain_steps / rounds if rounds else 0.0}


# --- Knowledge kept across generations: in this process, and in a small cache file -------------------------------

CACHE_VERSION = 2  # 2: drafting times per draft size
CACHE_ENTRIES = 16  # model pairs × machines remembered; the least recently used goes first
CACHE_ENV = "TREEFLASH_AUTOTUNE_CACHE"  # the cache file; empty: none
_PROCESS: OrderedDict[str, Knowledge] = OrderedDict()  # this process's setups, most recent last
PROCESS_ENTRIES = 8


def machine(device: str) -> str:
    """This machine as the cache file tells machines apart: architecture, processor, cores and the MLX device."""
    return f"{platform.machine()} {platform.processor()} {os.cpu_count()} cores, {device}"


def cache_path() -> Path | None:
    """``$TREEFLASH_AUTOTUNE_CACHE``, else ``~/.cache/treeflash-mlx/autotune.json``; an empty value: no file."""
    value = os.environ.get(CACHE_ENV)
    if value is None:
        return Path.home() / ".cache" / "treeflash-mlx" / "autotune.json"
    return Path(value) if value else None


def read_cache(path: Path | None) -> dict:
    """The cache's entries; {} when there is none, or it is unreadable, corrupt or of another version."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
            return {}
        return {k: v for k, v in data["entries"].items() if _valid_entry(v)}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _valid_entry(entry) -> bool:
    try:
        rows = entry["costs"]
        ok = all(len(r) == 3 and 1 <= int(r[0]) <= max(CANDIDATES) and np.isfinite(r[1]) and r[1] >= 0
                 and np.isfinite(r[2]) and r[2] > 0 for r in rows)
        drafts = entry.get("draft") or []
        ok = ok and all(len(d) == 2 and 1 <= int(d[0]) <= max(CANDIDATES) and math.isfinite(d[1]) and d[1] > 0
                        for d in drafts)
        return ok and float(entry["used"]) >= 0
    except (KeyError, TypeError, ValueError):
        return False


def write_cache(path: Path | None, key: str, knowledge: Knowledge) -> None:
    """Record ``knowledge``'s costs under ``key``: at most ``CACHE_ENTRIES`` entries, written whole to a temporary
    file and renamed over the old one (a reader never sees half a file). A failure to write loses nothing
    but the head start, so it is ignored."""
    if path is None or not knowledge.costs.observations:
        return
    entries = read_cache(path)
    drafts = [[n, knowledge.draft_seconds(n)] for n in sorted(knowledge.drafts)]
    entries[key] = {"costs": knowledge.costs.state(), "draft": drafts, "used": time.time()}
    entries = dict(sorted(entries.items(), key=lambda kv: kv[1]["used"])[-CACHE_ENTRIES:])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".autotune-", delete=False) as f:
            json.dump({"version": CACHE_VERSION, "entries": entries}, f)
        os.replace(f.name, path)
    except OSError:
        try:
            os.unlink(f.name)
        except (OSError, NameError):
            pass


def knowledge_for(key: str, path: Path | None) -> Knowledge:
    """This process's knowledge of ``key``, else a new one seeded with the cache file's costs for it."""
    if key in _PROCESS:
        _PROCESS.move_to_end(key)
        return _PROCESS[key]
    knowledge = Knowledge()
    entry = read_cache(path).get(key) if path is not None else None
    if entry:
        for n, ctx, seconds in entry["costs"]:
            knowledge.costs.add(int(n), float(ctx), float(seconds))
        for n, seconds in entry.get("draft") or []:
            knowledge.add_draft(float(seconds), int(n))
    _PROCESS[key] = knowledge
    while len(_PROCESS) > PROCESS_ENTRIES:
        _PROCESS.popitem(last=False)
    return knowledge
