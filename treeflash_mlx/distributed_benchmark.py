"""Plain decoding vs TreeFlash with the target sharded over the ranks of ``mlx.launch``, against the same on one
process (docs/distributed.md):

    mlx.launch --backend ring -n 2 --python PY -- -m treeflash_mlx.distributed_benchmark [--model M --drafter D]

One interleaved run: each repetition times, prompt by prompt, plain decoding and TreeFlash on the whole target in
rank 0 alone (the other ranks wait at a barrier), then both on the shards over every rank. Rank 0 prints tokens per
second, the speed-ups over plain decoding (mlx-lm's own, sharded or not), and the collectives' share of a sharded
step: the all_sums a target pass makes (timed in a chain of the step's shape) and the broadcasts that keep the
ranks on rank 0's trees and paths, over the step's time.
"""

from __future__ import annotations

import argparse
import sys
import time

import mlx.core as mx
import numpy as np
from mlx.nn.layers.distributed import QuantizedShardedToAllLinear, ShardedToAllLinear

from . import distributed
from ._cli import add_drafting_arguments, drafting_settings, run_cli
from .benchmark import read_prompts
from .checkpoints import MODEL_FILES, resolve
from .drafting import default_mode, make_drafting
from .loading import demo_paths, load
from .speculative import stream_generate
from .target import Target
from .validation import integer


def barrier() -> None:
    mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))


def plain_speed(model, tokenizer, prompt, max_tokens: int) -> tuple[float, int]:
    """(seconds, tokens) of mlx-lm's own greedy decoding (on shards: mlx-lm's sharded decoding)."""
    from mlx_lm.generate import stream_generate as mlx_lm_stream_generate

    last = list(mlx_lm_stream_generate(model, tokenizer, prompt, max_tokens=max_tokens))[-1]
    return last.generation_tokens / last.generation_tps, last.generation_tokens


def tree_speed(model, tokenizer, drafter, prompt, mode, args, max_tokens: int) -> tuple[float, int, list[int]]:
    """(seconds, tokens, acceptance lengths) of one greedy TreeFlash generation."""
    drafting = make_drafting(drafter, Target(model), mode, **drafting_settings(args))
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens, drafter=drafting))
    last = responses[-1]
    taus = list({r.round: r.acceptance_length for r in responses if r.round > 0}.values())
    return last.generation_tokens / last.generation_tps, last.generation_tokens, taus


def collectives_per_pass(model) -> int:
    """The all_sums one pass of a sharded target makes: one per sharded-to-all linear (tensor parallelism), and
    the hand-over's one for a pipeline (plus its sends, not counted)."""
    count = sum(isinstance(m, (ShardedToAllLinear, QuantizedShardedToAllLinear)) for _, m in model.named_modules())
    return count + (1 if getattr(model.model, "pipeline_size", 1) > 1 else 0)


def chained_all_sum_seconds(nodes: int, hidden: int, dtype, count: int = 32) -> float:
    """One all_sum of a (1, nodes, hidden) array inside a chain of them evaluated at once, as a pass's layers
    make them: the collective's own cost, without the wait for the slowest rank at the start of an eval."""
    x = mx.ones((1, nodes, hidden), dtype=dtype)
    mx.eval(mx.distributed.all_sum(x))
    tic = time.perf_counter()
    for _ in range(count):
        x = mx.distributed.all_sum(x) * 0.5
    mx.eval(x)
    return (time.perf_counter() - tic) / count


class Tally:
    def __init__(self):
        self.seconds, self.tokens, self.taus = 0.0, 0, []

    def add(self, seconds: float, tokens: int, taus: list[int] = ()) -> None:
        self.seconds += seconds
        self.tokens += tokens
        self.taus += list(taus)

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


