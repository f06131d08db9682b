"""Prefill in chunks with progress: mlx-lm's prompt_progress_callback(processed, total), and --verbose."""

from __future__ import annotations

import re

import pytest
from conftest import mlx_lm_greedy, random_prompts, save_drafter, save_target, tiny_drafter, tiny_target

from treeflash_mlx import make_prompt_cache, stream_generate
from treeflash_mlx.generate import main


@pytest.fixture(scope="module")
def pair():
    target = tiny_target("qwen3", seed=5)
    return target, tiny_drafter(target)


def run(target, tokenizer, prompt, drafter, **kw):
    calls = []
    out = [r.token for r in stream_generate(target, tokenizer, prompt, 12, drafter=drafter,
                                            prompt_progress_callback=lambda *a: calls.append(a), **kw)]
    return out, calls


def test_progress_counts_up_to_the_prompt_chunk_by_chunk_and_changes_nothing(pair, tokenizer):
    target, drafter = pair
    prompt = random_prompts(1, seed=3)[0][:3] + list(range(40, 51))  # 14 tokens
    out, calls = run(target, tokenizer, prompt, drafter, prefill_step_size=4)
    assert calls == [(0, 14), (4, 14), (8, 14), (12, 14), (14, 14)]
    assert out == mlx_lm_greedy(target, prompt, 12)
    assert run(target, tokenizer, prompt, drafter)[1] == [(0, 14), (14, 14)], "one chunk"


def test_with_a_prompt_cache_the_total_is_what_is_left_to_prefill(pair, tokenizer):
    target, drafter = pair
    cache = make_prompt_cache(target, drafter)
    prompt = random_prompts(1, seed=4)[0]
    first, _ = run(target, tokenizer, prompt, drafter, prompt_cache=cache)
    second = prompt + first + list(range(60, 70))
    out, calls = run(target, tokenizer, second, drafter, prompt_cache=cache, prefill_step_size=5)
    left = len(second) - cache.reused
    assert cache.reused > 0 and calls[0] == (0, left) and calls[-1] == (left, left)
    counts = [done for done, _ in calls]
    assert counts == sorted(set(counts)) and all(total == left for _, total in calls)
    assert out == run(target, tokenizer, second, drafter)[0]


def test_a_chunk_split_at_the_kv_switch_is_reported_too(tokenizer):
    target = tiny_target("qwen3", seed=5, hidden=128)
    prompt = list(range(30, 44))  # mlx-lm's calls end at 4, 8, 12, 13: the switch for a start of 13 is 13
    _, calls = run(target, tokenizer, prompt, None, prefill_step_size=4, kv_bits=4, kv_group_size=32,
                   quantized_kv_start=13)
    assert calls == [(0, 14), (4, 14), (8, 14), (12, 14), (13, 14), (14, 14)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    target = tiny_target("qwen3", hidden=128)
    return save_target(target, root / "target"), save_drafter(tiny_drafter(target), root / "drafter")


def cli(capsys, saved, *flags):
    code = main(["--model", str(saved[0]), "--drafter", str(saved[1]), "--ignore-chat-template", "-m", "8",
                 *map(str, flags)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_verbose_shows_prefill_progress_on_one_line_and_the_caches_bytes(saved, capsys):
    code, out, err = cli(capsys, saved, "-p", "x" * 30, "--prefill-step-size", 8, "--verbose")
    assert code == 0
    assert err == "".join(f"\rPrefill: {n}/30 tokens ({100 * n // 30}%)" for n in (0, 8, 16, 24, 30)) + "\n"
    assert "Peak memory:" in out and re.search(r"\nKV cache: target [\d.]+ GB, drafter [\d.]+ GB\n", out)
    code, out, err = cli(capsys, saved, "-p", "x" * 30, "--verbose", "--kv-bits", 8, "--kv-group-size", 32)
    assert code == 0 and err == "", "one chunk: no progress line"
    assert "-bit)" not in out, "the switch is at 5000 tokens by default"
    code, out, _ = cli(capsys, saved, "-p", "x" * 30, "--verbose", "--kv-bits", 8, "--kv-group-size", 32,
                       "--quantized-kv-start", 0)
    assert code == 0 and re.search(r"KV cache: target [\d.]+ GB \(8-bit\), drafter", out)


@pytest.mark.parametrize("flags,message", [
    (["--kv-bits", 7], "error: --kv-bits must be one of 1, 2, 3, 4, 5, 6, 8, got 7"),
    (["--kv-bits", 4, "--kv-group-size", 48], "error: --kv-group-size must be one of 32, 64, 128, got 48"),
    (["--kv-bits", 4, "--quantized-kv-start", -1], "error: --quantized-kv-start must be at least 0, got -1"),
    (["--kv-bits", 4], "error: kv_group_size 64 does not divide the target's head dimension 32; use 32"),
    (["--prefill-step-size", 0], "error: --prefill-step-size must be at least 1, got 0"),
])
def test_bad_flags_are_one_line(saved, capsys, flags, message):
    code, out, err = cli(capsys, saved, "-p", "hi", *flags)
    assert code == 1 and out == "" and err.strip() == message
