"""The speculative decoding loop (docs/algorithm.md): prefill → per round: draft → verify → accept → commit.

Shaped as mlx-lm's: ``generate_step`` takes prompt tokens (and a prompt cache) and yields each round's committed
tokens; ``stream_generate`` detokenizes them, applies stop strings and builds ``GenerationResponse``s; ``generate``
collects the text. How a round is drafted is a ``drafting.Drafting`` object, so the loop has no mode branches.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable, Generator, NamedTuple, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .distributed import ranks_of
from .drafter import Drafter
from .drafting import Drafting, make_drafting, untimed
from .prompt_cache import PromptCache, make_prompt_cache
from .quantized_kv import (DEFAULT_KV_GROUP_SIZE, DEFAULT_QUANTIZED_KV_START, before_switch, check_cache,
                           kv_quantization, prefill_chunks, quantize_at, switch_offset)
from .sampling import LogitsProcessor, PositionKeys, Sampler, check_token, greedy, log_softmax, node_logits
from .target import Target, cache_offset
from .tree import root_only
from .validation import integer, stop_strings as _stop_strings, token_ids

PREFILL_STEP = 2048
PLAIN_TIMED = 8  # plain steps timed together (``plain_steps``)


@dataclass
class GenerationResponse:
    """One generated token, as mlx-lm's, plus what the speculative round that committed it achieved.

    ``from_draft``: the token was a drafted token the target accepted (False for each round's bonus token).
    ``round``: 0 for the token sampled after the prompt, then 1, 2, ... per verification pass.
    ``acceptance_length``: tokens committed by that round (τ; 1 for round 0).
    ``cached_tokens``: prompt tokens served by the prompt cache (not prefilled); ``prompt_tps`` counts only the
    prefilled ones.
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
    cached_tokens: int = 0


class Round(NamedTuple):
    nodes: int  # nodes verified
    path: list[int]  # accepted node indices, the root first
    copied: int  # nodes copied from the context (``DraftTree.copied``)


class RoundStats:
    """Opt-in profile of the rounds: seconds per stage and, per round, the tree size and accepted nodes.

    Passing one to ``stream_generate`` makes every stage end in an ``mx.eval`` so that its time is its own."""

    STAGES = ("drafter", "tables", "tree", "verify", "commit")

    def __init__(self):
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        self.rounds: list[Round] = []
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


class ContextLimitWarning(UserWarning):
    """The model's context leaves room for fewer tokens than ``max_tokens`` asked for."""


class Committed(NamedTuple):
    """One committed token, as ``generate_step`` yields it (a round's tokens come together, in order)."""

    token: int
    logprobs: mx.array
    from_draft: bool  # an accepted draft token (False for the token each round samples itself)
    round: int  # 0: the token sampled after the prompt; then 1, 2, ... per verification pass


def token_limit(target: Target, n_prompt: int, max_tokens: int) -> int | None:
    """How many tokens a generation may commit: ``max_tokens``, cut to the model's context (< 0: the context;
    None: no limit). Raises ValueError for an empty prompt, one past the context, or ``max_tokens`` 0."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise ValueError(f"max_tokens must be a whole number, got {max_tokens!r}")
    if n_prompt == 0:
        raise ValueError("the prompt is empty; give at least one token")
    if target.max_context is not None and n_prompt >= target.max_context:
        raise ValueError(
            f"the prompt has {n_prompt} tokens but the model's context is {target.max_context}; shorten it"
        )
    if max_tokens == 0:
        raise ValueError("max_tokens must be at least 1 (or negative: up to the model's context)")
    room = None if target.max_context is None else target.max_context - n_prompt
    return room if max_tokens < 0 else (max_tokens if room is None else min(max_tokens, room))


class _Step(NamedTuple):
    """A plain decoding step, built and started: its token (1,) and log-probabilities (1, V), still computing."""

    token: mx.array
    rows: mx.array
    features: mx.array | None


def plain_step(target: Target, cache: PromptCache, capture: list[int], token: mx.array, sampler: Sampler,
               keys: PositionKeys) -> _Step:
    """One decoding step after the cache from ``token`` (1,), which may itself be the last step's token, not yet
    computed. The sample draws from its position's seed, as a tree's root would (``sampling.PositionKeys``)."""
    logits, features = target.forward(token, cache.target, capture)
    rows = log_softmax(logits)
    if sampler is not greedy:  # greedy draws nothing
        mx.random.seed(keys.seed(0))
        keys.commit(1)
    step = _Step(sampler(rows).reshape(1), rows, features)
    mx.async_eval(step.token, step.rows, *([] if features is None else [features]))
    return step


def plain_steps(target: Target, cache: PromptCache, drafting: Drafting, sampler: Sampler, keys: PositionKeys,
                history: list[int], new: list[Committed], limit: int | None, emitted: int, stop_tokens: set[int],
                round_index: int):
    """Plain decoding steps, one round each, for as long as ``drafting.plain_ahead`` says the next round is
    one too. As in mlx-lm's loop, each step is built and started before the last one's token is waited for,
    so the host's work (the caller's included) overlaps the model's.

    Enters with ``new``, the tokens to yield (counted in ``emitted``), whose last (``history[-1]``) the first step
    reads. Returns the tokens of the last step, not yet yielded or counted, the count of those yielded and the
    round index; the loop goes on from there. The step started ahead of a stop token is not wasted: its K/V (and
    features) hold that token, which the cache then holds too, as mlx-lm's holds the step it computed ahead."""
    capture = drafting.capture
    # The steps are timed together, PLAIN_TIMED at a time and from before the first one is built: one step's own
    # time depends on where the model work fell (the first waits for two steps, the last for none), a run's not.
    tic, untimed = time.perf_counter(), 0
    step = plain_step(target, cache, capture, mx.array(history[-1:]), sampler, keys)
    while True:
        try:
            yield new
        except GeneratorExit:  # the step under way holds history[-1]: the cache keeps it
            if untimed:  # (counted, not timed: the time includes the caller's stopping)
                drafting.observe_plain(len(history) - 1, float("nan"), untimed)
            cache.tokens.append(history[-1])
            if capture:
                drafting.append_context(step.features, cache.drafter)
            drafting.end(cache.drafter)
            cache.checkpoint()
            raise
        cache.tokens.append(history[-1])
        ahead = (limit is None or emitted + 1 < limit) and drafting.plain_ahead(history)
        following = plain_step(target, cache, capture, step.token, sampler, keys) if ahead else None
        token = check_token(int(step.token.item()), target.vocab_size)
        untimed += 1
        if following is None or token in stop_tokens or untimed == PLAIN_TIMED:
            now = time.perf_counter()
            drafting.observe_plain(len(history), (now - tic) / untimed, untimed)
            tic, untimed = now, 0
        else:
            drafting.observe_plain(len(history))
        if capture:
            drafting.append_context(step.features, cache.drafter)
        round_index += 1
        new = [Committed(token, step.rows[0], False, round_index)]
        if following is None or token in stop_tokens:
            if following is not None:  # the step ahead wrote this last token's K/V
                cache.tokens.append(token)
                if capture:
                    drafting.append_context(following.features, cache.drafter)
            return new, emitted, round_index
        emitted += 1
        history.append(token)
        step = following


