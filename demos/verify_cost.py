"""How much one tree verification costs next to one plain decoding step, on this machine.

    python demos/verify_cost.py [--hidden 768 --layers 12 --vocab 32000] [--sizes 1,16,32,64] [--prefix 256]
    python demos/verify_cost.py --model TARGET_DIR --prefix 512,2048,8192 --compare-kernels

Builds a random float32 Qwen3 target (~120M parameters by default), or loads ``--model``, and times tree
verifications of n nodes after ``--prefix`` cached tokens, interleaved with mlx-lm's own one-token steps.
Speculative decoding pays only when τ exceeds these ratios (plus the drafting cost). ``--compare-kernels``
times every verification twice, interleaved, with MLX's own attention and SwiGLU and with ours (cpu_kernels.py).
"""

import argparse
import time

import treeflash_mlx  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import qwen3

from treeflash_mlx.benchmark import bushy_tree, verify_costs
from treeflash_mlx.loading import load
from treeflash_mlx.target import Target

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--model", default=None, help="an mlx-lm target (default: a random Qwen3 of the sizes below)")
p.add_argument("--hidden", type=int, default=768)
p.add_argument("--layers", type=int, default=12)
p.add_argument("--vocab", type=int, default=32000)
p.add_argument("--sizes", default="1,16,32,64")
p.add_argument("--repeats", type=int, default=20)
p.add_argument("--prefix", default="256", help="cached tokens before the step / the tree (comma-separated list)")
p.add_argument("--compare-kernels", action="store_true", help="MLX's own attention and SwiGLU against ours, interleaved")
args = p.parse_args()
if args.model:
    model = load(args.model)[0]
    about = args.model
else:
    h = args.hidden
    model = qwen3.Model(qwen3.ModelArgs(
        model_type="qwen3", hidden_size=h, num_hidden_layers=args.layers, intermediate_size=int(h * 8 / 3),
        num_attention_heads=h // 64, num_key_value_heads=max(1, h // 256), head_dim=64, rms_norm_eps=1e-6,
        vocab_size=args.vocab, max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False))
    mx.eval(model.parameters())
    about = "random Qwen3"
vocab = model.args.vocab_size
rng = np.random.default_rng(0)
sizes = [int(s) for s in args.sizes.split(",")]
trees = {n: bushy_tree(n, vocab, rng) for n in sizes}
params = sum(v.size for _, v in tree_flatten(model.parameters()))
print(f"target: {about}, {params / 1e6:.0f}M parameters, median of {args.repeats}")


def compare_kernels(prefix: int) -> None:
    target = Target(model)
    cache = target.make_cache()
    mx.eval(target.forward(mx.array(rng.integers(0, vocab, prefix)), cache, last_only=True)[0])
    times = {}
    for repeat in range(args.repeats + 1):  # the first pass compiles kernels and is dropped
        for ours in (False, True):
            target.cpu_kernels = ours
            for n, tree in trees.items():
                tic = time.perf_counter()
                mx.eval(target.verify(tree, cache)[0])
                if repeat:
                    times.setdefault((ours, n), []).append(time.perf_counter() - tic)
                for c in cache:
                    c.offset = prefix
    for n in sizes:
        mlx_s, ours_s = np.median(times[(False, n)]), np.median(times[(True, n)])
        print(f"{prefix:6d} cached, verify {n:3d} nodes: MLX's kernels {mlx_s * 1e3:7.1f} ms, "
              f"ours {ours_s * 1e3:7.1f} ms ({mlx_s / ours_s:4.2f}x)")


for prefix in (int(x) for x in args.prefix.split(",")):
    if args.compare_kernels:
        compare_kernels(prefix)
        continue
    costs = verify_costs(model, trees, prefix, repeats=args.repeats)
    print(f"{prefix}-token prefix: mlx-lm one-token step {costs['step'] * 1e3:7.1f} ms")
    for n in sizes:
        print(f"verify {n:3d} nodes:     {costs[n] * 1e3:7.1f} ms = {costs[n] / costs['step']:5.2f}x the mlx-lm step")
