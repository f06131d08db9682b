"""Train a TreeFlash/DFlash drafter for any mlx-lm target, in MLX.

    python -m treeflash_mlx.train --model TARGET --data corpus/*.py prompts.jsonl --out my-drafter

The recipe and why (docs/training.md has the long form):
- **Data are the target's own words.** Prompts are windows of text files (``--prompt-tokens`` long) and/or
  JSONL lines (``prompt`` text, or chat ``messages`` put through the target's chat template). The target
  answers each one greedily (``--gen-tokens`` at most, stopping at its end-of-turn token), in batches.
- **Features and labels come free with the answers.** While it generates, the target's layers
  ``target_layer_ids`` are read at every position (prompt and answer) and stored in float16, and at every answer
  position its ``--label-top-k`` most likely tokens with their logits: the target's own distribution, the label.
  No second target pass. Shards are written one batch at a time, so an interrupted run keeps what it generated.
- **A sub-vocabulary** (``--sub-vocab-size``, FR-Spec's idea): the most frequent answer tokens. The drafter
  scores only those, in training and in drafting, so each row costs V' instead of the whole vocabulary
  (Qwen: 151,936). Label tokens outside it are left out of the loss (the drafter can never propose them).
- **Many anchors per sequence.** A step takes ``--batch`` sequences and ``--anchors`` random root positions in
  each answer. Anchor a makes the block ``[seq[a], MASK, ...]`` labelled with the target's distributions over
  ``seq[a+1 .. a+B-1]``, its context the features of positions ``< a``; all anchors of a sequence go through
  ONE masked drafter pass.
- **Losses.** Block loss: KL divergence from the target's distribution to the drafter's marginal at depths
  1..B-1. Head loss: the same for the AR-corrected logits given the TRUE previous token (teacher forcing).
  Depth d weighs ``exp(-(d-1)/7)``. ``--mode full`` trains both, ``head`` only the head on a frozen backbone,
  ``backbone`` only the block loss.
- Progress and ETA in every phase; checkpoints every ``--save-every`` steps; running the same command again
  resumes (with more ``--num-prompts`` or ``--steps`` it goes on with more data or steps); every
  ``--eval-every`` steps the held-out τ, replayed from the target's stored answers (``replay.py``), is appended
  to the run's ``tau_curve.jsonl`` with the label tokens seen so far.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ._cli import run_cli
from .checkpoints import load_drafter, save_drafter, save_weights, validate
from .drafter import Drafter, DrafterConfig
from .loading import load, read_jsonl_prompts
from .drafting import PUBLISHED_SETTINGS, make_drafting
from .replay import replay
from .families import is_recurrent
from .target import Target

DEPTH_DECAY = 7.0
MODES = ("full", "head", "backbone")
# The settings a work directory's answers and features were made with: other ones cannot reuse them.
DATA_BINDING = ("model", "target_layer_ids", "prompt_tokens", "gen_tokens", "gen_batch", "label_top_k", "seed", "data")


def _progress(total: int, initial: int, what: str, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=what, unit=unit, file=sys.stderr, dynamic_ncols=True,
                smoothing=0.05)


# ---------------------------------------------------------------------------------------------------- data


def read_prompts(files: list[Path], tokenizer, prompt_tokens: int, count: int, rng) -> list[list[int]]:
    """Token prompts of at most ``prompt_tokens``: windows of text files, JSONL ``prompt`` or ``messages``
    lines (longer ones keep their end); JSONL prompts first, in file order, then random text windows."""
    texts, jsonl = [], []
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"training data '{f}' does not exist")
        if f.suffix == ".jsonl":
            jsonl += read_jsonl_prompts(f, tokenizer)
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
    return prompts[:count]


class Answer(NamedTuple):
    """One prompt and the target's greedy answer, with what the drafter learns from at every position."""

    tokens: np.ndarray  # (T,) the prompt, then the answer
    prompt_len: int
    features: np.ndarray  # (T, F) the outputs of the target layers read; the last row zeros (never fed)
    label_ids: np.ndarray  # (T, K) the target's K most likely tokens at each answer position (its distribution
    label_logits: np.ndarray  # (T, K)  over the token there); their logits. Prompt rows: ids 0, logits -inf


