"""The target sharded across processes with MLX's distributed backend (docs/distributed.md).

Under ``mlx.launch`` every process (a rank) loads its shard of the target as mlx-lm's ``sharded_load`` makes it
(tensor parallelism through the family's ``shard()``, or pipeline parallelism where the family has it) and the
whole drafter. A round then runs on every rank in step:

- every rank drafts, then takes rank 0's tree (one broadcast), so every rank feeds the same tokens, positions
  and ancestor mask to its shard;
- every rank verifies through its shard: the sharded linears sum their parts over the ranks, so the hidden
  states, the features the drafter reads and the logits are whole on every rank;
- rank 0 alone samples and walks the tree, and broadcasts the accepted path and bonus token (a second broadcast);
  the other ranks commit exactly that. Rank 0's seed is the generation's seed, and the ranks cannot drift apart
  even where floating point differs between machines (different chips): they never decide anything themselves.

Two small collectives a round, against two per target layer in each tensor-parallel verification. Only MLX's own
collectives (``mx.distributed``) are used; a broadcast is an ``all_sum`` of rank 0's values and the others' zeros.

A rank that dies closes its sockets and the others' next collective fails: that is reported as one line
(``RankLost``). A rank that hangs (a machine asleep, a cable pulled) closes nothing, so every blocking wait on the
other ranks is watched: past ``rank_timeout`` seconds a watchdog prints one line and ends the process.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .sampling import log_softmax, sample_and_accept
from .tree import DraftTree

DEFAULT_RANK_TIMEOUT = 300.0  # seconds one blocking wait on the other ranks may take (a long prefill chunk included)
_BACKEND_ERRORS = ("[ring]", "[jaccl]", "[mpi]", "[nccl]", "[distributed]")  # how MLX's backends word their errors

_rank_timeout = DEFAULT_RANK_TIMEOUT


class BroadcastClock:
    """Wall time this process spent in the rounds' broadcasts (waiting for rank 0 included): the benchmark's
    measure of what agreeing on every round costs."""

    def __init__(self):
        self.seconds, self.count = 0.0, 0

    def reset(self) -> None:
        self.seconds, self.count = 0.0, 0


broadcasts = BroadcastClock()


class RankLost(ConnectionError):
    """A collective failed: another rank died or its connection broke."""


def world() -> mx.distributed.Group:
    """The group of every process ``mlx.launch`` started (of one process when not launched)."""
    return mx.distributed.init()


def is_main() -> bool:
    """True on rank 0, the one rank that prints and answers HTTP (and on a single process)."""
    return world().rank() == 0


@contextmanager
def rank0_prints():
    """Ranks > 0 run silently: rank 0 prints the same text, and the same errors for bad input. A rank that lost
    the others still says so, in one line, and exits with status 1."""
    if is_main():
        yield
        return
    real = sys.stderr
    with open(os.devnull, "w") as null, redirect_stdout(null), redirect_stderr(null):
        try:
            yield
        except RankLost as err:
            print(f"error: {err}", file=real, flush=True)
            raise SystemExit(1) from None


IDLE_TICK = 0.05  # seconds between two meetings of ranks with nothing to do (a server between requests)


def share(obj=None):
    """Rank 0's ``obj`` (anything picklable; None: nothing) on every rank. The other ranks pass nothing and wait
    for it: a server's ranks > 0 wait here for its next request.

    A rank spins inside a collective until its peers join it, so an idle wait is a series of short meetings:
    every ``IDLE_TICK`` seconds the waiting ranks meet rank 0, which says "nothing yet" (``tick``) until it has
    something to share, and they sleep in between. Each meeting is watched, so a rank 0 that dies or hangs
    between requests ends the others too."""
    import pickle

    group = world()
    if group.rank() == 0:
        buf = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
        meet(len(buf), "a shared request")
    else:
        while not (size := meet(0, "rank 0's next request")):  # never 0 for a request: a pickle is never empty
            time.sleep(IDLE_TICK)
        buf = np.zeros(size, np.uint8)
    with watched("a shared request"):
        out = np.array(mx.distributed.all_sum(mx.array(buf), stream=mx.cpu))
    return obj if group.rank() == 0 else pickle.loads(out.tobytes())


def tick() -> None:
    """Rank 0, with nothing to share yet: meet the ranks waiting in ``share`` (call it every ``IDLE_TICK``)."""
    meet(0, "an idle meeting")


def meet(value: int, what: str) -> int:
    """The sum of every rank's ``value`` (rank 0 says how much it shares, the others 0), watched as ``what``."""
    with watched(what):
        return int(mx.distributed.all_sum(mx.array(value), stream=mx.cpu).item())


def largest(values: list[int]) -> list[int]:
    """Each value's largest over the ranks (one collective): what every rank then sees alike."""
    if world().size() == 1 or not values:
        return values
    with watched("the prompt caches' sizes"):
        return np.array(mx.distributed.all_max(mx.array(values, dtype=mx.int64), stream=mx.cpu)).tolist()


