"""The generation core behind every endpoint: the loaded models, the prompt caches, and the worker thread.

One worker thread runs the generations, one at a time, in arrival order; each request's handler thread waits for
its results on a queue of its own, so requests never share state. The worker is the only thread that uses the
tokenizer. A conversation's next turn reuses the prompt cache of the turn before (a small LRU of caches, bounded
in count and bytes), whichever API it came through.
"""

from __future__ import annotations

import _thread
import argparse
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
from mlx_lm.generate import make_text_state_machine
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .. import distributed, quantized_kv
from .._cli import drafting_settings
from ..drafting import Drafting, default_mode, make_drafting
from ..loading import demo_paths, load
from ..prompt_cache import PromptCache, make_prompt_cache
from ..speculative import stream_generate
from ..target import Target
from ..tree import DraftTree
from .fields import RequestError

log = logging.getLogger("treeflash_mlx.server")


class CacheLRU:
    """Prompt caches of recent conversations, most recently used last, bounded in count and in bytes.

    ``take`` hands out the cache sharing the longest prefix with a prompt (removed while in use), ``put`` returns
    it and evicts the least recently used ones past the bounds."""

    MIN_SHARED = 8

    def __init__(self, max_entries: int, max_bytes: int | None, sizes=lambda sizes: sizes):
        # ``sizes``: the entries' bytes as the bound sees them; with a sharded target every rank's largest, so
        # that every rank evicts alike (distributed.largest)
        self.max_entries, self.max_bytes, self.sizes = max_entries, max_bytes, sizes
        self.entries: list[PromptCache] = []
        self.lock = threading.Lock()

    def take(self, prompt: list[int], make) -> PromptCache:
        """A cache for ``prompt``: the kept one it extends (removed while in use), else a copy of the prefix it
        shares with one (at least ``MIN_SHARED`` tokens; the original stays for its own conversation, e.g. a
        turn whose template dropped the reasoning of the turn before), else a new one."""
        with self.lock:
            best, best_len = None, 0
            for cache in self.entries:
                n = 0
                for a, b in zip(cache.tokens, prompt):
                    if a != b:
                        break
                    n += 1
                if n > best_len or (n == best_len and best is not None and len(cache.tokens) < len(best.tokens)):
                    best, best_len = cache, n
            if best is not None and best_len == len(best.tokens):
                self.entries.remove(best)
                return best
            if best is not None and best_len >= self.MIN_SHARED:
                self.entries.remove(best)
                self.entries.append(best)  # used: now the most recent
                return best.prefix_copy(best_len)
        return make()

    def put(self, cache: PromptCache) -> None:
        if self.max_entries <= 0:
            return
        with self.lock:
            self.entries.append(cache)
            sizes = self.sizes([c.nbytes for c in self.entries]) if self.max_bytes is not None else []
            while len(self.entries) > self.max_entries or (self.max_bytes is not None and sum(sizes) > self.max_bytes):
                self.entries.pop(0)
                sizes = sizes[1:]

    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.entries)


@dataclass
class Job:
    """One generation: what the worker needs, the queue it answers on, and a flag the handler sets to stop it.

    The worker answers ("prompt", tokens), then ("token", (response, logprobs entry)) per token, ("round",
    description) after each verified round when ``trees`` is set, ("stop", string) when a stop string ended
    the text, ("auto", report) with ``--tree-size auto`` (``Tuner.report``: the budgets chosen and the plain
    steps), ("error", exception) on failure, and always ("done", None) last. ``count_only``: tokenize only."""

    build_prompt: Callable[[], list[int]]  # tokenizes on the worker thread, the only one using the tokenizer
    max_tokens: int
    sampling: dict
    processors: dict
    seed: int | None
    stop: list[str]
    top_logprobs: int  # < 0: no logprobs
    trees: bool = False
    count_only: bool = False
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


