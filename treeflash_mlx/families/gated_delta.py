"""Gated DeltaNet (linear attention) over a draft tree: every node continues its own parent's state.

Plain decoding runs, per token t, a short causal convolution over the last K inputs and then the gated delta
rule on the recurrent state S (Hv heads of Dv × Dk, float32):

    S_t = g_t·S_{t-1} + k_t ⊗ δ_t,   δ_t = β_t·(v_t − (g_t·S_{t-1})·k_t),   y_t = S_t·q_t

In a tree the "previous token" of node i is its parent, so (docs/algorithm.md, "Recurrent layers in trees"):

- node i's convolution window is the last K inputs along its own ancestor path, the root's path continued
  into the committed convolution state (the K−1 inputs before the root);
- node i's state is the update of its parent's state by node i (the root's parent: the committed state).

Nodes are updated a whole depth at a time (the nodes of depth d read the states of depth d−1), so a tree of
depth D costs D batched updates, whatever its width. The commit takes the accepted path's last state and the
last K−1 inputs along that path; nothing else of the pass survives. Two ways to have that state: keep every
node's state until the commit (``"stored"``: the commit is a slice), or keep only each node's q, k, v, g, β
and redo the path's updates from the committed state (``"replay"``: L more small updates per layer, no
per-node states held); the family picks one per pass (``Qwen3Next.commit_by``). docs/algorithm.md, "Recurrent layers in trees", gives the measured costs.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.gated_delta import compute_g, normalize_qk


class TreePlan:
    """The shape of a draft tree as recurrent layers need it, from ``parents`` (parents precede children).

    ``levels[d]``: the nodes of depth d; ``parent_slot[d]``: for each of them, its parent's index among the
    nodes of depth d−1 (depth 0 is the root alone, whose parent is the committed state). ``conv_rows``:
    (n, K) rows of [committed conv inputs (K−1 rows) ; the pass's inputs (n rows)] that each node's convolution
    reads, oldest first."""

    def __init__(self, parents: np.ndarray, kernel: int):
        parents = np.asarray(parents, dtype=np.int64)
        n = len(parents)
        depths = np.zeros(n, dtype=np.int64)
        for i in range(1, n):
            depths[i] = depths[parents[i]] + 1
        self.n, self.depths, self.parents = n, depths, parents
        self.levels = [np.flatnonzero(depths == d) for d in range(int(depths.max()) + 1)]
        slot = np.empty(n, dtype=np.int64)  # each node's index within its depth
        for level in self.levels:
            slot[level] = np.arange(len(level))
        self.slot = slot
        self.parent_slot = [slot[parents[level]] if d else np.zeros(1, dtype=np.int64)
                            for d, level in enumerate(self.levels)]
        # rows along each node's path: itself, its parent, ... then the committed inputs K-2, K-3, ...
        rows = np.empty((n, kernel), dtype=np.int64)
        for i in range(n):
            node, back = i, []
            while node >= 0 and len(back) < kernel:
                back.append(kernel - 1 + node)
                node = parents[node]
            pad = kernel - 1 - 1  # the last committed input
            while len(back) < kernel:
                back.append(pad)
                pad -= 1
            rows[i] = back[::-1]
        self.conv_rows = rows
        self.order = np.concatenate(self.levels)  # nodes depth by depth
        self.inverse = np.argsort(self.order)  # node i sits at inverse[i] in that order

    @classmethod
    def chain(cls, n: int, kernel: int) -> "TreePlan":
        return cls(np.arange(n) - 1, kernel)


@partial(mx.compile, shapeless=True)
def delta_step(state, q, k, v, g, beta):
    """One gated delta update of w independent states: state (w, H, Dv, Dk) float32; q, k (w, H, Dk); v (w, H, Dv);
    g, beta (w, H). Returns y (w, H, Dv) in q's dtype and the new states (the arithmetic of mlx-lm's ops path)."""
    state = state * g[..., None, None]
    kv_mem = (state * k[..., None, :]).sum(axis=-1)  # (w, H, Dv)
    delta = (v - kv_mem) * beta[..., None]
    state = state + k[..., None, :] * delta[..., None]
    y = (state * q[..., None, :]).sum(axis=-1)
    return y.astype(q.dtype), state


def tree_recurrence(q, k, v, g, beta, state, plan: TreePlan):
    """The gated delta rule over a tree, depth by depth: q, k (n, Hk, Dk); v (n, Hv, Dv); g, beta (n, Hv);
    ``state`` (1, Hv, Dv, Dk), the committed one. Returns y (n, Hv, Dv) and the states per depth
    (``states[d][plan.slot[i]]`` is node i's)."""
    if (r := v.shape[1] // q.shape[1]) > 1:  # grouped key heads: each serves r value heads
        q, k = mx.repeat(q, r, axis=1), mx.repeat(k, r, axis=1)
    if mx.default_device() == mx.gpu and mx.metal.is_available():
        return metal_tree_recurrence(q, k, v, g, beta, state, plan)
    ys, states, prev = [], [], state
    for level, parent_slot in zip(plan.levels, plan.parent_slot):
        idx = mx.array(level)
        y, prev = delta_step(prev[mx.array(parent_slot)], q[idx], k[idx], v[idx], g[idx], beta[idx])
        ys.append(y)
        states.append(prev)
    y = mx.concatenate(ys)[mx.array(plan.inverse)]
    return y, states


COMMITS = ("stored", "replay")


def gated_delta_tree(la: nn.Module, qkv: mx.array, z: mx.array, b: mx.array, a: mx.array, cache, lp,
                     commit_by: str = "stored") -> mx.array:
    """A Gated DeltaNet layer over the tree ``lp.tree`` from its projections (B = 1): qkv (1, n, conv_dim),
    z (1, n, Hv, Dv), b and a (1, n, Hv). Leaves in ``lp.pending`` what the commit needs (``commit_by``: the
    per-node states, or the updates' inputs to replay); returns (1, n, hidden)."""
    plan: TreePlan = lp.tree
    n, K = qkv.shape[1], la.conv_kernel_size
    conv_state = cache[0] if cache[0] is not None else mx.zeros((1, K - 1, la.conv_dim), dtype=qkv.dtype)
    inputs = mx.concatenate([conv_state[0], qkv[0]])  # (K-1+n, conv_dim)
    windows = inputs[mx.array(plan.conv_rows)]  # (n, K, conv_dim): each node's own path
    conv_out = nn.silu(la.conv1d(windows))[:, -1]  # (n, conv_dim), the layer's own depthwise convolution
    q, k, v = mx.split(conv_out, [la.key_dim, 2 * la.key_dim], -1)
    q = q.reshape(1, n, la.num_k_heads, la.head_k_dim)
    k = k.reshape(1, n, la.num_k_heads, la.head_k_dim)
    v = v.reshape(n, la.num_v_heads, la.head_v_dim)
    q, k = normalize_qk(q, k, inv_scale=la.head_k_dim**-0.5, eps=1e-6)
    beta = mx.sigmoid(b[0])
    g = compute_g(la.A_log, a[0], la.dt_bias)
    state = cache[1] if cache[1] is not None else mx.zeros((1, la.num_v_heads, la.head_v_dim, la.head_k_dim),
                                                            dtype=mx.float32)
    y, states = tree_recurrence(q[0], k[0], v, g, beta, state, plan)
    if commit_by == "replay":
        states = Replay(q[0], k[0], v, g, beta, state)
    lp.pending[lp.index] = (states, inputs, plan)
    out = la.out_proj(la.norm(y[None], z).reshape(1, n, -1))
    if (group := getattr(la, "sharding_group", None)) is not None:  # tensor parallel: each rank has some heads
        out = mx.distributed.all_sum(out, group=group)
    return out


class Replay:
    """What a ``"replay"`` commit keeps of a tree pass: each node's update inputs and the committed state."""

    def __init__(self, q, k, v, g, beta, state):
        self.q, self.k, self.v, self.g, self.beta, self.state = q, k, v, g, beta, state

    def state_of(self, plan: TreePlan, node: int) -> mx.array:
        path = []
        while node >= 0:
            path.insert(0, node)
            node = int(plan.parents[node])
        idx = mx.array(path)
        q, k, v, g, beta = (a[idx] for a in (self.q, self.k, self.v, self.g, self.beta))
        if (r := v.shape[1] // q.shape[1]) > 1:
            q, k = mx.repeat(q, r, axis=1), mx.repeat(k, r, axis=1)
        state = self.state
        for i in range(len(path)):  # the path's updates, one token at a time, as plain decoding makes them
            step = slice(i, i + 1)
            _, state = delta_step(state, q[step], k[step], v[step], g[step], beta[step])
        return state


def commit(cache, pending, node: int) -> None:
    """Make tree node ``node`` (the accepted path's last) the committed state of a recurrent layer's cache."""
    states, inputs, plan = pending
    if isinstance(states, Replay):
        cache[1] = states.state_of(plan, node)
    else:
        cache[1] = states[int(plan.depths[node])][int(plan.slot[node]) : int(plan.slot[node]) + 1]
    cache[0] = inputs[mx.array(plan.conv_rows[node, 1:])][None]  # the last K-1 inputs along its path


# The Metal path: one thread group per (value head, value row), each thread a slice of the key dimension. A
# thread owns the same slice of every node's state, so node i reads its parent's state where this very
# thread wrote it: no synchronisation between nodes beyond program order.
_TREE_SOURCE = """
    auto h = thread_position_in_grid.z;
    auto dv = thread_position_in_grid.y;
    auto lane = thread_position_in_threadgroup.x;
    constexpr int per = Dk / 32;

    float s[per];
    for (int t = 0; t < N; ++t) {
      int p = parents[t];
      for (int i = 0; i < per; ++i) {
        int j = lane * per + i;
        s[i] = p < 0 ? static_cast<float>(state_in[(h * Dv + dv) * Dk + j])
                     : states[((p * H + h) * Dv + dv) * Dk + j];
      }
      float gt = g[t * H + h];
      float kv = 0.0f;
      for (int i = 0; i < per; ++i) {
        int j = lane * per + i;
        s[i] = s[i] * gt;
        kv += s[i] * static_cast<float>(k[(t * H + h) * Dk + j]);
      }
      kv = simd_sum(kv);
      float delta = (static_cast<float>(v[(t * H + h) * Dv + dv]) - kv) * static_cast<float>(beta[t * H + h]);
      float out = 0.0f;
      for (int i = 0; i < per; ++i) {
        int j = lane * per + i;
        s[i] = s[i] + static_cast<float>(k[(t * H + h) * Dk + j]) * delta;
        out += s[i] * static_cast<float>(q[(t * H + h) * Dk + j]);
        states[((t * H + h) * Dv + dv) * Dk + j] = s[i];
      }
      out = simd_sum(out);
      if (lane == 0) {
        y[(t * H + h) * Dv + dv] = static_cast<InT>(out);
      }
    }
"""
_tree_kernel = None


def metal_tree_recurrence(q, k, v, g, beta, state, plan: TreePlan):
    """``tree_recurrence`` as one Metal kernel (q, k already repeated to the value heads); same results."""
    global _tree_kernel
    if _tree_kernel is None:
        _tree_kernel = mx.fast.metal_kernel(
            name="treeflash_gated_delta_tree", input_names=["q", "k", "v", "g", "beta", "state_in", "parents"],
            output_names=["y", "states"], source=_TREE_SOURCE)
    n, H, Dk = q.shape
    Dv = v.shape[-1]
    if Dk % 32:
        raise ValueError(f"the Metal gated delta kernel needs a key head size that 32 divides, got {Dk}")
    y, states = _tree_kernel(
        inputs=[q, k, v, g.astype(mx.float32), beta, state, mx.array(plan.parents.astype(np.int32))],
        template=[("InT", q.dtype), ("N", plan.n), ("H", H), ("Dk", Dk), ("Dv", Dv)],
        grid=(32, Dv, H), threadgroup=(32, 1, 1),
        output_shapes=[(n, H, Dv), (n, H, Dv, Dk)], output_dtypes=[q.dtype, mx.float32])
    # per depth, as the ops path gives them
    return y, [states[mx.array(level)] for level in plan.levels]