def add_arguments(p) -> None:
    """The command lines' flags for a target sharded over the processes of ``mlx.launch``."""
    p.add_argument("--pipeline", action="store_true",
                   help="under mlx.launch: give each process a run of the target's layers (pipeline parallelism) "
                        "instead of a share of every layer's weights (tensor parallelism, the default)")
    p.add_argument("--rank-timeout", type=float, default=DEFAULT_RANK_TIMEOUT,
                   help="under mlx.launch: seconds a process waits for the others in one step before it ends with "
                        f"an error (default: {DEFAULT_RANK_TIMEOUT:g})")


def set_rank_timeout(seconds: float) -> None:
    """How long a rank waits for the others in one blocking step before it gives up (the ``--rank-timeout`` flag)."""
    global _rank_timeout
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < float("inf"):
        raise ValueError(f"the rank timeout must be a positive number of seconds, got {seconds!r}")
    _rank_timeout = float(seconds)


def check_shardable(model_path: Path, pipeline: bool = False) -> None:
    """Refuse, before any weight is read, a target mlx-lm cannot shard this way over this many ranks."""
    from mlx_lm.utils import load_model

    ranks = world().size()
    probe, _ = load_model(model_path, lazy=True, strict=False)  # lazy: nothing is read but the config
    kind = getattr(probe, "model_type", type(probe).__module__.rsplit(".", 1)[-1])
    if pipeline:
        if not hasattr(probe.model, "pipeline"):
            raise ValueError(f"mlx-lm's {kind} models have no pipeline sharding; drop --pipeline to split each "
                             "layer's weights over the ranks instead (tensor parallelism)")
        if not (model_path / "model.safetensors.index.json").is_file():
            raise ValueError(f"{model_path} has no model.safetensors.index.json, which pipeline loading reads; "
                             "save the model with mlx_lm.convert")
        if len(probe.model.layers) < ranks:
            raise ValueError(f"the target has {len(probe.model.layers)} layers, fewer than the {ranks} pipeline ranks")
        return
    if not hasattr(probe, "shard"):
        hint = "; try --pipeline" if hasattr(probe.model, "pipeline") else ""
        raise ValueError(f"mlx-lm's {kind} models have no tensor-parallel sharding{hint}")
    for name in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(probe.args, name, None)
        if heads and heads % ranks:
            raise ValueError(f"the target has {heads} {name.replace('num_', '').replace('_', ' ')}, which {ranks} "
                             "ranks cannot share evenly; launch a number of ranks that divides it")


def sharded_load(model_path: Path, tokenizer_config: dict | None = None, pipeline: bool = False):
    """The target's shard on this rank, as mlx-lm's ``sharded_load`` makes it: tensor parallelism over every rank,
    or with ``pipeline`` a pipeline over every rank (each runs a run of consecutive layers)."""
    from mlx_lm.utils import sharded_load as mlx_sharded_load

    group = world()
    model, tokenizer = mlx_sharded_load(
        str(model_path), pipeline_group=group if pipeline else None, tensor_group=None if pipeline else group,
        tokenizer_config=tokenizer_config)
    model.treeflash_group = group
    return model, tokenizer


def sharding_group(model: nn.Module) -> mx.distributed.Group | None:
    """The group ``model`` is sharded over, None for a whole model on one process."""
    group = getattr(model, "treeflash_group", None)
    if group is not None:
        return group if group.size() > 1 else None
    if getattr(model.model, "pipeline_size", 1) > 1:  # loaded by mlx-lm's sharded_load
        return world()
    layer = next(layer for layer in model.model.layers if layer is not None)
    for _, module in layer.named_modules():
        group = getattr(module, "group", None)
        if isinstance(group, mx.distributed.Group) and group.size() > 1:
            return world()
    return None


class _Watchdog:
    """Ends the process, with one line, when a watched wait outlasts its deadline."""

    def __init__(self):
        self._lock = threading.Condition()
        self._deadline: float | None = None
        self._what = ""
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, what: str, seconds: float):
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="treeflash-rank-watchdog", daemon=True)
                self._thread.start()
            self._deadline, self._what = time.monotonic() + seconds, what
            self._lock.notify()
        try:
            yield
        finally:
            with self._lock:
                self._deadline = None

    def _run(self) -> None:
        with self._lock:
            while True:
                if self._deadline is None:
                    self._lock.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._lock.wait(left)
                    continue
                # The main thread is stuck inside a collective: nothing can unwind it, so the process ends here.
                sys.__stderr__.write(f"error: rank {world().rank()} waited {_rank_timeout:g} s for the other ranks "
                                 f"({self._what}); a rank died or hangs. Check every machine, then launch again "
                                 "(--rank-timeout sets the wait)\n")
                sys.__stderr__.flush()
                os._exit(1)