def record_trees(drafting: Drafting, trees: list[DraftTree]) -> Drafting:
    """``drafting`` keeping each tree it hands to verification in ``trees`` (round k's is ``trees[k - 1]``)."""
    finish = drafting.finish

    def finish_and_keep(root, pending, *args, **kwargs):
        tree = finish(root, pending, *args, **kwargs)
        trees.append(tree)
        return tree

    drafting.finish = finish_and_keep  # on this object only: its class and other requests are untouched
    return drafting


def describe_round(index: int, tree: DraftTree, accepted: list[int], decode) -> dict:
    """A round for the chat page: the tree (node texts, parents; node 0 the root, the last token committed
    before it) and the path the target accepted, root first. Siblings hold distinct tokens, so the accepted
    tokens name the path."""
    path = [0]
    for token in accepted:
        children = [n for n in range(len(tree)) if tree.parents[n] == path[-1] and tree.tokens[n] == token]
        if not children:
            break
        path.append(children[0])
    return {"round": index, "tokens": [decode([int(t)]) for t in tree.tokens], "parents": tree.parents.tolist(),
            "path": path, "copied": int(tree.copied)}


class Engine:
    """The loaded models and the worker thread that runs generations one at a time."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        model_path, drafter_path = demo_paths(args.model, args.drafter)
        tokenizer_config = {"trust_remote_code": True} if args.trust_remote_code else None
        self.model, self.tokenizer, self.drafter = load(model_path, drafter_path, tokenizer_config,
                                                        pipeline=getattr(args, "pipeline", False))
        self.sharded = distributed.world().size() > 1  # rank 0 shares each request; the others follow()
        self.lost: distributed.RankLost | None = None  # set when the other ranks are gone (the server then stops)
        if args.chat_template:
            self.tokenizer.chat_template = args.chat_template
        self.target = Target(self.model)
        self.mode = args.mode or default_mode(self.drafter)
        self.settings = dict(mode=self.mode, **drafting_settings(args))
        make_drafting(self.drafter, self.target, **self.settings)  # check the settings now, not per request
        quantized_kv.kv_quantization(**quantized_kv.check_arguments(args), head_dim=self.target.head_dim)
        self.model_names = {"default_model", args.model or "treeflash-demo", str(model_path),
                            str(self.model.model_path)}
        self.model_id = args.model or "treeflash-demo"
        self.start()

    def start(self) -> None:
        """The caches, the job queue and the worker; called once the model and tokenizer are in place."""
        # mlx-lm's reasoning / tool-call markers of this tokenizer, as mlx_lm.server builds them (parsing.py)
        self.text_states = make_text_state_machine(self.tokenizer)
        self.caches = CacheLRU(self.args.prompt_cache_size, self.args.prompt_cache_bytes,
                               distributed.largest if getattr(self, "sharded", False) else (lambda sizes: sizes))
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.busy = threading.Event()  # set while a generation runs (the soak test checks none is left)
        self.worker = threading.Thread(target=self._work, name="generation", daemon=True)
        if distributed.is_main():
            self.worker.start()

    def submit(self, job: Job) -> Job:
        self.jobs.put(job)
        return job

    def stop(self) -> None:
        self.jobs.put(None)
        if getattr(self, "sharded", False) and getattr(self, "lost", None) is None:
            self.worker.join()
            distributed.share(None)  # the other ranks' follow() ends

    def follow(self) -> None:
        """Ranks > 0 of a sharded target: run each generation rank 0 shares, in step with it, answering no one,
        until rank 0 shares None (it stops)."""
        while (order := distributed.share()) is not None:
            try:
                for _ in self._responses(order, make_drafting(self.drafter, self.target, **self.settings)):
                    pass
            except distributed.RankLost:
                raise
            except Exception:  # rank 0 meets the same error with the same input, and answers it
                log.debug("generation failed", exc_info=True)

    def _next_job(self) -> Job | None:
        """The next job (None: stop). Rank 0 of a sharded target meets the other ranks while it waits: they sleep
        between these meetings instead of spinning in a collective until the next request."""
        if not getattr(self, "sharded", False):
            return self.jobs.get()
        while True:
            try:
                return self.jobs.get(timeout=distributed.IDLE_TICK)
            except queue.Empty:
                distributed.tick()

    def _work(self) -> None:
        try:
            while (job := self._next_job()) is not None:
                if job.cancelled.is_set():
                    job.out.put(("done", None))
                    continue
                self.busy.set()
                try:
                    self._generate(job)
                except distributed.RankLost as err:  # the shards are gone: no request can be served any more
                    job.out.put(("error", err))
                    raise
                except Exception as err:  # a request that fails must not take the worker down
                    log.exception("generation failed")
                    job.out.put(("error", err))
                finally:
                    self.busy.clear()
                    job.out.put(("done", None))
        except distributed.RankLost as err:
            self.lost = err
            _thread.interrupt_main()  # the server stops: main() reports the lost ranks in one line

    def _generate(self, job: Job) -> None:
        try:
            prompt = job.build_prompt()
        except RequestError as err:
            job.out.put(("error", err))
            return
        job.out.put(("prompt", prompt))
        if job.count_only:
            return
        trees: list[DraftTree] = []
        drafting = make_drafting(self.drafter, self.target, **self.settings)
        if job.trees:
            record_trees(drafting, trees)
        order = dict(prompt=prompt, max_tokens=job.max_tokens, sampling=job.sampling, processors=job.processors,
                     seed=job.seed, stop=job.stop)
        sharded = getattr(self, "sharded", False)
        if sharded:
            distributed.share(order)  # the other ranks run the same generation (follow)
        responses = self._responses(order, drafting)
        generated, accepted = [], []
        for r in responses:
            if job.cancelled.is_set():
                if sharded:  # every rank runs a sharded generation to its end together
                    continue
                responses.close()
                break
            generated.append(r.token)
            job.out.put(("token", (r, self._logprobs(r, job.top_logprobs))))
            if job.trees and r.round > 0:
                if r.from_draft:
                    accepted.append(r.token)
                if not r.from_draft or r.finish_reason:  # the round's bonus token, or the text's end
                    job.out.put(("round", describe_round(r.round, trees[r.round - 1], accepted,
                                                         self.tokenizer.decode)))
                    accepted = []
            if r.finish_reason == "stop" and job.stop and r.token not in self.tokenizer.eos_token_ids:
                job.out.put(("stop", self._stop_string(generated, job.stop)))
        if (tuner := getattr(drafting, "tuner", None)) is not None:
            job.out.put(("auto", tuner.report()))

    def _responses(self, order: dict, drafting: Drafting):
        """One generation's responses, its prompt cache taken from and returned to the kept ones (the same on
        every rank of a sharded target)."""
        cache = self.caches.take(order["prompt"], lambda: make_prompt_cache(self.model, self.drafter))
        try:
            if order["seed"] is not None:
                mx.random.seed(order["seed"])
            yield from stream_generate(
                self.model, self.tokenizer, order["prompt"], order["max_tokens"], drafter=drafting,
                sampler=make_sampler(**order["sampling"]),
                logits_processors=make_logits_processors(**order["processors"]),
                prompt_cache=cache, prefill_step_size=self.args.prefill_step_size, stop_strings=order["stop"],
                **quantized_kv.check_arguments(self.args),
            )
        finally:
            self.caches.put(cache)

    def _logprobs(self, r, top_logprobs: int):
        """(token text, log-probability, [(text, log-probability), ...] of the most likely), or None."""
        if top_logprobs < 0:
            return None
        top = []
        if top_logprobs > 0:
            ids = mx.argpartition(-r.logprobs, kth=top_logprobs - 1)[:top_logprobs]
            pairs = sorted(zip(ids.tolist(), r.logprobs[ids].tolist()), key=lambda p: -p[1])
            top = [(self.tokenizer.decode([i]), v) for i, v in pairs]
        return self.tokenizer.decode([r.token]), float(r.logprobs[r.token]), top

    def _stop_string(self, tokens: list[int], stops: list[str]) -> str:
        """Which stop string ended the text: the one found first in the generated tokens' text."""
        text = self.tokenizer.decode(tokens)
        found = [(text.find(s), s) for s in stops if s in text]
        return min(found)[1] if found else stops[0]
