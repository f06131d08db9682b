"""Train the demo target from scratch: a small Qwen3 on the Python standard library's own sources.

    python demos/train_target.py --minutes 40
    python demos/train_target.py --layers 1 --minutes 10 --tokenizer treeflash_mlx/demo/target \
        --out treeflash_mlx/demo/draft-model --work demos/work/draft-model   # the draft-model baseline

Every machine with Python has this text, so the demo is reproducible anywhere. Steps:
1. gather the stdlib ``.py`` files (not ``encodings/``, not the test suites); every 50th file is held out,
   so that the demo's evaluation prompts come from code the models never saw;
2. train a byte-level BPE tokenizer (4096 tokens) with a chat template;
3. train the model (AdamW, cosine schedule) for a time budget, checkpointing so that an
   interrupted run resumes where it stopped (run the same command again; state in ``demos/work/``);
4. write an mlx-lm model directory that ``mlx_lm.load`` and ``treeflash_mlx`` open offline.
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path

import treeflash_mlx  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import qwen3

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}# {{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}{{ m['content'] }}{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
)
CONFIG = dict(model_type="qwen3", hidden_size=256, num_hidden_layers=5, intermediate_size=768,
              num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6, vocab_size=4096,
              max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=True)


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of the standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"encodings", "test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    return [f for i, f in enumerate(files) if i % 50], [f for i, f in enumerate(files) if i % 50 == 0]


def train_tokenizer(files: list[Path], out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=CONFIG["vocab_size"], special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(f) for f in files], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return fast


def encode(tokenizer, files: list[Path]) -> np.ndarray:
    eos = tokenizer.eos_token_id
    ids = []
    for f in files:
        ids += tokenizer.encode(f.read_text(errors="replace")) + [eos]
    return np.array(ids, dtype=np.uint16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("treeflash_mlx/demo/target"))
    p.add_argument("--work", type=Path, default=Path("demos/work/target"))
    p.add_argument("--minutes", type=float, default=30.0, help="training time budget (all runs together)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"],
                   help="1-2 for the small autoregressive model of the draft-model baseline")
    p.add_argument("--tokenizer", type=Path, default=None, help="reuse this tokenizer instead of training one")
    args = p.parse_args()
    CONFIG["num_hidden_layers"] = args.layers
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    train_files, held_out = stdlib_files()
    if (work / "tokenizer.json").exists() or args.tokenizer:
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(args.tokenizer or work))
        tokenizer.save_pretrained(str(work))
    else:
        tokenizer = train_tokenizer(train_files, work)
    if not (work / "tokens.npy").exists():
        np.save(work / "tokens.npy", encode(tokenizer, train_files))
        (work / "held_out.json").write_text(json.dumps([str(f) for f in held_out]))
    data = np.load(work / "tokens.npy")
    print(f"{len(train_files)} training files, {len(data) / 1e6:.2f}M tokens; {len(held_out)} held out")

    mx.random.seed(args.seed)
    model = qwen3.Model(qwen3.ModelArgs(**CONFIG))
    optimizer = optim.AdamW(learning_rate=args.lr, weight_decay=0.1)
    state = {"step": 0, "seconds": 0.0}
    if (work / "state.json").exists():  # resume where the last run stopped
        state = json.loads((work / "state.json").read_text())
        model.load_weights(str(work / "model.safetensors"))
        optimizer.state = tree_unflatten(list(mx.load(str(work / "optimizer.safetensors")).items()))
        print(f"resuming at step {state['step']} ({state['seconds'] / 60:.1f} min done)")
    print(f"model: {sum(v.size for _, v in tree_flatten(model.parameters())) / 1e6:.2f}M parameters")
    rng = np.random.default_rng(args.seed + state["step"])
    loss_and_grad = nn.value_and_grad(model, lambda m, x, y: nn.losses.cross_entropy(m(x), y, reduction="mean"))

    def save():
        state["seconds"] = done + time.perf_counter() - tic
        mx.save_safetensors(str(work / "model.safetensors"), dict(tree_flatten(model.parameters())))
        mx.save_safetensors(str(work / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        (work / "state.json").write_text(json.dumps(state))

    budget, done = args.minutes * 60, state["seconds"]
    tic = last_save = time.perf_counter()
    losses = []
    while (elapsed := done + time.perf_counter() - tic) < budget:
        idx = rng.integers(0, len(data) - args.seq - 1, size=args.batch)
        batch = mx.array(np.stack([data[i : i + args.seq + 1] for i in idx]).astype(np.int32))
        warmup = min(1.0, (state["step"] + 1) / 200)
        optimizer.learning_rate = args.lr * warmup * (0.1 + 0.45 * (1 + math.cos(math.pi * elapsed / budget)))
        loss, grads = loss_and_grad(model, batch[:, :-1], batch[:, 1:])
        optimizer.update(model, grads)
        mx.eval(loss, model.parameters(), optimizer.state)
        losses.append(loss.item())
        state["step"] += 1
        if state["step"] % 50 == 0:
            print(f"step {state['step']:6d}  loss {np.mean(losses[-50:]):.3f}  "
                  f"{elapsed / 60:5.1f}/{args.minutes:.0f} min", flush=True)
        if time.perf_counter() - last_save > 120:
            save()
            last_save = time.perf_counter()
    save()
    held = encode(tokenizer, held_out)
    windows = [held[i : i + args.seq + 1] for i in range(0, len(held) - args.seq - 1, args.seq)][:64]
    batch = mx.array(np.stack(windows).astype(np.int32))
    val = nn.losses.cross_entropy(model(batch[:, :-1]), batch[:, 1:], reduction="mean").item()
    write_model(model, args.out)
    tokenizer.save_pretrained(str(args.out))
    print(f"wrote {args.out}: {state['step']} steps, train loss {np.mean(losses[-50:]):.3f}, held-out loss {val:.3f}")


def write_model(model: nn.Module, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dict(CONFIG, eos_token_id=0), indent=2))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})


if __name__ == "__main__":
    main()
