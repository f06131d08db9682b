"""How much one tree verification costs next to one plain decoding step, on this machine.

    python demos/verify_cost.py [--hidden 768 --layers 12 --vocab 32000] [--sizes 1,16,32,64]

Builds a random float32 qwen3 target (~130M parameters by default), fills a 256-token prefix, then times
verification passes of n tree nodes (a random tree, per-token positions, ancestor mask) interleaved with
one-token steps, and prints the ratios. Speculative decoding pays only when τ exceeds these ratios.
"""

from __future__ import annotations

import argparse
import time

import treeflash_mlx  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import qwen3

from treeflash_mlx.target import Target
from treeflash_mlx.tree import best_first


def random_tree(n: int, rng: np.random.Generator, vocab: int):
    depth, rows, k = 15, 8, 8
    logp = np.sort(np.log(rng.dirichlet(np.ones(k), size=(depth, rows))), axis=-1)[..., ::-1].copy()
    tokens = rng.integers(0, vocab, size=(depth, rows, k))
    return best_first(0, tokens, logp, rng.integers(-1, rows, size=(depth, rows, k)), n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--sizes", default="1,16,32,64")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    h = args.hidden
    model = qwen3.Model(qwen3.ModelArgs(
        model_type="qwen3", hidden_size=h, num_hidden_layers=args.layers, intermediate_size=int(h * 8 / 3),
        num_attention_heads=h // 64, num_key_value_heads=max(1, h // 256), head_dim=64, rms_norm_eps=1e-6,
        vocab_size=args.vocab, max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=False))
    mx.eval(model.parameters())
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    target = Target(model)
    cache = target.make_cache()
    rng = np.random.default_rng(0)
    logits, _ = target.forward(mx.array(rng.integers(0, args.vocab, 256)), cache, last_only=True)
    mx.eval(logits)
    start = cache[0].offset
    sizes = [int(s) for s in args.sizes.split(",")]
    trees = {n: random_tree(n, rng, args.vocab) for n in sizes}
    times = {n: [] for n in ["mlx-lm", *sizes]}
    for rep in range(args.repeats + 2):  # interleaved, so machine noise hits every size alike
        tic = time.perf_counter()
        mx.eval(model(mx.array([[1]]), cache=cache))  # mlx-lm's own one-token step
        if rep >= 2:
            times["mlx-lm"].append(time.perf_counter() - tic)
        for c in cache:
            c.offset = start
        for n in sizes:
            tree = trees[n]
            tic = time.perf_counter()
            logits, _ = target.forward(mx.array(tree.tokens), cache, positions=start + tree.depths,
                                       parents_mask=tree.ancestor_mask())
            mx.eval(logits)
            if rep >= 2:  # the first passes compile kernels
                times[n].append(time.perf_counter() - tic)
            for c in cache:  # drop the tree again
                c.offset = start
    base = np.median(times["mlx-lm"])
    print(f"target: qwen3 {params / 1e6:.0f}M parameters float32, prefix {start} tokens, "
          f"median of {args.repeats}")
    print(f"mlx-lm one-token step: {base * 1e3:7.1f} ms")
    for n in sizes:
        t = np.median(times[n])
        print(f"verify {n:3d} nodes:     {t * 1e3:7.1f} ms = {t / base:5.2f}x the mlx-lm step")


if __name__ == "__main__":
    main()