_watchdog = _Watchdog()


@contextmanager
def watched(what: str):
    """A blocking step that needs the other ranks: bounded by the rank timeout, and a failed collective reported
    as ``RankLost`` (one line) rather than MLX's RuntimeError."""
    try:
        with _watchdog.watch(what, _rank_timeout):
            yield
    except RuntimeError as err:
        if str(err).startswith(_BACKEND_ERRORS):
            raise RankLost(f"rank {world().rank()} lost the other ranks ({what}: {err}); a rank died or its "
                           "connection failed") from err
        raise


class Alone:
    """One process holds the whole target: the round's tree and choice are its own."""

    together = False  # True where other ranks must take each round's tree and choice from rank 0

    def tree(self, tree: DraftTree) -> DraftTree:
        return tree

    def accept(self, logits, tree, sampler, keys):
        return sample_and_accept(logits, tree, sampler, keys)

    def eval(self, *arrays) -> None:
        mx.eval(*arrays)


class Ranks(Alone):
    """The ranks of a sharded target agreeing on each round: rank 0's tree and rank 0's accepted path.

    Broadcasts carry a fixed number of values (every rank must pass the same shape): ``capacity``, the largest of
    the ranks' bounds on a tree's nodes. A first value of -1 carries rank 0's failure to the others, which then
    raise too instead of waiting."""

    FAILED = -1
    together = True

    def __init__(self, group: mx.distributed.Group, capacity: int):
        self.group = group
        self.main = group.rank() == 0
        with watched("the start of the generation"):  # the largest of the ranks' bounds: one shape for all
            self.capacity = int(mx.distributed.all_max(mx.array(capacity), group=group, stream=mx.cpu).item())

    def _broadcast(self, values: list[int] | None, what: str) -> np.ndarray:
        """Rank 0's ``values`` (padded to 2 + 2 * capacity; None: its failure) on every rank."""
        size = 2 + 2 * self.capacity
        buf = np.zeros(size, dtype=np.int32)
        if self.main:
            values = [self.FAILED] if values is None else values
            buf[: len(values)] = values
        tic = time.perf_counter()
        with watched(what):
            out = np.array(mx.distributed.all_sum(mx.array(buf), group=self.group, stream=mx.cpu))
        broadcasts.seconds += time.perf_counter() - tic
        broadcasts.count += 1
        if out[0] == self.FAILED:
            raise ValueError(f"rank 0 failed ({what}); its error is in rank 0's output")
        return out

    def _fail_together(self, what: str):
        """On rank 0: tell the others before raising, so that they stop too."""
        if self.main:
            self._broadcast(None, what)

    def tree(self, tree: DraftTree) -> DraftTree:
        """Rank 0's tree, on every rank: node count, copied count, tokens, parents."""
        cap = self.capacity
        if self.main and len(tree) > cap:
            self._fail_together("the tree")
            raise ValueError(f"a draft tree of {len(tree)} nodes exceeds the {cap} the ranks exchange")
        values = None
        if self.main:
            values = [len(tree), tree.copied, *tree.tokens.tolist(), *[0] * (cap - len(tree)), *tree.parents.tolist()]
        out = self._broadcast(values, "the draft tree")
        if self.main:
            return tree
        n = int(out[0])
        parents = out[2 + cap : 2 + cap + n].astype(np.int64)
        depths = np.zeros(n, dtype=np.int64)
        for i in range(1, n):  # parents precede children
            depths[i] = depths[parents[i]] + 1
        return DraftTree(out[2 : 2 + n].astype(np.int64), parents, depths, int(out[1]))

    def accept(self, logits, tree, sampler, keys):
        """Rank 0 samples and walks the tree; every rank commits its path and bonus token. The others evaluate
        their share of the verification first: its collectives must run in the same order on every rank."""
        if not self.main:
            with watched("the verification"):
                mx.eval(logits)
            out = self._broadcast(None, "the accepted path")
            path = out[2 : 2 + int(out[0])].tolist()
            return path, int(out[1]), log_softmax(logits[mx.array(path)])
        try:
            with watched("the verification"):
                path, bonus, rows = sample_and_accept(logits, tree, sampler, keys)
        except RankLost:
            raise
        except Exception:
            self._fail_together("the accepted path")
            raise
        self._broadcast([len(path), bonus, *path], "the accepted path")
        return path, bonus, rows

    def eval(self, *arrays) -> None:
        with watched("the prefill"):
            mx.eval(*arrays)


def ranks_of(model: nn.Module, capacity: int) -> Alone:
    """How the rounds of a generation with ``model`` agree: ``Alone`` for a whole model, ``Ranks`` for a shard.
    ``capacity``: the most nodes a draft tree of this generation can have."""
    group = sharding_group(model)
    return Alone() if group is None else Ranks(world(), capacity)
