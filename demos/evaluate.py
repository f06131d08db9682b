"""Measure the demo pair on the held-out prompts: τ per drafting mode and speed against plain decoding.

    python demos/evaluate.py [--prompts 16] [--max-tokens 128] [--tree-size 16 --draft-top-m 8 --draft-vocab 64]

Every number comes from `python -m treeflash_mlx.generate --json` (greedy), the modes interleaved prompt by
prompt so that machine noise hits all of them alike. Prints a Markdown table.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

MODES = ["ar", "chain", "marginal", "treeflash"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--tree-size", type=int, default=16)
    p.add_argument("--draft-top-m", type=int, default=8)
    p.add_argument("--draft-vocab", type=int, default=64)
    p.add_argument("--file", type=Path, default=Path(__file__).parent / "heldout_prompts.jsonl")
    args = p.parse_args()
    prompts = [json.loads(line)["prompt"] for line in args.file.read_text().splitlines()][: args.prompts]
    results = {m: [] for m in MODES}
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for i, prompt in enumerate(prompts):
        for mode in MODES:
            cmd = [sys.executable, "-m", "treeflash_mlx.generate", "--prompt", prompt, "--json", "--mode", mode,
                   "--max-tokens", str(args.max_tokens), "--tree-size", str(args.tree_size),
                   "--draft-top-m", str(args.draft_top_m), "--draft-vocab", str(args.draft_vocab)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
            results[mode].append(json.loads(out))
        print(f"prompt {i + 1}/{len(prompts)} done", file=sys.stderr)
    reference = [r["tokens"] for r in results["ar"]]
    ar_tps = np.mean([r["generation_tps"] for r in results["ar"]])
    print("| mode | mean τ | tokens/s | speed-up vs ar | identical to ar |")
    print("|---|---:|---:|---:|---:|")
    for mode in MODES:
        rs = results[mode]
        taus = [t for r in rs for t in r["acceptance_lengths"]]
        tps = np.mean([r["generation_tps"] for r in rs])
        same = sum(r["tokens"] == ref for r, ref in zip(rs, reference))
        print(f"| {mode} | {np.mean(taus):.2f} | {tps:.1f} | {tps / ar_tps:.2f}x | {same}/{len(rs)} |")


if __name__ == "__main__":
    main()