def measure(args: argparse.Namespace) -> None:
    group = distributed.world()
    main = group.rank() == 0
    if group.size() < 2:
        raise ValueError("run this under mlx.launch with 2 or more processes (see docs/distributed.md)")
    integer("--repeats", args.repeats, low=1)
    integer("--num-prompts", args.num_prompts, low=1)
    integer("--max-tokens", args.max_tokens, low=1)
    args.model, args.drafter = demo_paths(args.model, args.drafter)
    model, tokenizer, drafter = load(args.model, args.drafter, pipeline=args.pipeline)
    if drafter is None:
        raise ValueError("the benchmark compares TreeFlash with plain decoding: pass --drafter with --model")
    mode = args.mode or default_mode(drafter)
    prompts = read_prompts(args.prompts, None, tokenizer, args.num_prompts)
    whole = None
    if main and not args.skip_single:  # the baseline: the whole target on rank 0 alone, in the same run
        from mlx_lm.utils import load as mlx_load

        whole, _ = mlx_load(str(resolve(args.model, MODEL_FILES, "model")))
    runs = {key: Tally() for key in ("single plain", "single tree", "sharded plain", "sharded tree")}
    for rep in range(args.repeats + 1):  # the first repetition warms up (a few tokens, not counted)
        tokens = args.max_tokens if rep else min(8, args.max_tokens)
        if rep == 1:
            distributed.broadcasts.reset()
        for prompt in prompts[: len(prompts) if rep else 1]:
            if whole is not None:
                single = (plain_speed(whole, tokenizer, prompt, tokens),
                          tree_speed(whole, tokenizer, drafter, prompt, mode, args, tokens))
            barrier()  # the other ranks wait here while rank 0 runs alone
            sharded = (plain_speed(model, tokenizer, prompt, tokens),
                       tree_speed(model, tokenizer, drafter, prompt, mode, args, tokens))
            if rep:
                for where, (plain, tree) in (("sharded", sharded),) + ((("single", single),) if whole else ()):
                    runs[f"{where} plain"].add(*plain)
                    runs[f"{where} tree"].add(*tree)
    target = Target(model)
    dtype = target.embed_tokens(mx.array([0])).dtype
    per_pass = collectives_per_pass(model)
    tree = runs["sharded tree"]
    nodes = drafting_settings(args).get("tree_size") or make_drafting(drafter, target, mode).max_nodes()
    pass_cost = {n: per_pass * chained_all_sum_seconds(n, target.hidden_size, dtype) for n in (1, nodes)}
    if not main:
        return
    plain_step = runs["sharded plain"].seconds / runs["sharded plain"].tokens
    round_seconds = tree.seconds / len(tree.taus)
    agree = distributed.broadcasts.seconds / len(tree.taus)
    print(f"{group.size()} ranks ({'pipeline' if args.pipeline else 'tensor'} parallel), {mode}, {len(prompts)} "
          f"prompts x {args.repeats} interleaved repeats, {args.max_tokens} tokens each, greedy; plain: mlx-lm's")
    print(f"{'':<9}{'plain tok/s':>12}{'tree tok/s':>12}{'speed-up':>10}")
    for where in ("single", "sharded"):
        plain, ours = runs[f"{where} plain"], runs[f"{where} tree"]
        if plain.tokens:
            print(f"{where:<9}{plain.tps:>12.1f}{ours.tps:>12.1f}{ours.tps / plain.tps:>9.2f}x")
    print(f"acceptance (sharded): {np.mean(tree.taus):.2f} tokens per round over {len(tree.taus)} rounds")
    print(f"collectives in a target pass ({per_pass} all_sums, timed in a chain): plain step "
          f"{1e3 * pass_cost[1]:.2f} ms of {1e3 * plain_step:.2f} ms ({100 * pass_cost[1] / plain_step:.0f}%); "
          f"tree round ({nodes} nodes) {1e3 * pass_cost[nodes]:.2f} ms of {1e3 * round_seconds:.2f} ms "
          f"({100 * pass_cost[nodes] / round_seconds:.0f}%)")
    print(f"rank 0's broadcasts of trees and paths: {1e3 * agree:.2f} ms a round ({100 * agree / round_seconds:.0f}%)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m treeflash_mlx.distributed_benchmark",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="target (default: the bundled demo pair)")
    p.add_argument("--drafter", default=None, help="drafter for the target")
    p.add_argument("--prompts", default="code", help="code, math, chat, humaneval or a JSONL file (default: code)")
    p.add_argument("--num-prompts", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="interleaved repetitions (default: 2)")
    p.add_argument("--skip-single", action="store_true",
                   help="no single-process baseline (a target too large for one machine)")
    add_drafting_arguments(p)
    distributed.add_arguments(p)
    return p


def run(args: argparse.Namespace) -> None:
    with distributed.rank0_prints():
        distributed.set_rank_timeout(args.rank_timeout)
        measure(args)


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