def generate_step(
    prompt: Sequence[int],
    model: nn.Module,
    drafting: Drafting | None = None,
    *,
    prompt_cache: PromptCache | None = None,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    max_tokens: int = 256,
    stop_tokens: Sequence[int] = (),
    prefill_step_size: int = PREFILL_STEP,
    kv_bits: int | None = None,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
    prompt_progress_callback: Callable[[int, int], None] | None = None,
    stats: RoundStats | None = None,
) -> Generator[list[Committed], None, None]:
    """Yield the tokens each round commits: first the one sampled after the prompt, then each verification's.

    The target's output exactly (greedy: token for token; sampling: in distribution). ``prompt_cache`` (from
    ``make_prompt_cache``) is reused for the prefix it shares with ``prompt`` and left holding the prompt and the
    committed tokens. ``max_tokens`` < 0: up to the model's context. The draft of the next round is started
    before a round's tokens are yielded (its model work overlaps the caller's), unless they hold one of
    ``stop_tokens`` or reach ``max_tokens``; then the generator ends after yielding them.

    ``kv_bits``, ``kv_group_size``, ``quantized_kv_start``: mlx-lm's K/V cache quantization of the target, switched
    on where mlx-lm's ``generate_step`` would (the output stays its output with the same settings).
    ``prompt_progress_callback(processed, total)``: called as mlx-lm's, with the prompt tokens prefilled so far
    (0 first, then after each chunk) out of the ``total`` not served by the prompt cache."""
    target = Target(model)
    drafting = drafting or Drafting()
    ranks = ranks_of(model, drafting.max_nodes())  # with a sharded target: every rank commits rank 0's rounds
    integer("prefill_step_size", prefill_step_size, low=1)
    if kv_bits is not None and any(target.windows):  # mlx-lm's rotating caches cannot be quantized either
        raise ValueError("kv_bits is not supported for targets with sliding-window layers; leave the K/V cache float")
    kv = kv_quantization(kv_bits, kv_group_size, quantized_kv_start, target.head_dim)
    progress = prompt_progress_callback or (lambda *_: None)
    prompt = token_ids(prompt, target.vocab_size)
    limit = token_limit(target, len(prompt), max_tokens)
    drafting.check_budget(len(prompt) + (limit or 0))
    sampler = sampler or greedy
    processors = logits_processors or ()
    stop_tokens = set(stop_tokens)
    cache = prompt_cache if prompt_cache is not None else make_prompt_cache(model)
    check_cache(cache.target, kv)
    cached = cache.fit(prompt, drafting, len(target.layers))
    switch = switch_offset(kv, cache.target, cached, len(prompt), prefill_step_size)  # None: no switch ahead
    timer = stats or untimed

    progress(0, len(prompt) - cached)
    for a, b in prefill_chunks(cached, len(prompt), prefill_step_size, switch):  # features go to the drafter
        chunk = prompt[a:b]
        logits, feats = target.forward(mx.array(chunk), cache.target, drafting.capture, last_only=True)
        if drafting.capture:
            drafting.append_context(feats, cache.drafter)
        ranks.eval(logits, [c.state for c in cache.target + (cache.drafter or [])])
        cache.tokens.extend(chunk)
        switch = quantize_at(cache.target, switch, kv)
        progress(b - cached, len(prompt) - cached)
    cache.checkpoint()  # a hybrid target's recurrent states after the prompt: the next turn may resume here
    first = root_only(prompt[-1])
    keys = PositionKeys()  # one sampling seed per generated position: a seed pins the output, whatever the tree
    _, root, logprobs = ranks.accept(node_logits(logits, first, prompt, processors), first, sampler, keys)

    new, emitted, round_index, history = [Committed(root, logprobs[0], False, 0)], 0, 0, list(prompt)
    # Plain steps overlap as mlx-lm's do (``plain_steps``): on one process, where the host need not see a
    # step's token to build the next one (no logits processors, no K/V switch ahead) and no stage is timed.
    overlap = not ranks.together and not processors and switch is None and stats is None
    while True:
        if stats:
            stats.start()
        if limit is not None:
            new = new[: limit - emitted]
        emitted += len(new)
        history.extend(c.token for c in new)
        ends = (limit is not None and emitted >= limit) or any(c.token in stop_tokens for c in new)
        pending = None if ends else drafting.start(history, cache.drafter, timer)
        if overlap and not ends and drafting.is_plain(pending):
            new, emitted, round_index = yield from plain_steps(target, cache, drafting, sampler, keys, history, new,
                                                               limit, emitted, stop_tokens, round_index)
            root = new[-1].token
            continue
        try:
            yield new
        except GeneratorExit:  # the caller stopped here (a stop string, a closed stream): a turn boundary
            drafting.end(cache.drafter)  # what the drafting left waiting goes into the cache
            cache.checkpoint()
            raise
        if ends:
            drafting.end(cache.drafter)
            cache.checkpoint()
            return

        round_index += 1
        if stats:
            stats.start()  # the time the caller spent belongs to no stage
        start = cache_offset(cache.target)  # the root's position: the cache holds everything before it
        tree = ranks.tree(before_switch(drafting.finish(root, pending, timer), start, switch))
        logits, feats = target.verify(tree, cache.target, drafting.capture)
        path, bonus, logprobs = ranks.accept(node_logits(logits, tree, history, processors), tree, sampler, keys)
        timer("verify")
        drafting.observe(tree, path)
        target.commit(cache.target, start, path)
        if drafting.capture:
            drafting.append_context(feats[mx.array(path)], cache.drafter)
        cache.tokens.extend(int(tree.tokens[n]) for n in path)
        switch = quantize_at(cache.target, switch, kv)
        if stats:
            stats("commit", [c.state for c in cache.target + (cache.drafter or [])])
            stats.rounds.append(Round(len(tree), path, tree.copied))
        new = [Committed(int(tree.tokens[n]), logprobs[i], True, round_index) for i, n in enumerate(path[1:])]
        new.append(Committed(bonus, logprobs[-1], False, round_index))
        root = bonus


