"""One rank of the distributed tests (tests/test_distributed.py), started by ``mlx.launch``.

``python distributed_worker.py SPEC OUT``: SPEC is a JSON file of cases, each ``{"name", "model", "drafter",
"pipeline", "modes", "prompt", "max_tokens", "temp", "seed", "tree_size", "reference", "probe"}``; this rank
writes ``OUT/rank<r>.json`` with, per case, the layers and attention heads it holds and, per mode, the tokens it
committed (and with ``reference``, mlx-lm's own greedy tokens from the same sharded model; with ``probe``, one
tree verification's logits and features). ``"rank1_tree_size"`` makes rank 1 draft trees of another size than
rank 0's. ``"hang_after"``/``"exit_after"`` N in a case makes rank 1 stop answering (sleep) or die after its
N-th token, to test how the other ranks end.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import treeflash_mlx  # noqa: F401  (loads the fast BLAS before mlx)
import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from treeflash_mlx import distributed
from treeflash_mlx.loading import load
from treeflash_mlx.speculative import stream_generate
from treeflash_mlx.target import Target


def mlx_lm_greedy(model, prompt: list[int], n: int) -> list[int]:
    from mlx_lm.generate import generate_step

    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n)]


def probe(model, tokenizer, drafter, prompt: str) -> dict:
    """One verification of a fixed branching tree after ``prompt``: its logits and the features the drafter reads."""
    import numpy as np

    from treeflash_mlx.tree import DraftTree

    target = Target(model)
    cache = target.make_cache()
    capture = list(drafter.args.target_layer_ids)
    mx.eval(target.forward(mx.array(tokenizer.encode(prompt)), cache, capture))  # each pass evaluated, as the loop does
    tree = DraftTree(np.array([5, 6, 7, 8, 9]), np.array([-1, 0, 0, 1, 1]), np.array([0, 1, 1, 2, 2]))
    logits, features = target.verify(tree, cache, capture)
    return {"logits": logits.tolist(), "features": features.tolist()}


def run_case(case: dict, rank: int) -> dict:
    model, tokenizer, drafter = load(case["model"], case.get("drafter"), pipeline=case.get("pipeline", False))
    distributed.set_rank_timeout(case.get("rank_timeout", 60))
    target = Target(model)  # what this rank holds: its layers, and each layer's attention heads
    attn = next(layer.self_attn for layer in target.layers if "self_attn" in layer)
    out = {"layers": len(target.layers), "heads": getattr(attn, "n_heads", None) or attn.num_attention_heads}
    for mode in case["modes"]:
        if case.get("seed") is not None:
            mx.random.seed(case["seed"] + rank * 1000)  # a different seed per rank: rank 0's must win
        tokens = []
        tree_size = case.get("rank1_tree_size") if rank == 1 else None  # a rank drafting other trees than rank 0
        tree_size = tree_size or case.get("tree_size")
        kwargs = {"tree_size": tree_size} if tree_size and mode != "ar" else {}
        rounds = {}
        for r in stream_generate(model, tokenizer, case["prompt"], case["max_tokens"],
                                 drafter=drafter if mode != "ar" else None, mode=mode,
                                 sampler=make_sampler(case.get("temp", 0.0)), **kwargs):
            tokens.append(r.token)
            rounds[r.round] = r.acceptance_length
            if rank == 1 and len(tokens) == case.get("hang_after"):
                time.sleep(3600)
            if rank == 1 and len(tokens) == case.get("exit_after"):
                os._exit(3)
        out[mode] = tokens
        out[f"{mode} acceptance"] = [tau for n, tau in rounds.items() if n > 0]
    if case.get("probe"):
        out["probe"] = probe(model, tokenizer, drafter, case["prompt"])
    if case.get("reference"):
        out["mlx_lm"] = mlx_lm_greedy(model, tokenizer.encode(case["prompt"]), case["max_tokens"])
    return out


def main() -> None:
    spec, out_dir = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    group = distributed.world()
    results = {case["name"]: run_case(case, group.rank()) for case in spec}
    (out_dir / f"rank{group.rank()}.json").write_text(json.dumps({"size": group.size(), "results": results}))


if __name__ == "__main__":
    main()