def answer_with_features(model: nn.Module, prompts: list[list[int]], gen_tokens: int, layer_ids: list[int],
                         stop_ids: set[int], top_k: int = 32, pad_id: int = 0,
                         dtype: mx.Dtype = mx.float16) -> list[Answer]:
    """The target's greedy answers to a batch of prompts, read off with its features at every position and its
    ``top_k`` most likely tokens (with their logits) at every answer position: the drafter's soft labels.

    Prompts are left-padded into one batch (mlx-lm's ``BatchKVCache`` masks the padding). Each answer stops
    after a token of ``stop_ids`` (kept) or at ``gen_tokens``. Features are stored in ``dtype``."""
    from mlx_lm.models.base import create_attention_mask, create_ssm_mask
    from mlx_lm.models.cache import ArraysCache, BatchKVCache

    target = Target(model)
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    pads = [width - n for n in lengths]
    x = mx.array([[pad_id] * pad + p for pad, p in zip(pads, prompts)])
    # mlx-lm's batch caches: K/V with the padding masked (a sliding layer keeps them all; its mask cuts the
    # window, the set of keys mlx-lm's rotating cache would hold), recurrent states frozen over the padding
    cache = [ArraysCache(2, left_padding=pads) if is_recurrent(c) else BatchKVCache(pads)
             for c in target.make_cache()]
    keep = set(layer_ids)
    k = max(1, min(top_k, target.vocab_size))

    def masks(h: mx.array) -> list:
        made = {}
        for c, w in zip(cache, target.windows):
            key = "ssm" if is_recurrent(c) else w
            if key not in made:
                made[key] = create_ssm_mask(h, c) if key == "ssm" else create_attention_mask(h, c, window_size=w)
        return [made["ssm" if is_recurrent(c) else w] for c, w in zip(cache, target.windows)]

    def forward(tokens: mx.array) -> tuple[mx.array, ...]:
        h = target.embed(tokens)  # Gemma's embedding scale too
        feats = []
        for i, (layer, c, mask) in enumerate(zip(target.layers, cache, masks(h))):
            h = layer(h, mask, c)
            if i in keep:
                feats.append(h)
        logits = target.lm_head(target.norm(h[:, -1])).astype(mx.float32)
        # The top-k logits, not log-probabilities: training normalises them over the tokens it scores, and
        # the exp over the whole vocabulary for every answered token would cost a fifth of the answering.
        ids = mx.argpartition(-logits, kth=k - 1, axis=-1)[:, :k]
        return (mx.argmax(logits, axis=-1), mx.concatenate(feats, axis=-1).astype(dtype), ids,
                mx.take_along_axis(logits, ids, axis=-1))

    def step(tokens: mx.array) -> list[np.ndarray]:
        out = forward(tokens)
        mx.eval(out)
        return [np.array(a) for a in out]

    steps = [step(x)]  # per step: next tokens (N,), features (N, L, F), label ids (N, k), label logits (N, k)
    done = np.isin(steps[-1][0], list(stop_ids))
    for _ in range(gen_tokens - 1):
        if done.all():
            break
        steps.append(step(mx.array(steps[-1][0])[:, None]))
        done |= np.isin(steps[-1][0], list(stop_ids))
    answers = np.stack([st[0] for st in steps], axis=1)  # (N, steps)
    answer_feats = np.concatenate([st[1] for st in steps[1:]], axis=1) if len(steps) > 1 else None
    label_ids = np.stack([st[2] for st in steps], axis=1)  # (N, steps, k): step j's distribution is answer token j's
    label_logits = np.stack([st[3] for st in steps], axis=1)
    out = []
    for i, p in enumerate(prompts):
        row = answers[i]
        stops = np.flatnonzero(np.isin(row, list(stop_ids)))
        n = int(stops[0]) + 1 if len(stops) else len(row)
        tokens = np.concatenate([np.array(p, dtype=np.int32), row[:n].astype(np.int32)])
        f = [steps[0][1][i, pads[i]:]]
        if n > 1:
            f.append(answer_feats[i, : n - 1])
        f.append(np.zeros((1, f[0].shape[-1]), dtype=f[0].dtype))
        ids = np.concatenate([np.zeros((len(p), k), dtype=np.int32), label_ids[i, :n].astype(np.int32)])
        logits = np.concatenate([np.full((len(p), k), -np.inf, dtype=np.float32), label_logits[i, :n]])
        out.append(Answer(tokens, len(p), np.concatenate(f, axis=0), ids, logits))
    return out


