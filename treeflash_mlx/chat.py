"""A terminal chat: ``python -m treeflash_mlx.chat --model M --drafter D`` (no model: the bundled demo pair).

Answers stream as they are committed; the conversation's prompt cache is kept between turns, so each turn
prefills only what is new. After each answer a line gives tokens/s, the mean acceptance length, how many
prompt tokens came from the cache and, with ``--tree-size auto``, the share of plain steps. ``q`` quits, ``r``
resets the conversation, ``h`` shows the help.
"""

from __future__ import annotations

import argparse
import sys

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from . import quantized_kv
from ._cli import add_drafting_arguments, drafting_settings, run_cli
from .drafting import default_mode, make_drafting
from .loading import demo_paths, load
from .prompt_cache import make_prompt_cache
from .speculative import stream_generate
from .target import Target

HELP = "Type a message and press Enter. Commands: 'q' quits, 'r' resets the conversation, 'h' shows this help."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m treeflash_mlx.chat",
                                description="Chat in the terminal with lossless tree-drafted decoding.")
    p.add_argument("--model", default=None, help="target (default: the bundled demo pair)")
    p.add_argument("--drafter", default=None, help="drafter directory or hub repo id")
    p.add_argument("--max-tokens", "-m", type=int, default=256, help="tokens per answer")
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system-prompt", default=None)
    add_drafting_arguments(p)
    quantized_kv.add_arguments(p)
    return p


def check_args(args: argparse.Namespace) -> None:
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.temp < 0:
        raise ValueError(f"--temp must be >= 0, got {args.temp}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0, got {args.top_k}")
    if not 0 <= args.min_p <= 1:
        raise ValueError(f"--min-p must be in [0, 1], got {args.min_p}")
    if args.repetition_penalty is not None and args.repetition_penalty <= 0:
        raise ValueError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")
    quantized_kv.check_arguments(args)


def encode(tokenizer, messages: list[dict]) -> list[int]:
    if tokenizer.chat_template is None:
        return tokenizer.encode("".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: ")
    try:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as err:  # e.g. a template that refuses a system message
        raise ValueError(f"the model's chat template failed ({err})") from err
    return list(prompt["input_ids"] if isinstance(prompt, dict) else prompt)


def run(args: argparse.Namespace) -> None:
    check_args(args)
    model, tokenizer, drafter = load(*demo_paths(args.model, args.drafter))
    mode = args.mode or default_mode(drafter)
    if args.seed is not None:
        mx.random.seed(args.seed)
    settings = dict(mode=mode, **drafting_settings(args))
    make_drafting(drafter, Target(model), **settings)  # the settings checked before the first turn
    kv = quantized_kv.check_arguments(args)
    sampler = make_sampler(args.temp, args.top_p, args.min_p, top_k=args.top_k)
    processors = make_logits_processors(None, args.repetition_penalty)
    start = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    messages, cache = list(start), make_prompt_cache(model, drafter)
    print(f"[{mode} drafting] {HELP}", flush=True)
    while True:
        print(">> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "q":  # end of input quits too
            print()
            return
        text = line.strip()
        if text == "h":
            print(HELP, flush=True)
            continue
        if text == "r":
            messages, cache = list(start), make_prompt_cache(model, drafter)
            print("[conversation reset]", flush=True)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        answer, rounds, last = "", {}, None
        drafting = make_drafting(drafter, Target(model), **settings)
        for r in stream_generate(model, tokenizer, encode(tokenizer, messages), args.max_tokens, drafter=drafting,
                                 sampler=sampler, logits_processors=processors, prompt_cache=cache, **kv):
            print(r.text, end="", flush=True)
            answer += r.text
            rounds[r.round] = r.acceptance_length
            last = r
        messages.append({"role": "assistant", "content": answer})
        taus = [v for k, v in rounds.items() if k > 0]
        tau = f"{sum(taus) / len(taus):.2f}" if taus else "-"
        tuner = getattr(drafting, "tuner", None)  # --tree-size auto
        plain = f", plain steps {tuner.report()['plain_step_fraction']:.0%}" if tuner else ""
        print(f"\n[{last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s, acceptance {tau}, "
              f"prompt {last.prompt_tokens} tokens of which {last.cached_tokens} cached{plain}]", flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
