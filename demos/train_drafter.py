"""Train the demo drafter: a 1-layer TreeFlash drafter (backbone + AR head) for the 5-layer demo target.

    python demos/train_drafter.py            # run again after an interruption: it resumes

Prompts are windows of the same stdlib files the target was trained on (never the held-out ones); the
target's own greedy continuations are the training data. Extra arguments go to `python -m treeflash_mlx.train`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_target import stdlib_files  # noqa: E402

import treeflash_mlx  # noqa: E402,F401
from treeflash_mlx.train import build_parser, train  # noqa: E402

args = build_parser().parse_args([
    "--model", "treeflash_mlx/demo/target",
    "--data", *map(str, stdlib_files()[0]),
    "--out", "treeflash_mlx/demo/drafter",
    "--work-dir", "demos/work/drafter",
    "--layers", "1", "--block-size", "16", "--target-layer-ids", "0,2,4",
    "--num-prompts", "2000", "--prompt-tokens", "48", "--gen-tokens", "192",
    "--steps", "3000", "--batch", "4", "--anchors", "16", "--lr", "1e-3",
    "--eval-prompts", "16", "--eval-tokens", "96",
    *sys.argv[1:],
])
train(args)