def generate_shards(model, prompts: list[list[int]], batch_size: int, gen_tokens: int, layer_ids: list[int],
                    stop_ids: set[int], top_k: int, shard_dir: Path, what: str = "answering prompts") -> None:
    """Answer every prompt (``batch_size`` a shard), skipping shards already written."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    batches = length_batches(prompts, batch_size)
    todo = [i for i in range(len(batches)) if not (shard_dir / f"{i:05d}.npz").exists()]
    if not todo:
        return
    tokens_made, tic = 0, time.perf_counter()
    with _progress(len(prompts), len(prompts) - sum(len(batches[i]) for i in todo), what, "prompt") as bar:
        for i in todo:
            batch = batches[i]
            answers = answer_with_features(model, batch, gen_tokens, layer_ids, stop_ids, top_k)
            write_shard(shard_dir / f"{i:05d}", answers)
            tokens_made += sum(len(a.tokens) - a.prompt_len for a in answers)
            bar.set_postfix(answer_tok_s=f"{tokens_made / (time.perf_counter() - tic):.0f}")
            bar.update(len(batch))


def length_batches(prompts: list[list[int]], size: int, pool: int = 16) -> list[list[list[int]]]:
    """Batches of prompts of similar length: a batch is left-padded to its longest prompt, so random batches
    would spend most of the prefill on padding. Prompts are sorted by length within pools of ``pool``
    batches, so that a longer prompt list (a rerun with more ``--num-prompts``) keeps the earlier batches."""
    batches = []
    for start in range(0, len(prompts), size * pool):
        chunk = sorted(prompts[start : start + size * pool], key=len)
        batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
    return batches


def write_shard(stem: Path, answers: list[Answer]) -> None:
    """Features first, the index last: a shard exists once its ``.npz`` does."""
    feats = np.concatenate([a.features for a in answers])
    _atomic_write(stem.with_suffix(".feats.npy"), lambda f: np.save(open(f, "wb"), feats))
    offsets = np.cumsum([0] + [len(a.tokens) for a in answers])
    _atomic_write(stem.with_suffix(".npz"), lambda f: np.savez(
        open(f, "wb"), tokens=np.concatenate([a.tokens for a in answers]), offsets=offsets,
        prompt_lens=np.array([a.prompt_len for a in answers]),
        label_ids=np.concatenate([a.label_ids for a in answers]),
        label_logits=np.concatenate([a.label_logits for a in answers])))


class Corpus:
    """The generated sequences of a work directory: tokens and labels in memory, features memory-mapped."""

    def __init__(self, shard_dir: Path, count: int):
        self.rows: list[tuple[int, int, int, int]] = []  # (shard, start, length, prompt length)
        self.tokens, self.features, self.label_ids, self.label_logits = [], [], [], []
        for s, index in enumerate(sorted(shard_dir.glob("*.npz"))):
            data = np.load(index)
            self.tokens.append(data["tokens"])
            self.label_ids.append(data["label_ids"])
            self.label_logits.append(data["label_logits"])
            self.features.append(np.load(index.with_name(index.name.replace(".npz", ".feats.npy")), mmap_mode="r"))
            offsets = data["offsets"]
            for j, plen in enumerate(data["prompt_lens"]):
                self.rows.append((s, int(offsets[j]), int(offsets[j + 1] - offsets[j]), int(plen)))
        self.rows = self.rows[:count]
        if not self.rows:
            raise ValueError(f"no generated sequences in {shard_dir}")

    def __len__(self) -> int:
        return len(self.rows)

    def sequence(self, i: int) -> tuple[np.ndarray, int, np.ndarray]:
        """Sequence i: its tokens (T,), prompt length and features (T, F), as stored (float16)."""
        s, a, n, p = self.rows[i]
        return self.tokens[s][a : a + n], p, self.features[s][a : a + n]

    def answer_tokens(self) -> np.ndarray:
        return np.concatenate([self.tokens[s][a + p : a + n] for s, a, n, p in self.rows])

    def batch(self, rows: np.ndarray, pad_to: int) -> tuple[np.ndarray, ...]:
        """tokens (S, T), features (S, T, F) float32, lengths (S,), prompt lengths (S,), label ids and logits
        (S, T, K), padded to ``pad_to``."""
        S, F, K = len(rows), self.features[0].shape[-1], self.label_ids[0].shape[-1]
        tokens = np.zeros((S, pad_to), dtype=np.int32)
        feats = np.zeros((S, pad_to, F), dtype=np.float32)
        label_ids = np.zeros((S, pad_to, K), dtype=np.int32)
        label_logits = np.zeros((S, pad_to, K), dtype=np.float32)
        lengths, plens = np.zeros(S, dtype=np.int64), np.zeros(S, dtype=np.int64)
        for i, r in enumerate(rows):
            s, a, n, p = self.rows[r]
            tokens[i, :n] = self.tokens[s][a : a + n]
            feats[i, :n] = self.features[s][a : a + n]
            label_ids[i, :n] = self.label_ids[s][a : a + n]
            label_logits[i, :n] = self.label_logits[s][a : a + n]
            lengths[i], plens[i] = n, p
        return tokens, feats, lengths, plens, label_ids, label_logits


def sub_vocabulary(answer_tokens: np.ndarray, size: int, vocab_size: int) -> np.ndarray:
    """The ``size`` most frequent answer tokens, most frequent first (ties: the lower id)."""
    counts = np.bincount(answer_tokens, minlength=vocab_size)
    return np.argsort(-counts, kind="stable")[:size].astype(np.int32)


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


def output_rows(drafter: Drafter, target: Target) -> tuple[mx.array, mx.array]:
    """The output rows the drafter is trained against and ``column[token]``: a token's column, or -1 for a
    token outside the sub-vocabulary. Without one, every token is its own column."""
    weight = target.lm_head_weight()
    if weight is None:
        raise ValueError("training needs a target whose output head is not quantized; convert it to float first")
    if "sub_vocab" not in drafter:
        return weight, mx.arange(target.vocab_size)
    ids = drafter.sub_vocab
    column = mx.full((target.vocab_size,), -1, dtype=mx.int32)
    column[ids] = mx.arange(ids.shape[0], dtype=mx.int32)
    return weight[ids], column


def losses(drafter, target: Target, rows: mx.array, column: mx.array, seqs, lengths, features, anchors, label_ids,
           label_logits, mode: str):
    """(total, block loss, head loss) for a batch of sequences (S, T) and anchors (S, A).

    The label at depth d of the block rooted at ``a`` is the target's own distribution over the token at
    ``a + d`` (its top-K logits ``label_ids``/``label_logits`` (S, T, K), renormalised over the tokens the
    drafter scores): distillation, whose argmax is the greedy token. The losses are the KL divergence from it,
    so 0 is a drafter that has learnt the target's distribution. Depth d's loss is the mean over the
    blocks whose label at d is inside the answer and has a token inside the draft vocabulary; depths weigh
    ``exp(-(d-1)/DEPTH_DECAY)``, normalised."""
    S, A = anchors.shape
    T = seqs.shape[1]
    B = drafter.args.block_size
    offsets = mx.arange(B)
    positions = mx.minimum(anchors[:, :, None] + offsets, T - 1)  # (S, A, B)
    tokens = mx.take_along_axis(seqs[:, None, :], positions.reshape(S, 1, -1), axis=-1).reshape(S, A, B)
    block_ids = mx.where(offsets == 0, tokens, drafter.args.mask_token_id)
    hidden = block_hidden(drafter, features, target.embed_tokens(block_ids), anchors)
    if mode == "head":
        hidden = mx.stop_gradient(hidden)
    at = (mx.arange(S)[:, None, None] * T + positions[:, :, 1:]).reshape(-1)  # the label rows (S·A·(B-1),)
    K = label_ids.shape[-1]
    columns = column[label_ids.reshape(S * T, K)[at]].reshape(S, A, B - 1, K)
    scored = columns >= 0
    z = mx.where(scored, label_logits.reshape(S * T, K)[at].reshape(S, A, B - 1, K), -1e9)
    log_q = z - mx.logsumexp(z, axis=-1, keepdims=True)
    q = mx.where(scored, mx.exp(log_q), 0.0)
    entropy = -(q * mx.where(scored, log_q, 0.0)).sum(-1)  # the losses are KL(q || drafter): 0 at best
    columns = mx.maximum(columns, 0)
    valid = scored.any(axis=-1) & ((anchors[:, :, None] + offsets[1:]) < lengths[:, None, None])
    w = mx.exp(-mx.arange(B - 1) / DEPTH_DECAY)
    w = w / w.sum()
    count = mx.maximum(valid.sum(axis=(0, 1)), 1)

    def kl(h):  # cross-entropy against q, logsumexp(logits) - sum_k q_k logits[column_k], less q's entropy
        logits = (drafter.model.norm(h) @ rows.T).astype(mx.float32)
        ce = mx.logsumexp(logits, axis=-1) - (q * mx.take_along_axis(logits, columns, axis=-1)).sum(-1)
        per_token = ce - entropy
        return ((mx.where(valid, per_token, 0.0).sum(axis=(0, 1)) / count) * w).sum()

    block = kl(hidden[:, :, 1:]) if mode != "head" else mx.array(0.0)
    head = mx.array(0.0)
    if mode != "backbone" and drafter.has_head:
        prev = target.embed_tokens(tokens[:, :, :-1])  # teacher forcing: the true previous tokens
        head = kl(drafter.correct(hidden[:, :, 1:], prev))
    return block + head, block, head


# ------------------------------------------------------------------------------------------------ the loop


def new_drafter(target: Target, args: argparse.Namespace, layer_ids: list[int] | None, mask_token_id: int,
                sub_vocab: np.ndarray | None) -> Drafter:
    t = target.family.args  # the text model's config (Qwen3.5 wraps it in a multimodal one)
    config = DrafterConfig(
        hidden_size=t.hidden_size, num_hidden_layers=args.layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, intermediate_size=args.intermediate_size or t.intermediate_size,
        vocab_size=t.vocab_size, num_target_layers=len(target.layers), mask_token_id=mask_token_id,
        head_dim=getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads,
        block_size=args.block_size, rms_norm_eps=t.rms_norm_eps, rope_theta=getattr(t, "rope_theta", 10000.0),
        max_position_embeddings=getattr(t, "max_position_embeddings", None) or 40960,
        target_layer_ids=layer_ids or [], ar_approximation="swiglu" if args.mode != "backbone" else None,
        sub_vocab_size=len(sub_vocab) if sub_vocab is not None else None,
    )
    drafter = zero_head(Drafter(config))
    if sub_vocab is not None:
        drafter.sub_vocab = mx.array(sub_vocab, dtype=mx.int32)
    return drafter


def zero_head(drafter: Drafter) -> Drafter:
    """A new head starts as the identity correction (``d = 0``), as in the published training."""
    if drafter.has_head:
        drafter.ar_approximation.d.weight = mx.zeros_like(drafter.ar_approximation.d.weight)
    return drafter


REPLAY_TREE_SIZE = PUBLISHED_SETTINGS["tree_size"]  # a replay has no timings for --tree-size auto: the published τ budget


def heldout_tau(drafter: Drafter, target: Target, heldout: "Corpus", max_tokens: int,
                modes: list[str] | None = None) -> dict[str, float]:
    """Mean τ per drafting mode (the device's default settings, the published budget) that greedy generation would measure on
    the held-out prompts, replayed on the target's stored answers (``replay``: drafter passes only)."""
    modes = modes or (["treeflash", "marginal", "chain"] if drafter.has_head else ["marginal", "chain"])
    out = {}
    for mode in modes:
        drafting = make_drafting(drafter, target, mode, tree_size=REPLAY_TREE_SIZE)
        taus = [t for i in range(len(heldout)) for t in replay(drafting, *heldout.sequence(i), max_tokens)]
        out[mode] = float(np.mean(taus)) if taus else float("nan")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m treeflash_mlx.train", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the mlx-lm target")
    p.add_argument("--data", nargs="+", type=Path, required=True, help="text files and/or JSONL prompt files")
    p.add_argument("--out", type=Path, required=True, help="MLX drafter directory to write")
    p.add_argument("--force", action="store_true", help="replace --out when it holds a drafter written before")
    p.add_argument("--mode", choices=MODES, default="full")
    p.add_argument("--drafter", default=None, help="start from this drafter (required for --mode head)")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--intermediate-size", type=int, default=None, help="drafter MLP width (default: the target's)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--target-layer-ids", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--mask-token-id", type=int, default=None, help="default: the last id of the vocabulary")
    p.add_argument("--sub-vocab-size", type=int, default=0,
                   help="score only the N most frequent answer tokens (0: the whole vocabulary)")
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--gen-tokens", type=int, default=192)
    p.add_argument("--gen-batch", type=int, default=32)
    p.add_argument("--label-top-k", type=int, default=32,
                   help="labels are the target's distribution over its K most likely tokens at each position "
                        "(1: its greedy token alone)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--anchors", type=int, default=16, help="blocks per sequence per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--eval-data", type=Path, default=None,
                   help="JSONL of held-out prompts (default: the first --eval-prompts prompts of --data)")
    p.add_argument("--eval-prompts", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=0, help="τ on the held-out prompts every N steps (0: at the end)")
    p.add_argument("--work-dir", type=Path, default=None, help="data, features, checkpoints (default: <out>.work)")
    p.add_argument("--export-hf", type=Path, default=None, help="also write the published PyTorch layout here")
    p.add_argument("--save-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype of the written drafter's weights")
    p.add_argument("--seed", type=int, default=0)
    return p


def check_args(args: argparse.Namespace) -> None:
    if args.mode == "head" and args.drafter is None:
        raise ValueError("--mode head trains a head on an existing DFlash drafter: pass it with --drafter")
    for name in ("steps", "batch", "anchors", "save_every", "num_prompts", "prompt_tokens", "gen_batch", "layers",
                 "eval_tokens", "block_size", "gen_tokens", "label_top_k"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("eval_prompts", "eval_every", "sub_vocab_size"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(args, name)}")
    if args.intermediate_size is not None and args.intermediate_size < 1:
        raise ValueError(f"--intermediate-size must be at least 1, got {args.intermediate_size}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {args.lr}")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out '{args.out}' is a file; pass a directory path")
    if args.out.exists() and not args.force:
        raise ValueError(f"--out '{args.out}' already exists; pass --force to replace it (or another --out)")
    for f in [*args.data, *([args.eval_data] if args.eval_data else [])]:
        if not f.is_file():
            raise ValueError(f"training data '{f}' does not exist or is not a file")


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name("tmp-" + path.name)  # same suffix: mx.save_safetensors insists on it
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _data_settings(args: argparse.Namespace, ids: list[int]) -> dict:
    return {"model": str(args.model), "target_layer_ids": ids, "prompt_tokens": args.prompt_tokens,
            "gen_tokens": args.gen_tokens, "gen_batch": args.gen_batch, "label_top_k": args.label_top_k,
            "seed": args.seed,
            "data": [str(f) for f in args.data]}


def _run_settings(args: argparse.Namespace, block_size: int) -> dict:
    return {"drafter": str(args.drafter), "mode": args.mode, "block_size": block_size,
            "sub_vocab_size": args.sub_vocab_size, "layers": args.layers, "intermediate_size": args.intermediate_size}


def check_work_dir(work: Path, meta: dict) -> None:
    """Refuse a work directory whose answers were made with other data settings."""
    if (work / "meta.json").exists():
        old = json.loads((work / "meta.json").read_text())
        changed = sorted(k for k in DATA_BINDING if old.get(k) != meta.get(k))
        if changed:
            raise ValueError(f"{work} holds answers made with other settings ({', '.join(changed)}); "
                             "use another --work-dir or delete it")


def run_dir(work: Path, settings: dict) -> Path:
    """The directory of the optimisation run with these settings (``runs/<key>``, its settings in meta.json):
    runs with other drafter settings share the answers but keep their own weights, optimizer and τ curve."""
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return work / "runs" / f"{settings['mode']}-b{settings['block_size']}-{key}"


def heldout_answers(model, prompts: list[list[int]], args: argparse.Namespace, ids: list[int], stop_ids: set[int],
                    work: Path) -> "Corpus | None":
    """The target's answers to the held-out prompts (``--eval-tokens`` long), made once: the τ curve replays them.
    Answers made for other held-out prompts or lengths are made again."""
    if not prompts:
        return None
    folder = work / "heldout"
    meta = {"prompts": prompts, "eval_tokens": args.eval_tokens}
    if (folder / "meta.json").exists() and json.loads((folder / "meta.json").read_text()) != meta:
        for f in folder.glob("shards/*"):
            f.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").write_text(json.dumps(meta))
    generate_shards(model, prompts, args.gen_batch, args.eval_tokens, ids, stop_ids, 1, folder / "shards",
                    "answering held-out prompts")
    return Corpus(folder / "shards", len(prompts))


def base_drafter(args: argparse.Namespace, target: Target) -> Drafter | None:
    """The drafter to start from (``--drafter``), with a fresh head when a DFlash one is to gain one."""
    if args.drafter is None:
        return None
    base, _ = load_drafter(args.drafter)
    if args.mode == "backbone" or base.has_head:
        return base
    config = DrafterConfig.from_dict(dict(base.args.to_dict(), treeflash_config={"ar_approximation": "swiglu"}))
    drafter = zero_head(Drafter(config))
    drafter.update(base.parameters())
    return drafter


def train(args: argparse.Namespace) -> dict:
    check_args(args)
    model, tokenizer, _ = load(args.model)
    target = Target(model)
    work = args.work_dir or args.out.parent / (args.out.name + ".work")
    rng = np.random.default_rng(args.seed)
    mx.random.seed(args.seed)

    # Settle everything that can be wrong before any work is done or any file is written.
    drafter = base_drafter(args, target)
    if drafter is not None:
        validate(drafter.args, target)
        B, ids = drafter.args.block_size, drafter.args.target_layer_ids
    else:
        B = args.block_size
        probe = DrafterConfig(hidden_size=1, num_hidden_layers=args.layers, num_attention_heads=1,
                              num_key_value_heads=1, intermediate_size=1, vocab_size=target.vocab_size,
                              num_target_layers=len(target.layers), mask_token_id=0, block_size=B,
                              target_layer_ids=args.target_layer_ids or [])
        ids = probe.target_layer_ids
        bad = [i for i in ids if not 0 <= i < len(target.layers)]
        if bad:
            raise ValueError(f"target_layer_ids {bad} out of range for {len(target.layers)} layers")
        mask = args.mask_token_id if args.mask_token_id is not None else target.vocab_size - 1
        if not 0 <= mask < target.vocab_size:
            raise ValueError(f"--mask-token-id {mask} is outside the vocabulary of {target.vocab_size}")
    if args.gen_tokens < B:
        raise ValueError(f"--gen-tokens ({args.gen_tokens}) must be at least the block size ({B})")
    if args.sub_vocab_size > target.vocab_size:
        raise ValueError(f"--sub-vocab-size {args.sub_vocab_size} exceeds the vocabulary of {target.vocab_size}")
    meta = _data_settings(args, ids)
    check_work_dir(work, meta)
    eval_prompts = read_jsonl_prompts(args.eval_data, tokenizer)[: args.eval_prompts] if args.eval_data else None
    prompts = read_prompts(args.data, tokenizer, args.prompt_tokens,
                           args.num_prompts + (0 if eval_prompts is not None else args.eval_prompts), rng)
    if eval_prompts is None:
        eval_prompts, prompts = prompts[: args.eval_prompts], prompts[args.eval_prompts :]
    if not prompts:
        raise ValueError("no training prompts left after the held-out ones: add data or lower --eval-prompts")

    work.mkdir(parents=True, exist_ok=True)
    (work / "meta.json").write_text(json.dumps(meta, indent=2))  # the run has started: bind the directory
    stop_ids = set(tokenizer.eos_token_ids)
    heldout = heldout_answers(model, eval_prompts, args, ids, stop_ids, work)
    generate_shards(model, prompts, args.gen_batch, args.gen_tokens, ids, stop_ids, args.label_top_k, work / "shards")
    corpus = Corpus(work / "shards", len(prompts))
    answers = corpus.answer_tokens()
    print(f"{len(corpus)} sequences, {len(answers)} answer tokens", file=sys.stderr)

    run = run_dir(work, _run_settings(args, B))
    run.mkdir(parents=True, exist_ok=True)
    (run / "meta.json").write_text(json.dumps(_run_settings(args, B), indent=2))
    print(f"run directory: {run}", file=sys.stderr)
    if drafter is None:
        vocab = None
        if args.sub_vocab_size:
            if not (run / "sub_vocab.npy").exists():  # fixed once training starts
                _atomic_write(run / "sub_vocab.npy", lambda f: np.save(open(f, "wb"), sub_vocabulary(
                    answers, args.sub_vocab_size, target.vocab_size)))
            vocab = np.load(run / "sub_vocab.npy")
            print(f"sub-vocabulary: {len(vocab)} tokens cover {np.isin(answers, vocab).mean():.2%} of the "
                  "answer tokens", file=sys.stderr)
        drafter = new_drafter(target, args, ids, mask, vocab)
    report = fit(args, target, drafter, corpus, heldout, run)
    from .convert import StagedOutput

    with StagedOutput(args.out, args.force) as staging:  # written aside, moved into place whole
        save_drafter(drafter, staging, dtype=getattr(mx, args.save_dtype))
    if args.export_hf is not None:
        from .convert import export

        export(args.out, args.export_hf, force=True)
    print(json.dumps(report))
    return report


def fit(args, target: Target, drafter: Drafter, corpus: Corpus, heldout: Corpus | None, run: Path) -> dict:
    """The optimisation loop: resumable, with the held-out τ curve in ``tau_curve.jsonl``."""
    B = drafter.args.block_size
    if args.mode == "head":
        drafter.freeze()
        drafter.ar_approximation.unfreeze()
    rows, column = output_rows(drafter, target)
    rows = mx.stop_gradient(rows)
    warmup = 50
    optimizer = optim.AdamW(
        learning_rate=lambda step: args.lr * mx.minimum(1.0, (step + 1) / warmup)
        * (0.55 + 0.45 * mx.cos(math.pi * mx.minimum(step, args.steps) / args.steps)),
        weight_decay=0.0)
    step, seen = 0, 0
    if (run / "state.json").exists():
        state = json.loads((run / "state.json").read_text())
        step, seen = state["step"], state.get("label_tokens", 0)
        drafter.load_weights(str(run / "drafter.safetensors"))
        optimizer.init(drafter.trainable_parameters())
        optimizer.state = tree_unflatten(list(mx.load(str(run / "optimizer.safetensors")).items()))
        print(f"resuming at step {step}", file=sys.stderr)
    pad_to = max(n for _, _, n, _ in corpus.rows)

    loss_and_grad = nn.value_and_grad(drafter, lambda d, *a: losses(d, target, rows, column, *a, args.mode))

    def save_state():  # state.json last: it names a step only once that step's files are complete
        for name, tree in (("drafter", drafter.parameters()), ("optimizer", optimizer.state)):
            _atomic_write(run / f"{name}.safetensors",
                          lambda f, t=tree: save_weights(f, dict(tree_flatten(t)), {}))
        _atomic_write(run / "state.json", lambda f: f.write_text(json.dumps({"step": step, "label_tokens": seen})))

    def record_tau():
        drafter.eval()
        taus = heldout_tau(drafter, target, heldout, args.eval_tokens)
        drafter.train()
        with open(run / "tau_curve.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "label_tokens": seen, "tau": taus}) + "\n")
        return taus

    history, taus = [], {}
    with _progress(args.steps, step, "training", "step") as bar:  # closed on any exit
        while step < args.steps:
            step_rng = np.random.default_rng([args.seed, step])  # a resumed run sees the same batches
            picks = np.sort(step_rng.choice(len(corpus), size=min(args.batch, len(corpus)), replace=False))
            tokens, feats, lengths, plens, label_ids, label_logits = corpus.batch(picks, pad_to)
            # Anchors (root positions) anywhere in the answer, the last prompt token included.
            anchors = step_rng.integers(plens - 1, np.maximum(lengths - 1, plens), size=(args.anchors, len(picks)))
            anchors = anchors.T
            batch = (mx.array(tokens), mx.array(lengths), mx.array(feats), mx.array(anchors), mx.array(label_ids),
                     mx.array(label_logits))
            (loss, block, head), grads = loss_and_grad(drafter, *batch)
            optimizer.update(drafter, grads)
            mx.eval(loss, block, head, drafter.parameters(), optimizer.state)
            step += 1
            seen += int((anchors[:, :, None] + np.arange(1, B) < lengths[:, None, None]).sum())
            history.append((loss.item(), block.item(), head.item()))
            bar.set_postfix(loss=f"{np.mean([h[0] for h in history[-20:]]):.3f}", label_tokens=seen)
            bar.update(1)
            if step % args.save_every == 0 or step == args.steps:
                save_state()
            if heldout and args.eval_every and step % args.eval_every == 0:
                taus = record_tau()
                bar.write(f"step {step}: {seen} label tokens, held-out τ {json.dumps(taus)}")
    drafter.unfreeze()
    drafter.eval()
    if heldout and (not args.eval_every or step % args.eval_every):
        taus = record_tau()
    return {"steps": step, "label_tokens": seen,
            "final_loss": float(np.mean([h[0] for h in history[-20:]])) if history else None,
            "mean_acceptance_length": taus}


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), train, argv)


if __name__ == "__main__":
    sys.exit(main())
