#!/usr/bin/env bash
# Train the shipped TreeFlash drafter for Qwen2.5-Coder-0.5B-Instruct (docs/training.md tells the choices).
#
#   bash demos/qwen-coder/train.sh TARGET_F32_DIR [extra train flags]
#
# TARGET_F32_DIR: the target converted to float32 (mlx_lm convert --dtype float32). Work files (answers,
# features, labels, checkpoints, the τ curve) go to ${TREEFLASH_WORK:-~/.cache/treeflash-work}/qwen-coder, outside
# the repository; run the same command again after an interruption and it resumes. The held-out τ curve
# replays the first 20 HumanEval problems, the prompts docs/benchmarks.md's benchmark runs; HumanEval never trains.
set -euo pipefail
cd "$(dirname "$0")/../.."
target="${1:?usage: train.sh TARGET_F32_DIR [train flags]}"; shift
work="${TREEFLASH_WORK:-$HOME/.cache/treeflash-work}/qwen-coder"
humaneval="${TREEFLASH_MODELS:-$HOME/.cache/treeflash-models}/humaneval/HumanEval.jsonl"
mkdir -p "$work"
[ -f "$work/prompts.jsonl" ] || python demos/qwen-coder/make_prompts.py --out "$work/prompts.jsonl" --humaneval "$humaneval"
[ -f "$work/heldout.jsonl" ] || python - "$humaneval" "$work/heldout.jsonl" <<'PY'
import json, sys
from treeflash_mlx.loading import humaneval_messages
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
with open(sys.argv[2], "w") as f:
    for r in rows[:20]:
        f.write(json.dumps({"messages": humaneval_messages(r["prompt"])}) + "\n")
PY
python -m treeflash_mlx.train --model "$target" --data "$work/prompts.jsonl" --eval-data "$work/heldout.jsonl" \
    --eval-prompts 20 --eval-tokens 128 --out "$work/drafter" --work-dir "$work/run" \
    --layers 2 --intermediate-size 2432 --block-size 8 --target-layer-ids 1,8,15,22 --sub-vocab-size 16384 \
    --num-prompts 768 --prompt-tokens 384 --gen-tokens 256 --gen-batch 48 --label-top-k 32 \
    --steps 1600 --batch 4 --anchors 32 --lr 8e-4 --save-every 50 --eval-every 100 \
    --save-dtype bfloat16 "$@"
