"""Train a TreeFlash/DFlash drafter for any mlx-lm target, in MLX.

    python -m treeflash_mlx.train --model TARGET --data corpus/*.py prompts.jsonl --out my-drafter

Recipe (the published one, scaled down), and the choices made here:
- **Data are the target's own words.** Prompts are windows of the given text files (``--prompt-tokens`` long)
  and/or the ``prompt`` fields of JSONL files; the target continues each one greedily (``--gen-tokens``,
  batched, prompts of a batch cut to one length from the left). The drafter learns what the target says,
  not what the corpus says.
- **Features once per sequence.** The target's features (outputs of ``target_layer_ids``) of every sequence are
  computed once and stored (float16); every training block reads them.
- **Many anchors per sequence.** A step takes ``--batch`` sequences and ``--anchors`` random anchor positions in
  each one's continuation. Anchor a makes the block ``[seq[a], MASK, ...]`` whose labels are
  ``seq[a+1 .. a+B-1]``; its context is the features of positions ``< a``. All anchors of a sequence go through
  ONE drafter pass: a mask lets each block see its own context prefix and its own block, nothing else.
- **Losses.** Block loss: cross-entropy of the marginal logits at depths 1..B-1. Head loss: cross-entropy of the
  AR-corrected logits with the TRUE previous token (teacher forcing; depth 1's previous token is the root).
  Both weight depth d by ``exp(-(d-1)/7)`` (normalised): early depths decide acceptance, and later ones are
  rarely reached. ``--mode full`` trains both (loss = block + head), ``head`` only the head on a frozen
  backbone (upgrading a DFlash drafter to TreeFlash), ``backbone`` only the block loss (a DFlash drafter).
- Progress bar with loss and tokens/s; a checkpoint every ``--save-every`` steps in ``<out>.work/``; running
  the same command again resumes; at the end a held-out greedy evaluation reports τ and the drafter is saved
  in the MLX format (``--export-hf`` also writes the published PyTorch layout).
- Defaults suit a small target on a CPU; a large one wants more prompts, longer continuations and more steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ._cli import run_cli
from .checkpoints import load_drafter, save_drafter, validate
from .drafter import Drafter, DrafterConfig
from .loading import load
from .speculative import stream_generate
from .target import Target

DEPTH_DECAY = 7.0
MODES = ("full", "head", "backbone")


# ---------------------------------------------------------------------------------------------------- data


def read_prompts(files: list[Path], tokenizer, prompt_tokens: int, count: int, rng) -> list[list[int]]:
    """Token prompts of at most ``prompt_tokens``: windows of text files, ``prompt`` fields of JSONL lines
    (longer ones keep their end)."""
    texts, jsonl = [], []
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"training data '{f}' does not exist")
        if f.suffix == ".jsonl":
            for n, line in enumerate(f.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        jsonl.append(tokenizer.encode(json.loads(line)["prompt"]))
                    except (json.JSONDecodeError, KeyError, TypeError) as err:
                        raise ValueError(f"{f}:{n} is not a JSON object with a 'prompt' string") from err
        else:
            texts.append(tokenizer.encode(f.read_text(errors="replace")))
    texts = [t for t in texts if len(t) > prompt_tokens]
    if not texts and not jsonl:
        raise ValueError(f"no usable training data: text files need more than {prompt_tokens} tokens")
    prompts = [p[-prompt_tokens:] for p in jsonl if p]
    weights = np.array([len(t) for t in texts], dtype=np.float64)
    while texts and len(prompts) < count:
        t = texts[rng.choice(len(texts), p=weights / weights.sum())]
        start = int(rng.integers(0, len(t) - prompt_tokens))
        prompts.append(t[start : start + prompt_tokens])
    return prompts[:count] if len(prompts) > count else prompts


def continue_greedily(model: nn.Module, prompts: list[list[int]], length: int, batch: int) -> np.ndarray:
    """Each prompt continued greedily by the target up to ``length`` tokens in all: (N, length).

    Prompts of one length are batched together (no padding, so nothing changes what the target sees)."""
    target = Target(model)
    out = np.zeros((len(prompts), length), dtype=np.int64)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for n, rows in by_length.items():
        for j in range(0, len(rows), batch):
            part = rows[j : j + batch]
            x = mx.array([prompts[i] for i in part])
            cache = target.make_cache()
            pieces = [x]
            logits = model(x, cache=cache)[:, -1]
            for _ in range(length - n):
                y = mx.argmax(logits, axis=-1)[:, None]
                pieces.append(y)
                logits = model(y, cache=cache)[:, -1]
                mx.eval(logits, y)
            out[part] = np.array(mx.concatenate(pieces, axis=1))
    return out


def target_features(model: nn.Module, seqs: np.ndarray, layer_ids: list[int], batch: int) -> np.ndarray:
    """Features of every position of every sequence, once (float16 to halve the memory)."""
    target = Target(model)
    out = np.zeros((*seqs.shape, len(layer_ids) * target.hidden_size), dtype=np.float16)
    for i in range(0, len(seqs), batch):
        h = target.embed_tokens(mx.array(seqs[i : i + batch]))
        feats = {}
        for j, layer in enumerate(target.layers):
            h = layer(h, "causal", None)
            if j in layer_ids:
                feats[j] = h
        out[i : i + batch] = np.array(mx.concatenate([feats[j] for j in layer_ids], axis=-1).astype(mx.float16))
    return out


# ------------------------------------------------------------------------------------------------ the model


def block_hidden(drafter: Drafter, features: mx.array, blocks: mx.array, anchors: mx.array) -> mx.array:
    """Pre-norm drafter output for many blocks per sequence in one pass.

    features (S, T, F); blocks (S, A, B, H) block embeddings; anchors (S, A) root positions.
    Block j of a sequence sees the context positions ``< anchors[j]`` and its own B tokens (non-causal)."""
    S, A, B, H = blocks.shape
    T = features.shape[1]
    ctx = drafter.model.hidden_norm(drafter.model.fc(features))
    ctx_pos = mx.arange(T)
    own = mx.arange(A)[:, None] == mx.arange(A)[None, :]  # block j sees block j
    sees_ctx = ctx_pos[None, None, :] < anchors[:, :, None]  # (S, A, T)
    mask = mx.concatenate(
        [mx.repeat(sees_ctx, B, axis=1), mx.broadcast_to(mx.repeat(mx.repeat(own, B, 0), B, 1), (S, A * B, A * B))],
        axis=-1,
    )[:, None]
    x = blocks.reshape(S, A * B, H)

    def to_seq(t):  # (S*A, heads, B, D) -> (S, heads, A*B, D), blocks one after another
        return t.reshape(S, A, t.shape[1], B, -1).transpose(0, 2, 1, 3, 4).reshape(S, t.shape[1], A * B, -1)

    for layer in drafter.model.layers:
        attn = layer.self_attn
        xn = layer.input_layernorm(x)
        q = attn.q_norm(attn.q_proj(xn).reshape(S * A, B, attn.n_heads, -1)).transpose(0, 2, 1, 3)
        kb = attn.k_norm(attn.k_proj(xn).reshape(S * A, B, attn.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        vb = attn.v_proj(xn).reshape(S, A * B, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offsets = anchors.reshape(-1)  # one RoPE offset per block: its tokens sit at anchor + j
        q = attn.rope(q, offset=offsets)
        kb = attn.rope(kb, offset=offsets)
        kc = attn.k_norm(attn.k_proj(ctx).reshape(S, T, attn.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        vc = attn.v_proj(ctx).reshape(S, T, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
        kc = attn.rope(kc)
        k = mx.concatenate([kc, to_seq(kb)], axis=2)
        v = mx.concatenate([vc, vb], axis=2)
        out = mx.fast.scaled_dot_product_attention(to_seq(q), k, v, scale=attn.scale, mask=mask)
        x = x + attn.o_proj(out.transpose(0, 2, 1, 3).reshape(S, A * B, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return x.reshape(S, A, B, H)


def losses(drafter, target: Target, seqs, features, anchors, mode: str):
    """(total, block loss, head loss) for a batch of sequences and anchors."""
    S, A = anchors.shape
    B = drafter.args.block_size
    offsets = mx.arange(B)
    positions = anchors[:, :, None] + offsets  # (S, A, B)
    tokens = mx.take_along_axis(seqs[:, None, :], positions.reshape(S, 1, -1), axis=-1).reshape(S, A, B)
    block_ids = mx.where(offsets == 0, tokens, drafter.args.mask_token_id)
    hidden = block_hidden(drafter, features, target.embed_tokens(block_ids), anchors)
    if mode == "head":
        hidden = mx.stop_gradient(hidden)
    labels = tokens[:, :, 1:]
    w = mx.exp(-mx.arange(B - 1) / DEPTH_DECAY)
    w = w / w.sum()

    def ce(h):
        logits = target.lm_head(drafter.model.norm(h)).astype(mx.float32)
        return (nn.losses.cross_entropy(logits, labels, reduction="none").mean(axis=(0, 1)) * w).sum()

    block = ce(hidden[:, :, 1:]) if mode != "head" else mx.array(0.0)
    head = mx.array(0.0)
    if mode != "backbone" and drafter.has_head:
        prev = target.embed_tokens(tokens[:, :, :-1])  # teacher forcing: the true previous tokens
        head = ce(drafter.correct(hidden[:, :, 1:], prev))
    return block + head, block, head


# ------------------------------------------------------------------------------------------------ the loop


def new_drafter(target: Target, layers: int, block_size: int, layer_ids: list[int] | None, mask_token_id: int,
                head: bool) -> Drafter:
    args = target.model.args
    config = DrafterConfig(
        hidden_size=args.hidden_size, num_hidden_layers=layers, num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads, intermediate_size=args.intermediate_size,
        vocab_size=args.vocab_size, num_target_layers=len(target.layers), mask_token_id=mask_token_id,
        head_dim=getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads,
        block_size=block_size, rms_norm_eps=args.rms_norm_eps, rope_theta=getattr(args, "rope_theta", 10000.0),
        max_position_embeddings=getattr(args, "max_position_embeddings", None) or 40960,
        target_layer_ids=layer_ids or [], ar_approximation="swiglu" if head else None,
    )
    return zero_head(Drafter(config))


def zero_head(drafter: Drafter) -> Drafter:
    """A new head starts as the identity correction (``d = 0``), as in the published training."""
    if drafter.has_head:
        drafter.ar_approximation.d.weight = mx.zeros_like(drafter.ar_approximation.d.weight)
    return drafter


def evaluate(model, tokenizer, drafter, prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
    """Mean τ (greedy) per drafting mode on held-out prompts."""
    modes = ["treeflash", "marginal", "chain"] if drafter.has_head else ["marginal", "chain"]
    out = {}
    for mode in modes:
        taus = []
        for p in prompts:
            rounds = {r.round: r.acceptance_length for r in
                      stream_generate(model, tokenizer, p, max_tokens, drafter=drafter, mode=mode)}
            taus += [v for k, v in rounds.items() if k > 0]
        out[mode] = float(np.mean(taus)) if taus else float("nan")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m treeflash_mlx.train", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the mlx-lm target")
    p.add_argument("--data", nargs="+", type=Path, required=True, help="text files and/or JSONL prompt files")
    p.add_argument("--out", type=Path, required=True, help="MLX drafter directory to write")
    p.add_argument("--mode", choices=MODES, default="full")
    p.add_argument("--drafter", default=None, help="start from this drafter (required for --mode head)")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--target-layer-ids", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--mask-token-id", type=int, default=None, help="default: the last id of the vocabulary")
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--gen-tokens", type=int, default=192)
    p.add_argument("--gen-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--anchors", type=int, default=16, help="blocks per sequence per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--eval-prompts", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=64)
    p.add_argument("--work-dir", type=Path, default=None, help="data, features, checkpoints (default: <out>.work)")
    p.add_argument("--export-hf", type=Path, default=None, help="also write the published PyTorch layout here")
    p.add_argument("--seed", type=int, default=0)
    return p


def check_args(args: argparse.Namespace) -> None:
    if args.mode == "head" and args.drafter is None:
        raise ValueError("--mode head trains a head on an existing DFlash drafter: pass it with --drafter")
    for name in ("steps", "batch", "anchors", "save_every", "num_prompts", "prompt_tokens", "gen_batch", "layers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name("tmp-" + path.name)  # same suffix: mx.save_safetensors insists on it
    write(tmp)
    os.replace(tmp, path)


def train(args: argparse.Namespace) -> dict:
    check_args(args)
    model, tokenizer, _ = load(args.model)
    target = Target(model)
    work = args.work_dir or args.out.parent / (args.out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    mx.random.seed(args.seed)

    if args.drafter is not None:
        base, _ = load_drafter(args.drafter)
        drafter = base
        if args.mode != "backbone" and not base.has_head:  # add a fresh head to a DFlash drafter
            config = DrafterConfig.from_dict(dict(base.args.to_dict(), treeflash_config={"ar_approximation": "swiglu"}))
            drafter = zero_head(Drafter(config))
            drafter.update(base.parameters())
    else:
        mask = args.mask_token_id if args.mask_token_id is not None else target.vocab_size - 1
        drafter = new_drafter(target, args.layers, args.block_size, args.target_layer_ids, mask,
                              head=args.mode != "backbone")
    validate(drafter.args, target)
    B, ids = drafter.args.block_size, drafter.args.target_layer_ids
    if args.gen_tokens < B:
        raise ValueError(f"--gen-tokens ({args.gen_tokens}) must be at least the block size ({B})")
    meta = {"model": str(args.model), "drafter": str(args.drafter), "mode": args.mode, "target_layer_ids": ids,
            "block_size": B, "num_prompts": args.num_prompts, "prompt_tokens": args.prompt_tokens,
            "gen_tokens": args.gen_tokens, "eval_prompts": args.eval_prompts, "seed": args.seed,
            "data": [str(f) for f in args.data]}
    if (work / "meta.json").exists():
        old = json.loads((work / "meta.json").read_text())
        changed = sorted(k for k in meta if old.get(k) != meta[k])
        if changed:
            raise ValueError(f"{work} holds a run with other settings ({', '.join(changed)}); "
                             "use another --work-dir or delete it")
    else:
        (work / "meta.json").write_text(json.dumps(meta, indent=2))

    if (work / "seqs.npz").exists():
        data = np.load(work / "seqs.npz")
        seqs, prompt_lens = data["seqs"], data["prompt_lens"]
        eval_prompts = json.loads((work / "eval_prompts.json").read_text())
    else:
        prompts = read_prompts(args.data, tokenizer, args.prompt_tokens, args.num_prompts + args.eval_prompts, rng)
        eval_prompts, prompts = prompts[: args.eval_prompts], prompts[args.eval_prompts :]
        if not prompts:
            raise ValueError("no training prompts left after the held-out ones: add data or lower --eval-prompts")
        print(f"generating the target's continuations of {len(prompts)} prompts", file=sys.stderr)
        seqs = continue_greedily(model, prompts, args.prompt_tokens + args.gen_tokens, args.gen_batch)
        prompt_lens = np.array([len(p) for p in prompts])
        (work / "eval_prompts.json").write_text(json.dumps(eval_prompts))
        _atomic_write(work / "seqs.npz", lambda f: np.savez(open(f, "wb"), seqs=seqs, prompt_lens=prompt_lens))
    if not (work / "features.npy").exists():
        print(f"computing target features of {len(seqs)} sequences", file=sys.stderr)
        feats = target_features(model, seqs, ids, args.gen_batch)
        _atomic_write(work / "features.npy", lambda f: np.save(open(f, "wb"), feats))
        del feats
    features = np.load(work / "features.npy", mmap_mode="r")

    if args.mode == "head":
        drafter.freeze()
        drafter.ar_approximation.unfreeze()
    schedule = optim.cosine_decay(args.lr, args.steps, end=args.lr * 0.1)
    optimizer = optim.AdamW(learning_rate=lambda step: schedule(step) * mx.minimum(1.0, (step + 1) / 50),
                            weight_decay=0.0)
    step = 0
    if (work / "state.json").exists():
        step = json.loads((work / "state.json").read_text())["step"]
        drafter.load_weights(str(work / "drafter.safetensors"))
        optimizer.init(drafter.trainable_parameters())
        optimizer.state = tree_unflatten(list(mx.load(str(work / "optimizer.safetensors")).items()))
        print(f"resuming at step {step}", file=sys.stderr)

    loss_and_grad = nn.value_and_grad(drafter, lambda d, *a: losses(d, target, *a, args.mode))

    def save_state():  # state.json last: it names a step only once that step's files are complete
        for name, tree in (("drafter", drafter.parameters()), ("optimizer", optimizer.state)):
            _atomic_write(work / f"{name}.safetensors",
                          lambda f, t=tree: mx.save_safetensors(str(f), dict(tree_flatten(t))))
        _atomic_write(work / "state.json", lambda f: f.write_text(json.dumps({"step": step})))

    from tqdm import tqdm

    bar = tqdm(total=args.steps, initial=step, file=sys.stderr, unit="step")
    tic, history = time.perf_counter(), []
    while step < args.steps:
        step_rng = np.random.default_rng([args.seed, step])  # a resumed run sees the same batches
        rows = step_rng.choice(len(seqs), size=min(args.batch, len(seqs)), replace=False)
        rows.sort()
        # anchors (root positions) anywhere in the continuation, the last prompt token included
        low = prompt_lens[rows][:, None] - 1
        anchors = step_rng.integers(low, seqs.shape[1] - B + 1, size=(len(rows), args.anchors))
        batch = (mx.array(seqs[rows].astype(np.int32)), mx.array(features[rows]).astype(mx.float32), mx.array(anchors))
        (loss, block, head), grads = loss_and_grad(drafter, *batch)
        optimizer.update(drafter, grads)
        mx.eval(loss, block, head, drafter.parameters(), optimizer.state)
        step += 1
        history.append((loss.item(), block.item(), head.item()))
        tps = len(rows) * args.anchors * (B - 1) / (time.perf_counter() - tic)
        tic = time.perf_counter()
        bar.set_postfix(loss=f"{np.mean([h[0] for h in history[-20:]]):.3f}", tok_s=f"{tps:.0f}")
        bar.update(1)
        if step % args.save_every == 0 or step == args.steps:
            save_state()
    bar.close()
    drafter.unfreeze()
    save_drafter(drafter, args.out)
    if args.export_hf is not None:
        from .convert import export

        export(args.out, args.export_hf, force=True)
    taus = evaluate(model, tokenizer, drafter, eval_prompts, args.eval_tokens) if eval_prompts else {}
    report = {"steps": step, "final_loss": float(np.mean([h[0] for h in history[-20:]])) if history else None,
              "mean_acceptance_length": taus}
    print(json.dumps(report))
    return report


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), train, argv)


if __name__ == "__main__":
    sys.exit(main())
