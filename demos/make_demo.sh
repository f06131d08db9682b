#!/usr/bin/env bash
# Rebuild the bundled demo models from scratch on any machine with Python (about 1.5 hours on 2 CPU cores).
# Every step is resumable: after an interruption, run this script again.
set -euo pipefail
cd "$(dirname "$0")/.."
python demos/train_target.py --minutes 40                       # treeflash_mlx/demo/target (5-layer Qwen3)
python demos/train_drafter.py                                    # treeflash_mlx/demo/drafter (1-layer TreeFlash)
python demos/train_target.py --layers 1 --minutes 6 --tokenizer treeflash_mlx/demo/target \
    --out treeflash_mlx/demo/draft-model --work demos/work/draft-model   # mlx-lm --draft-model baseline
python demos/make_prompts.py > demos/heldout_prompts.jsonl       # held-out evaluation prompts
python demos/evaluate.py                                         # docs/benchmarks.md's table