def stream_generate(
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    prompt: str | Sequence[int] | mx.array,
    max_tokens: int = 256,
    *,
    drafter: Drafter | Drafting | None = None,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    prompt_cache: PromptCache | None = None,
    prefill_step_size: int = PREFILL_STEP,
    kv_bits: int | None = None,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
    prompt_progress_callback: Callable[[int, int], None] | None = None,
    stop_strings: str | Sequence[str] = (),
    mode: str | None = None,
    tree_size: int | None = None,
    draft_top_m: int | None = None,
    draft_top_k: int | None = None,
    draft_temp: float | None = None,
    draft_vocab: int | None = None,
    draft_window: int | None = None,
    draft_sinks: int | None = None,
    draft_lookup: int | None = None,
    draft_lookup_match: int | None = None,
    stats: RoundStats | None = None,
) -> Generator[GenerationResponse, None, None]:
    """Generate from ``prompt`` exactly as the target alone would (in distribution; greedy: token for token).

    Called as mlx-lm's ``stream_generate(model, tokenizer, prompt, max_tokens, ...)``, with the drafter as a
    keyword (without one: plain decoding). ``sampler`` and ``logits_processors`` follow mlx-lm (``make_sampler``,
    ``make_logits_processors``); processors see, for each tree node, the committed tokens and that node's own
    path as history. ``prompt_cache``: see ``make_prompt_cache``. The drafting settings (``mode``,
    ``tree_size``, ``draft_top_m``, ``draft_top_k``, ``draft_temp``, ``draft_vocab``, ``draft_window``,
    ``draft_sinks``, ``draft_lookup``, ``draft_lookup_match``) change the speed, never the output; left at None
    they take ``drafting.device_settings()`` and the published values (``draft_window`` 0: the drafter sees the
    whole context; N: only the first ``draft_sinks`` positions and the N most recent; ``draft_lookup`` N: up to N
    tokens that followed an earlier occurrence of the last ``draft_lookup_match`` or more tokens join the tree,
    0: none). ``drafter`` may
    also be a ready ``drafting.Drafting`` object, which carries its own settings. ``stats`` collects a
    per-stage profile (at the cost of a sync per stage). ``stop_strings``: one string or several; the text
    ends before the first one found. A seed (``mx.random.seed``) pins the sampled output whatever the mode and
    tree settings: every committed position draws its randomness from its own key, taken in position order
    (``sampling.PositionKeys``). A context too short for ``max_tokens`` warns (``ContextLimitWarning``).
    ``kv_bits``, ``kv_group_size``, ``quantized_kv_start`` and ``prompt_progress_callback``: as mlx-lm's (see
    ``generate_step``).
    """
    settings = dict(tree_size=tree_size, draft_top_m=draft_top_m, draft_top_k=draft_top_k, draft_temp=draft_temp,
                    draft_vocab=draft_vocab, draft_window=draft_window, draft_sinks=draft_sinks,
                    draft_lookup=draft_lookup, draft_lookup_match=draft_lookup_match)
    if isinstance(drafter, Drafting):
        given = [name for name, value in settings.items() if value is not None] + (["mode"] if mode else [])
        if given:
            raise ValueError(f"a Drafting object carries its own settings; do not also pass {', '.join(given)}")
        drafting = drafter
    else:
        drafting = make_drafting(drafter, Target(model), mode, **settings)
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
    limit = token_limit(target, len(prompt), max_tokens)
    if limit is not None and 0 < max_tokens and limit < max_tokens:
        warnings.warn(
            f"the model's context of {target.max_context} tokens leaves room for only {limit} of the "
            f"{max_tokens} tokens asked after a {len(prompt)}-token prompt", ContextLimitWarning, stacklevel=2)
    cache = prompt_cache if prompt_cache is not None else make_prompt_cache(model)
    steps = generate_step(
        prompt, model, drafting, prompt_cache=cache, sampler=sampler, logits_processors=logits_processors,
        max_tokens=max_tokens, stop_tokens=tokenizer.eos_token_ids, prefill_step_size=prefill_step_size,
        kv_bits=kv_bits, kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start,
        prompt_progress_callback=prompt_progress_callback, stats=stats,
    )
    stream = _TextStream(tokenizer, stop_strings)
    tic = time.perf_counter()
    generated, prompt_tps = 0, 0.0
    try:
        for committed in steps:
            if committed[0].round == 0:
                prompt_tps = max(len(prompt) - cache.reused, 1) / (time.perf_counter() - tic)
                tic = time.perf_counter()
            for c in committed:
                generated += 1
                segment, finish = stream.add(c.token, last=limit is not None and generated >= limit)
                yield GenerationResponse(
                    text=segment,
                    token=c.token,
                    logprobs=c.logprobs,
                    from_draft=c.from_draft,
                    prompt_tokens=len(prompt),
                    prompt_tps=prompt_tps,
                    generation_tokens=generated,
                    generation_tps=generated / (time.perf_counter() - tic),
                    peak_memory=mx.get_peak_memory() / 1e9,
                    round=c.round,
                    acceptance_length=len(committed),
                    finish_reason=finish,
                    cached_tokens=cache.reused,
                )
                if finish:
                    return
    finally:
        steps.close()


