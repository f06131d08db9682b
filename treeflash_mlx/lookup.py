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
