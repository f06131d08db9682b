"""How much one tree verification costs next to one plain decoding step, on this machine.

    python demos/verify_cost.py [--hidden 768 --layers 12 --vocab 32000] [--sizes 1,16,32,64]

Builds a random float32 Qwen3 target (~120M parameters by default) with a 256-token prefix and times tree
verifications of n nodes interleaved with mlx-lm's own one-token steps. Speculative decoding pays only
when τ exceeds these ratios (plus the drafting cost).
"""

import argparse

import treeflash_mlx  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import qwen3

from treeflash_mlx.benchmark import bushy_tree, verify_costs

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--hidden", type=int, default=768)
p.add_argument("--layers", type=int, default=12)
p.add_argument("--vocab", type=int, default=32000)
p.add_argument("--sizes", default="1,16,32,64")
p.add_argument("--repeats", type=int, default=20)
p.add_argument("--prefix", type=int, default=256, help="cached tokens before the step / the tree")
args = p.parse_args()
h = args.hidden
model = qwen3.Model(qwen3.ModelArgs(
    model_type="qwen3", hidden_size=h, num_hidden_layers=args.layers, intermediate_size=int(h * 8 / 3),
    num_attention_heads=h // 64, num_key_value_heads=max(1, h // 256), head_dim=64, rms_norm_eps=1e-6,
    vocab_size=args.vocab, max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=False))
mx.eval(model.parameters())
rng = np.random.default_rng(0)
sizes = [int(s) for s in args.sizes.split(",")]
costs = verify_costs(model, {n: bushy_tree(n, args.vocab, rng) for n in sizes}, args.prefix, repeats=args.repeats)
params = sum(v.size for _, v in tree_flatten(model.parameters()))
print(f"target: random Qwen3, {params / 1e6:.0f}M parameters, float32, {args.prefix}-token prefix, median of {args.repeats}")
print(f"mlx-lm one-token step: {costs['step'] * 1e3:7.1f} ms")
for n in sizes:
    print(f"verify {n:3d} nodes:     {costs[n] * 1e3:7.1f} ms = {costs[n] / costs['step']:5.2f}x the mlx-lm step")
