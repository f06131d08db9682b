"""The speculative decoding loop: load → prefill → per round: draft → verify → accept → commit → emit.

The API mirrors mlx-lm: ``load``, ``stream_generate`` yielding ``GenerationResponse``s, ``generate``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Generator, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .checkpoints import MODEL_FILES, first_line, load_drafter, resolve, validate
from .drafter import Drafter
from .drafting import MODES, DraftOptions, device_settings, finish_draft, make_head, start_draft, untimed
from .sampling import LogitsProcessor, PositionKeys, Sampler, greedy, node_logits, sample_and_accept
from .target import Target, compact
from .tree import root_only
from .validation import check_tree_budget, finite, integer, stop_strings as _stop_strings, token_ids

PREFILL_STEP = 2048


@dataclass
class GenerationResponse:
    """One generated token, as mlx-lm's, plus what the speculative round that committed it achieved.

    ``from_draft``: the token was a drafted token the target accepted (False for each round's bonus token).
    ``round``: 0 for the token sampled after the prompt, then 1, 2, ... per verification pass.
    ``acceptance_length``: tokens committed by that round (τ; 1 for round 0).
    """

    text: str
    token: int
    logprobs: mx.array
    from_draft: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    round: int
    acceptance_length: int
    finish_reason: str | None = None


def load(
    model: str, drafter: str | None = None, tokenizer_config: dict | None = None
) -> tuple[nn.Module, TokenizerWrapper, Drafter | None]:
    """Load an mlx-lm target and (optionally) a drafter for it, checking that they fit together."""
    from mlx_lm.utils import load as mlx_load

    model_path = resolve(model, MODEL_FILES, "model")
    try:
        target_model, tokenizer = mlx_load(str(model_path), tokenizer_config=tokenizer_config)
    except Exception as err:
        raise ValueError(f"cannot load model '{model}': {first_line(err)}") from None
    target_model.model_path = model_path
    target = Target(target_model)
    if drafter is None:
        return target_model, tokenizer, None
    dtype = target.embed_tokens.weight.dtype
    if not mx.issubdtype(dtype, mx.floating):  # quantized embedding: use its scales' dtype
        dtype = target.embed_tokens.scales.dtype
    draft_model, drafter_path = load_drafter(drafter, dtype=dtype)
    validate(draft_model.args, target)
    draft_model.path = drafter_path
    return target_model, tokenizer, draft_model


def _check_options(opts: DraftOptions, drafter: Drafter | None, max_tokens: int) -> DraftOptions:
    if opts.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {opts.mode!r}")
    if opts.mode != "ar" and drafter is None:
        raise ValueError(f"mode '{opts.mode}' needs a drafter; pass one or use mode 'ar'")
    if opts.mode == "treeflash" and drafter is not None and not drafter.has_head:
        raise ValueError("mode 'treeflash' needs a drafter with an AR-approximation head; use 'marginal' or 'chain'")
    for name in ("tree_size", "top_m", "top_k"):
        integer(name, getattr(opts, name), low=1)
    if isinstance(opts.head_vocab, bool) or not isinstance(opts.head_vocab, int) or opts.head_vocab < 0:
        raise ValueError(f"head_vocab must be an integer >= 0 (0: the whole vocabulary), got {opts.head_vocab!r}")
    finite("drafter temperature", opts.temperature, low=0, low_open=True)
    integer("max_tokens", max_tokens, low=1)
    return opts


class ContextLimitWarning(UserWarning):
    """The model's context leaves room for fewer tokens than ``max_tokens`` asked for."""


def default_mode(drafter: Drafter | None) -> str:
    if drafter is None:
        return "ar"
    return "treeflash" if drafter.has_head else "marginal"


class RoundStats:
    """Opt-in profile of the rounds: seconds per stage and, per round, the tree size and accepted nodes.

    Passing one to ``stream_generate`` makes every stage end in an ``mx.eval`` so that its time is its own."""

    STAGES = ("drafter", "tables", "tree", "verify", "commit")

    def __init__(self):
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        self.rounds: list[tuple[int, list[int]]] = []  # (nodes verified, accepted node indices)
        self._last = time.perf_counter()

    def start(self) -> None:
        self._last = time.perf_counter()

    def __call__(self, stage: str, *arrays) -> None:
        mx.eval(*arrays)
        now = time.perf_counter()
        self.seconds[stage] += now - self._last
        self._last = now


class _TextStream:
    """Committed tokens in, text segments out; ends on EOS, a stop string (cut off) or the last token.

    Text that could still grow into a stop string is held back until it cannot."""

    def __init__(self, tokenizer: TokenizerWrapper, stop_strings: Sequence[str]):
        self.detokenizer = tokenizer.detokenizer
        self.detokenizer.reset()
        self.stop_ids = set(tokenizer.eos_token_ids)
        self.stop_strings = list(stop_strings)
        self.hold = max((len(s) - 1 for s in self.stop_strings), default=0)
        self.shown = 0

    def add(self, token: int, last: bool) -> tuple[str, str | None]:
        finish = "stop" if token in self.stop_ids else ("length" if last else None)
        if token not in self.stop_ids:
            self.detokenizer.add_token(token)
        if finish:
            self.detokenizer.finalize()
        text = self.detokenizer.text
        hits = [h for s in self.stop_strings if (h := text.find(s, max(0, self.shown - len(s)))) >= 0]
        if hits:
            text, finish = text[: min(hits)], "stop"
        safe = len(text) if finish else max(self.shown, len(text) - self.hold)
        segment, self.shown = text[self.shown : safe], safe
        return segment, finish


def stream_generate(
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    prompt: str | Sequence[int] | mx.array,
    drafter: Drafter | None = None,
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    mode: str | None = None,
    tree_size: int | None = None,
    top_m: int | None = None,
    top_k: int = 16,
    drafter_temp: float = 1.0,
    head_vocab: int | None = None,
    stop_strings: str | Sequence[str] = (),
    stats: RoundStats | None = None,
) -> Generator[GenerationResponse, None, None]:
    """Generate from ``prompt`` exactly as the target alone would (in distribution; greedy: token for token).

    ``sampler`` and ``logits_processors`` follow mlx-lm (``make_sampler``, ``make_logits_processors``);
    processors see, for each tree node, the committed tokens and that node's own path as history.
    ``tree_size``, ``top_m`` and ``head_vocab`` left at None take ``drafting.device_settings()``.
    ``stats`` collects a per-stage profile (at the cost of a sync per stage).
    ``stop_strings``: one string or several; the text ends before the first one found.
    A seed (``mx.random.seed``) pins the sampled output whatever the mode and tree settings: every committed
    position draws its randomness from its own key, taken in position order (``sampling.PositionKeys``).
    """
    given = {"tree_size": tree_size, "top_m": top_m, "head_vocab": head_vocab}
    settings = device_settings() | {k: v for k, v in given.items() if v is not None}
    opts = _check_options(
        DraftOptions(mode or default_mode(drafter), top_k=top_k, temperature=drafter_temp, **settings), drafter, max_tokens
    )
    stop_strings = _stop_strings(stop_strings)
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    if isinstance(prompt, str):
        prompt = tokenizer.encode(prompt)
    if isinstance(prompt, mx.array):
        if not mx.issubdtype(prompt.dtype, mx.integer):
            raise ValueError(f"the prompt must be token ids (integers), got an array of {prompt.dtype}")
        prompt = prompt.tolist()
    target = Target(model)
    prompt = token_ids(prompt, target.vocab_size)
    if not prompt:
        raise ValueError("the prompt is empty; give at least one token")
    if target.max_context is not None and len(prompt) >= target.max_context:
        raise ValueError(
            f"the prompt has {len(prompt)} tokens but the model's context is {target.max_context}; shorten it"
        )
    limit = max_tokens if target.max_context is None else min(max_tokens, target.max_context - len(prompt))
    if limit < max_tokens:
        warnings.warn(
            f"the model's context of {target.max_context} tokens leaves room for only {limit} of the "
            f"{max_tokens} tokens asked after a {len(prompt)}-token prompt", ContextLimitWarning, stacklevel=2)
    if opts.mode not in ("ar", "chain"):
        check_tree_budget(opts.tree_size, opts.mode, drafter.args.block_size, opts.top_m, opts.top_k,
                          len(prompt) + limit, target.vocab_size, target.model.args.num_attention_heads,
                          hidden_size=target.hidden_size, head_vocab=opts.head_vocab)
    sampler = sampler or greedy
    use_drafter = opts.mode != "ar"
    capture = drafter.args.target_layer_ids if use_drafter else []
    t_cache = target.make_cache()
    d_cache = drafter.make_cache() if use_drafter else None
    head = make_head(drafter, target) if use_drafter else None

    tic = time.perf_counter()
    for i in range(0, len(prompt), PREFILL_STEP):  # prefill; every chunk's features go straight to the drafter
        chunk = prompt[i : i + PREFILL_STEP]
        logits, feats = target.forward(mx.array(chunk), t_cache, capture, last_only=True)
        if use_drafter:
            drafter.append_context(feats[None], d_cache)
        mx.eval(logits, [c.state for c in t_cache + (d_cache or [])])
    first = root_only(prompt[-1])
    keys = PositionKeys()  # one sampling seed per generated position: a seed pins the output, whatever the tree
    _, root, logprobs = sample_and_accept(node_logits(logits, first, prompt, logits_processors), first, sampler, keys)
    prompt_tps = len(prompt) / (time.perf_counter() - tic)

    stream = _TextStream(tokenizer, stop_strings)
    generated, round_index = 0, 0
    tic = time.perf_counter()
    new = [(root, logprobs[0], False)]
    history = list(prompt)
    timer = stats or untimed
    while True:
        if stats:
            stats.start()
        # The next round's drafting is started before this round's tokens are emitted (its tail overlaps them),
        # unless these tokens end the generation.
        ends = generated + len(new) >= limit or any(token in stream.stop_ids for token, _, _ in new)
        pending = start_draft(drafter, target, root, d_cache, opts, timer, head) if use_drafter and not ends else None
        for token, token_logprobs, from_draft in new:
            generated += 1
            history.append(token)
            segment, finish = stream.add(token, last=generated >= limit)
            yield GenerationResponse(
                text=segment,
                token=token,
                logprobs=token_logprobs,
                from_draft=from_draft,
                prompt_tokens=len(prompt),
                prompt_tps=prompt_tps,
                generation_tokens=generated,
                generation_tps=generated / (time.perf_counter() - tic),
                peak_memory=mx.get_peak_memory() / 1e9,
                round=round_index,
                acceptance_length=len(new),
                finish_reason=finish,
            )
            if finish:
                return

        round_index += 1
        if stats:
            stats.start()  # the time spent emitting belongs to no stage
        start = t_cache[0].offset  # the root's position: the cache holds everything before it
        tree = finish_draft(root, pending, opts, timer) if use_drafter else root_only(root)
        logits, feats = target.verify(tree, t_cache, capture)
        path, root, logprobs = sample_and_accept(
            node_logits(logits, tree, history, logits_processors), tree, sampler, keys)
        timer("verify")
        compact(t_cache, start, path)
        if use_drafter:
            drafter.append_context(feats[mx.array(path)][None], d_cache)
        if stats:
            stats("commit", [c.state for c in t_cache + (d_cache or [])])
            stats.rounds.append((len(tree), path))
        new = [(int(tree.tokens[n]), logprobs[i], True) for i, n in enumerate(path[1:])]
        new.append((root, logprobs[-1], False))


def generate(
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    prompt: str | Sequence[int],
    drafter: Drafter | None = None,
    verbose: bool = False,
    **kwargs,
) -> str:
    """Generate a complete response; with ``verbose``, stream it and print speed and acceptance."""
    text, last, rounds = "", None, {}
    for response in stream_generate(model, tokenizer, prompt, drafter, **kwargs):
        text += response.text
        if verbose:
            print(response.text, end="", flush=True)
        rounds[response.round] = response.acceptance_length
        last = response
    if verbose and last is not None:
        print("\n" + summary(last, [v for k, v in rounds.items() if k > 0]))
    return text


def summary(last: GenerationResponse, taus: list[int]) -> str:
    """The closing lines of a verbose run, as mlx-lm prints them, plus the acceptance."""
    lines = [
        "=" * 10,
        f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec",
        f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec",
    ]
    if taus:
        lines.append(f"Acceptance: {sum(taus) / len(taus):.2f} tokens per target pass over {len(taus)} rounds")
    lines.append(f"Peak memory: {last.peak_memory:.3f} GB")
    return "\n".join(lines)
