"""What a tree verification costs on a hybrid (Gated DeltaNet) target, next to a chain pass and a plain step.

    python demos/hybrid_cost.py [--layers 24] [--nodes 16] [--prefix 256] [--repeats 15]

Builds a random float32 target in Qwen3.5-0.8B's text shapes (hidden 1024, 24 layers: 18 Gated DeltaNet ones with
16 key/value heads of 128, 6 gated-attention ones with 8 query heads of 256, vocabulary 248,320, tied head) and
times, interleaved after ``--prefix`` cached tokens:

- one plain mlx-lm step;
- a chain of ``--nodes`` tokens and a bushy tree of ``--nodes`` nodes (node i under node (i-1)//2), verified
  as the speculative loop verifies them, with both commits of the recurrent state (stored and replay);
- the recurrent part alone: the Gated DeltaNet recurrences of all linear layers for that chain and that tree;
- the memory a round holds per node (peak during verify + commit, over the cache before it).

It also checks that greedy decoding with a tree drafter at these shapes is mlx-lm's, token for token.
"""

from __future__ import annotations

import argparse
import time

import treeflash_mlx  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import qwen3_5

from treeflash_mlx.benchmark import bushy_tree
from treeflash_mlx.families import gated_delta
from treeflash_mlx.families.qwen3_next import Qwen3Next
from treeflash_mlx.target import Target
from treeflash_mlx.tree import DraftTree

QWEN35_08B = dict(  # Qwen3.5-0.8B's text_config
    model_type="qwen3_5", hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=8,
    num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=16,
    linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4, full_attention_interval=4,
    rms_norm_eps=1e-6, vocab_size=248320, max_position_embeddings=262144, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25})