def generate(
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    prompt: str | Sequence[int],
    verbose: bool = False,
    **kwargs,
) -> str:
    """Generate a complete response, called as mlx-lm's (``drafter=`` and the rest as ``stream_generate``'s);
    with ``verbose``, stream it and print speed and acceptance."""
    text, last, rounds = "", None, {}
    for response in stream_generate(model, tokenizer, prompt, **kwargs):
        text += response.text
        if verbose:
            print(response.text, end="", flush=True)
        rounds[response.round] = response.acceptance_length
        last = response
    if verbose and last is not None:
        print("\n" + summary(last, [v for k, v in rounds.items() if k > 0]))
    return text


def summary(last: GenerationResponse, taus: list[int], cache: PromptCache | None = None) -> str:
    """The closing lines of a verbose run, as mlx-lm prints them, plus the acceptance and, given the run's
    ``cache``, what its K/V took (the drafter's part of the peak apart)."""
    lines = [
        "=" * 10,
        f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec",
        f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec",
    ]
    if taus:
        lines.append(f"Acceptance: {sum(taus) / len(taus):.2f} tokens per target pass over {len(taus)} rounds")
    lines.append(f"Peak memory: {last.peak_memory:.3f} GB")
    if cache is not None:
        bits = [c.bits for c in cache.target if hasattr(c, "bits")]
        quantized = f" ({bits[0]}-bit)" if bits else ""
        lines.append(f"KV cache: target {cache.target_nbytes / 1e9:.3f} GB{quantized}, "
                     f"drafter {cache.drafter_nbytes / 1e9:.3f} GB")
    return "\n".join(lines)
