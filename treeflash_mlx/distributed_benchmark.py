"""Plain decoding vs TreeFlash with the target sharded over the ranks of ``mlx.launch``, against the same on one
process (docs/distributed.md):

    mlx.launch --backend ring -n 2 --python PY -- -m treeflash_mlx.distributed_benchmark [--model M --drafter D]

One interleaved run: each repetition times, prompt by prompt, plain decoding and TreeFlash on the whole target in
rank 0 alone (the other ranks wait at a barrier), then both on the shards over every rank. Rank 0 prints tokens per
second, the speed-ups over plain decoding, and the collectives' share of a sharded step: one collective of a
step's shape, timed on its own, times the collectives a target pass makes, over the step's time.
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
from .generate import add_distributed_arguments
from .loading import demo_paths, load
from .speculative import RoundStats, stream_generate
from .target import Target
from .validation import integer


def barrier() -> None:
    mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))


def speed(model, tokenizer, drafter, prompt, mode, args, stats=None) -> tuple[float, int, list[int]]:
    """(seconds, tokens, acceptance lengths) of one greedy generation; ``drafter`` None: plain decoding."""
    drafting = make_drafting(drafter, Target(model), mode if drafter is not None else "ar", **drafting_settings(args))
    responses = list(stream_generate(model, tokenizer, prompt, args.max_tokens, drafter=drafting, stats=stats))
    last = responses[-1]
    taus = list({r.round: r.acceptance_length for r in responses if r.round > 0}.values())
    return last.generation_tokens / last.generation_tps, last.generation_tokens, taus


def collectives_per_pass(model) -> int:
    """The all_sums one pass of a sharded target makes: one per sharded-to-all linear (tensor parallelism), and
    the hand-over's one all_sum for a pipeline."""
    count = sum(isinstance(m, (ShardedToAllLinear, QuantizedShardedToAllLinear)) for _, m in model.named_modules())
    return count + (1 if getattr(model.model, "pipeline_size", 1) > 1 else 0)


def all_sum_seconds(nodes: int, hidden: int, dtype, repeats: int = 20) -> float:
    """One all_sum of a (1, nodes, hidden) array, timed alone (each waited for, as in a pass's chain of layers)."""
    x = mx.ones((1, nodes, hidden), dtype=dtype)
    mx.eval(mx.distributed.all_sum(x))
    tic = time.perf_counter()
    for _ in range(repeats):
        mx.eval(mx.distributed.all_sum(x))
    return (time.perf_counter() - tic) / repeats


def measure(args: argparse.Namespace) -> None:
    group = distributed.world()
    main = group.rank() == 0
    if group.size() < 2:
        raise ValueError("run this under mlx.launch with 2 or more processes (see docs/distributed.md)")
    integer("--repeats", args.repeats, low=1)
    integer("--num-prompts", args.num_prompts, low=1)
    args.model, args.drafter = demo_paths(args.model, args.drafter)
    model, tokenizer, drafter = load(args.model, args.drafter, pipeline=args.pipeline)
    mode = args.mode or default_mode(drafter)
    prompts = read_prompts(args.prompts, None, tokenizer, args.num_prompts)
    whole = None
    if main and not args.skip_single:  # the baseline: the whole target on rank 0 alone, in the same run
        from mlx_lm.utils import load as mlx_load

        whole, _ = mlx_load(str(resolve(args.model, MODEL_FILES, "model")))
    times = {key: [0.0, 0] for key in ("single plain", "single tree", "sharded plain", "sharded tree")}
    taus: list[int] = []
    for _ in range(args.repeats):
        for prompt in prompts:
            if whole is not None:
                for key, d in (("single plain", None), ("single tree", drafter)):
                    seconds, n, _ = speed(whole, tokenizer, d, prompt, mode, args)
                    times[key][0] += seconds
                    times[key][1] += n
            barrier()  # the other ranks wait here while rank 0 runs alone
            for key, d in (("sharded plain", None), ("sharded tree", drafter)):
                seconds, n, t = speed(model, tokenizer, d, prompt, mode, args)
                times[key][0] += seconds
                times[key][1] += n
                taus += t if d is not None else []
    stats = RoundStats()  # one profiled sharded generation: the rounds' time and tree sizes
    _, _, round_taus = speed(model, tokenizer, drafter, prompts[0], mode, args, stats=stats)
    nodes = int(np.mean([r.nodes for r in stats.rounds])) if stats.rounds else 1
    target = Target(model)
    dtype = target.embed_tokens(mx.array([0])).dtype
    per_pass = collectives_per_pass(model)
    step_cost = all_sum_seconds(1, target.hidden_size, dtype) * per_pass
    round_cost = all_sum_seconds(nodes, target.hidden_size, dtype) * per_pass + 2 * all_sum_seconds(1, 1, mx.int32)
    if not main:
        return
    tps = {key: n / s if s else float("nan") for key, (s, n) in times.items()}
    round_seconds = sum(stats.seconds.values()) / max(len(stats.rounds), 1)
    plain_step = times["sharded plain"][0] / max(times["sharded plain"][1], 1)
    print(f"{group.size()} ranks ({'pipeline' if args.pipeline else 'tensor'} parallel), {mode}, "
          f"{len(prompts)} prompts x {args.repeats} repeats, {args.max_tokens} tokens each, greedy")
    print(f"{'':<10}{'plain tok/s':>12}{'tree tok/s':>12}{'speed-up':>10}")
    for where in ("single", "sharded"):
        if times[f"{where} plain"][1]:
            plain, tree = tps[f"{where} plain"], tps[f"{where} tree"]
            print(f"{where:<10}{plain:>12.1f}{tree:>12.1f}{tree / plain:>9.2f}x")
    if taus:
        print(f"acceptance (sharded): {np.mean(taus):.2f} tokens per target pass over {len(taus)} rounds")
    print(f"collectives: {per_pass} all_sums per target pass; plain step: {1e3 * step_cost:.2f} ms of "
          f"{1e3 * plain_step:.2f} ms ({100 * step_cost / plain_step:.0f}%); tree round ({nodes} nodes, with the "
          f"2 broadcasts of tree and path): {1e3 * round_cost:.2f} ms of {1e3 * round_seconds:.2f} ms "
          f"({100 * round_cost / round_seconds:.0f}%)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m treeflash_mlx.distributed_benchmark", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="target (default: the bundled demo pair)")
    p.add_argument("--drafter", default=None, help="drafter for the target")
    p.add_argument("--prompts", default="code", help="code, math, chat, humaneval or a JSONL file (default: code)")
    p.add_argument("--num-prompts", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="interleaved repetitions (default: 2)")
    p.add_argument("--skip-single", action="store_true",
                   help="no single-process baseline (a target too large for one machine)")
    add_drafting_arguments(p)
    add_distributed_arguments(p)
    return p


def run(args: argparse.Namespace) -> None:
    with distributed.rank0_prints():
        distributed.set_rank_timeout(args.rank_timeout)
        measure(args)


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