def build(layers: int):
    config = dict(QWEN35_08B, num_hidden_layers=layers)
    model = qwen3_5.Model(qwen3_5.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model


def chain_tree(n: int, vocab: int, rng) -> DraftTree:
    return DraftTree(rng.integers(0, vocab, n), np.arange(n) - 1, np.arange(n))


def time_passes(model, trees: dict, prefix: int, repeats: int) -> dict:
    """Median seconds of a plain step and of verify + commit of each tree (both commits), interleaved."""
    target = Target(model)
    cache = target.make_cache()
    rng = np.random.default_rng(0)
    mx.eval(target.forward(mx.array(rng.integers(0, target.vocab_size, prefix)), cache, last_only=True)[0])
    saved = [(c[0], c[1]) if hasattr(c, "cache") else None for c in cache]

    def reset():
        for c, s in zip(cache, saved):
            c.offset = prefix
            if s is not None:
                c[0], c[1] = s

    times: dict = {}
    for r in range(repeats + 1):  # the first round compiles and is dropped
        tic = time.perf_counter()
        mx.eval(model(mx.array([[1]]), cache=cache))
        times.setdefault("step", []).append(time.perf_counter() - tic)
        reset()
        for name, tree in trees.items():
            for commit_by in gated_delta.COMMITS:
                Qwen3Next.recurrent_commit = commit_by
                tic = time.perf_counter()
                logits, _ = target.verify(tree, cache)
                mx.eval(logits)
                target.commit(cache, prefix, [0] + tree.path(len(tree) - 1))
                mx.eval([c.state for c in cache])
                times.setdefault((name, commit_by), []).append(time.perf_counter() - tic)
                reset()
    Qwen3Next.recurrent_commit = "auto"
    return {k: float(np.median(v[1:])) for k, v in times.items()}


def time_recurrence(model, trees: dict, repeats: int) -> dict:
    """Median seconds of the Gated DeltaNet recurrences alone (every linear layer) for each tree."""
    la = next(layer.linear_attn for layer in model.layers if layer.is_linear)
    n_linear = sum(layer.is_linear for layer in model.layers)
    rng = np.random.default_rng(1)
    out = {}
    for name, tree in trees.items():
        n = len(tree)
        q, k = (mx.array(rng.normal(size=(n, la.num_k_heads, la.head_k_dim)) / 11, dtype=mx.float32) for _ in "qk")
        v = mx.array(rng.normal(size=(n, la.num_v_heads, la.head_v_dim)), dtype=mx.float32)
        g, beta = (mx.array(rng.uniform(0.5, 1, size=(n, la.num_v_heads)), dtype=mx.float32) for _ in "gb")
        state = mx.zeros((1, la.num_v_heads, la.head_v_dim, la.head_k_dim))
        plan = gated_delta.TreePlan(tree.parents, la.conv_kernel_size)
        runs = []
        for _ in range(repeats + 1):
            tic = time.perf_counter()
            for _ in range(n_linear):
                mx.eval(gated_delta.tree_recurrence(q, k, v, g, beta, state, plan))
            runs.append(time.perf_counter() - tic)
        out[name] = float(np.median(runs[1:]))
    return out


def round_memory(model, tree: DraftTree, prefix: int, commit_by: str) -> int:
    """Peak bytes of one verify + commit over what the prefilled cache and the weights hold."""
    Qwen3Next.recurrent_commit = commit_by
    target = Target(model)
    cache = target.make_cache()
    mx.eval(target.forward(mx.array(np.arange(prefix) % 1000), cache, last_only=True)[0])
    mx.eval([c.state for c in cache])
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    logits, _ = target.verify(tree, cache)
    mx.eval(logits)
    target.commit(cache, prefix, [0] + tree.path(len(tree) - 1))
    mx.eval([c.state for c in cache])
    Qwen3Next.recurrent_commit = "auto"
    return mx.get_peak_memory() - base


def check_lossless(model) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import byte_tokenizer, mlx_lm_greedy, tiny_drafter
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from treeflash_mlx import stream_generate

    drafter = tiny_drafter(model)
    prompt = list(range(40, 72))
    ours = [r.token for r in stream_generate(model, TokenizerWrapper(byte_tokenizer()), prompt, 24, drafter=drafter,
                                             tree_size=16)]
    print(f"greedy output equals mlx-lm's at these shapes: {ours == mlx_lm_greedy(model, prompt, 24)}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--prefix", type=int, default=256)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--no-check", action="store_true", help="skip the output check against mlx-lm")
    args = p.parse_args()
    model = build(args.layers)
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    n_linear = sum(layer.is_linear for layer in model.layers)
    rng = np.random.default_rng(0)
    trees = {"chain": chain_tree(args.nodes, 248320, rng), "tree": bushy_tree(args.nodes, 248320, rng)}
    print(f"random Qwen3.5-0.8B shapes, {args.layers} layers ({n_linear} Gated DeltaNet), {params / 1e6:.0f}M "
          f"parameters, float32, {args.prefix} cached tokens, median of {args.repeats}")
    t = time_passes(model, trees, args.prefix, args.repeats)
    rec = time_recurrence(model, trees, args.repeats)
    print(f"plain mlx-lm step: {t['step'] * 1e3:.1f} ms")
    for name, tree in trees.items():
        for commit_by in gated_delta.COMMITS:
            s = t[(name, commit_by)]
            print(f"{name:5s} of {len(tree)} (depth {int(tree.depths.max())}), commit {commit_by:6s}: "
                  f"{s * 1e3:7.1f} ms = {s / t['step']:5.2f} steps")
        print(f"{name:5s} recurrence alone ({n_linear} layers): {rec[name] * 1e3:6.1f} ms")
    for commit_by in gated_delta.COMMITS:
        print(f"tree / chain, commit {commit_by}: {t[('tree', commit_by)] / t[('chain', commit_by)]:.3f}x")
    for name, tree in trees.items():
        for commit_by in gated_delta.COMMITS:
            m = round_memory(model, tree, args.prefix, commit_by)
            print(f"memory of a {name} round, commit {commit_by}: {m / 2**20:7.1f} MiB "
                  f"({m / len(tree) / 2**20:5.2f} MiB per node)")
    if not args.no_check:
        check_lossless(model)


if __name__ == "__main__":
    main()
