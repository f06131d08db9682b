"""Command line: ``python -m treeflash_mlx.generate --model M --drafter D --prompt "..."`` (flags as mlx-lm's)."""

from __future__ import annotations

import argparse
import json
import sys
import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from . import distributed, quantized_kv
from ._cli import add_drafting_arguments, drafting_settings, run_cli
from .drafting import default_mode, make_drafting
from .loading import DEMO, demo_paths, load  # noqa: F401  (DEMO: where the tests and scripts look)
from .prompt_cache import make_prompt_cache
from .speculative import PREFILL_STEP, stream_generate, summary
from .target import Target
from .validation import finite, integer, utf8_text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m treeflash_mlx.generate",
        description="Lossless TreeFlash speculative generation with an mlx-lm target and a block drafter.",
    )
    p.add_argument("--model", default=None,
                   help="target: mlx-lm/Hugging Face directory or hub repo id (default: the bundled demo pair)")
    p.add_argument("--drafter", default=None, help="drafter directory or hub repo id (TreeFlash or DFlash)")
    p.add_argument("--prompt", "-p", required=True, help="the prompt; '-' reads it from stdin")
    p.add_argument("--max-tokens", "-m", type=int, default=256)
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--repetition-context-size", type=int, default=20)
    p.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")
    add_drafting_arguments(p)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--prefill-step-size", type=int, default=PREFILL_STEP,
                   help=f"prompt tokens per target pass; smaller lowers the prefill's peak memory (default: "
                        f"{PREFILL_STEP})")
    quantized_kv.add_arguments(p)
    p.add_argument("--ignore-chat-template", action="store_true")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--verbose", action="store_true",
                   help="show the prefill's progress on stderr (prompts of several chunks), then speed, "
                        "acceptance and memory after the text")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    distributed.add_arguments(p)
    return p


MAX_SEED = 2**64 - 1  # MLX seeds are unsigned 64-bit


def check_args(args: argparse.Namespace) -> None:
    """Every numeric option: integers in range, floats finite (argparse's float() accepts 'nan' and 'inf')."""
    integer("--max-tokens", args.max_tokens, low=1)
    finite("--temp", args.temp, low=0)
    finite("--top-p", args.top_p, low=0, high=1, low_open=True)
    integer("--top-k", args.top_k, low=0)
    finite("--min-p", args.min_p, low=0, high=1)
    if args.repetition_penalty is not None:
        finite("--repetition-penalty", args.repetition_penalty, low=0, low_open=True)
    integer("--repetition-context-size", args.repetition_context_size, low=1)
    if args.seed is not None:
        integer("--seed", args.seed, low=0, high=MAX_SEED)
    if args.draft_temp is not None:
        finite("--draft-temp", args.draft_temp, low=0, low_open=True)
    integer("--prefill-step-size", args.prefill_step_size, low=1)
    finite("--rank-timeout", args.rank_timeout, low=0, low_open=True)
    quantized_kv.check_arguments(args)


def show_progress(processed: int, total: int, step: int) -> None:
    """One line on stderr, rewritten after each prefill chunk, for prompts of more than one chunk."""
    if total <= step:
        return
    end = "\n" if processed == total else ""
    print(f"\rPrefill: {processed}/{total} tokens ({100 * processed // total}%)", end=end, file=sys.stderr,
          flush=True)


def prompt_tokens(tokenizer, args: argparse.Namespace) -> list[int]:
    if args.prompt == "-":
        text = utf8_text(sys.stdin.buffer.read(), "the prompt read from stdin")
    else:
        text = utf8_text(args.prompt, "the --prompt text")
    if args.system_prompt is not None:
        utf8_text(args.system_prompt, "the --system-prompt text")
    if not text:
        raise ValueError("the prompt is empty; pass text with --prompt (or pipe it with --prompt -)")
    if args.ignore_chat_template or tokenizer.chat_template is None:
        return tokenizer.encode(text)
    messages = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    messages.append({"role": "user", "content": text})
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as err:  # e.g. a template that refuses a system message
        raise ValueError(f"the model's chat template failed ({err}); try --ignore-chat-template") from err


def run(args: argparse.Namespace) -> None:
    with distributed.rank0_prints():  # under mlx.launch every process runs this; rank 0 alone prints
        _run(args)


def _run(args: argparse.Namespace) -> None:
    check_args(args)
    distributed.set_rank_timeout(args.rank_timeout)
    args.model, args.drafter = demo_paths(args.model, args.drafter)  # no model: the bundled demo pair
    if args.seed is not None:
        mx.random.seed(args.seed)
    model, tokenizer, drafter = load(args.model, args.drafter, pipeline=args.pipeline)
    prompt = prompt_tokens(tokenizer, args)
    mode = args.mode or default_mode(drafter)
    drafting = make_drafting(drafter, Target(model), mode, **drafting_settings(args))  # kept: its choices are reported
    tuner = getattr(drafting, "tuner", None)  # --tree-size auto
    cache = make_prompt_cache(model, drafter)  # kept here to report the caches' bytes
    progress = (lambda done, total: show_progress(done, total, args.prefill_step_size)) if args.verbose else None
    responses = stream_generate(
        model, tokenizer, prompt, args.max_tokens,
        drafter=drafting,
        sampler=make_sampler(args.temp, args.top_p, args.min_p, top_k=args.top_k),
        logits_processors=make_logits_processors(None, args.repetition_penalty, args.repetition_context_size),
        stop_strings=args.stop,
        prompt_cache=cache, prefill_step_size=args.prefill_step_size, prompt_progress_callback=progress,
        **quantized_kv.check_arguments(args),
    )
    text, tokens, rounds, last = "", [], {}, None
    for response in responses:
        if not args.json:
            print(response.text, end="", flush=True)
        text += response.text
        tokens.append(response.token)
        rounds[response.round] = response.acceptance_length
        last = response
    taus = [tau for r, tau in rounds.items() if r > 0]
    mean_tau = sum(taus) / len(taus) if taus else None
    if args.json:
        print(json.dumps({
            "text": text,
            "tokens": tokens,
            "acceptance_lengths": taus,
            "mean_acceptance_length": mean_tau,
            "prompt_tps": last.prompt_tps,
            "generation_tps": last.generation_tps,
            "peak_memory_gb": last.peak_memory,
            "mode": mode,
            **({"tree_size_auto": tuner.report()} if tuner else {}),
            "model_path": str(model.model_path),
            "drafter_path": str(drafter.path) if drafter is not None else None,
        }))
        return
    print()
    if args.verbose:
        print(summary(last, taus, cache))
        if tuner:
            print(tuner.summary())


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
