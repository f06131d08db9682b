"""Prompt lookup: what followed the context's last tokens the previous time they occurred (docs/algorithm.md,
"Copying from the context"). Plain numpy.

Generated text often repeats its context: code answers restate the signature, names and docstring of the prompt,
edits copy whole lines. When the last n committed tokens (the root last) occurred earlier, the tokens that followed
them then are a cheap, often long, draft. It is a proposal like any other: verification decides, so it never
changes the output.

    history  h[0 .. N-1]          (h[N-1] is the draft's root)
    match    the longest n ≤ MAX_MATCH with h[p-n+1 .. p] == h[N-n .. N-1] for some p < N-1, n ≥ min_match
             (the most recent such p among the longest matches)
    copy     h[p+1 .. p+length]   (fewer where the history ends first)
"""

from __future__ import annotations

import numpy as np

MAX_MATCH = 8  # longer matches than this (or than min_match) are not told apart: any is an equally good source


def continuation(history: np.ndarray, length: int, min_match: int) -> np.ndarray:
    """Up to ``length`` tokens that followed the latest earlier occurrence of the history's longest matched
    suffix (at least ``min_match`` tokens long); empty when there is none."""
    h = np.asarray(history)
    N = len(h)
    if length < 1 or N < min_match + 1:
        return h[:0]
    ends = np.flatnonzero(h[: N - 1] == h[N - 1])  # candidate p: h[p] equals the root
    if not len(ends):
        return h[:0]
    matched = np.ones(len(ends), dtype=np.int64)  # suffix tokens matched so far at each candidate
    alive = np.ones(len(ends), dtype=bool)
    for k in range(1, min(max(MAX_MATCH, min_match), N - 1)):
        before = ends - k
        alive &= before >= 0
        alive[alive] = h[before[alive]] == h[N - 1 - k]
        if not alive.any():
            break
        matched += alive
    best = matched.max()
    if best < min_match:
        return h[:0]
    p = ends[np.flatnonzero(matched == best)[-1]]
    return h[p + 1 : p + 1 + length]


class Lookup:
    """``continuation`` for a history that only grows, as a generation's does, at a cost per call that does not
    grow with it: each call indexes the tokens added since the last one (every ``min_match``-token run, by where
    it ends) and looks only at the earlier occurrences of the last run. A history that is not the last one
    grown (another list, or one cut or changed) is indexed afresh. Same answers as ``continuation``.

    Plain steps pay for it on every token: a scan of the whole history each step cost a 5M-parameter target's
    plain decoding several per cent on a 2-core CPU, where host work does not overlap the model's."""

    def __init__(self, length: int, min_match: int):
        self.length, self.min_match = length, min_match
        self._source: list | None = None  # the history indexed (the caller's list, grown in place)
        self._tokens: list[int] = []  # its tokens indexed so far
        self._ends: dict[tuple, list[int]] = {}  # run of min_match tokens → the positions where it ends, ascending

    def _index(self, history) -> list[int]:
        h, n = self._tokens, len(self._tokens)
        if history is not self._source or len(history) < n or (n and history[n - 1] != h[-1]):
            self._source, h, n = history, [], 0
            self._tokens, self._ends = h, {}
        h.extend(int(t) for t in history[n:])
        m = self.min_match
        for p in range(max(n - 1, m - 1), len(h) - 1):  # runs ending before the last token (the root)
            self._ends.setdefault(tuple(h[p - m + 1 : p + 1]), []).append(p)
        return h

    def __call__(self, history) -> np.ndarray:
        """Up to ``length`` tokens that followed the latest earlier occurrence of ``history``'s longest matched
        suffix, as ``continuation(np.asarray(history), length, min_match)``."""
        N, m = len(history), self.min_match
        if self.length < 1 or N < m + 1:
            return np.zeros(0, np.int64)
        h = self._index(history)
        cap = min(max(MAX_MATCH, m), N - 1)  # suffix tokens beyond this are not told apart
        best, where = 0, -1
        for p in reversed(self._ends.get(tuple(h[N - m :]), ())):  # the latest first: it wins ties
            k = m
            while k < cap and p - k >= 0 and h[p - k] == h[N - 1 - k]:
                k += 1
            if k > best:
                best, where = k, p
                if k == cap:
                    break
        return np.array(h[where + 1 : where + 1 + self.length], dtype=np.int64) if where >= 0 else np.zeros(0, np.int64)
