"""`python -m treeflash_mlx.generate`: output, chat template, stop conditions and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import mlx_lm_greedy, save_drafter, save_target, tiny_drafter, tiny_target
from mlx_lm.tokenizer_utils import TokenizerWrapper

from treeflash_mlx import load, stream_generate
from treeflash_mlx.generate import build_parser, main, prompt_tokens


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    target = tiny_target("qwen3")
    return (save_target(target, root / "target"), save_drafter(tiny_drafter(target), root / "drafter"),
            save_drafter(tiny_drafter(tiny_target("qwen3", hidden=32)), root / "other"))


def run_main(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_reports_everything_and_is_lossless(pair, capsys):
    target_dir, drafter_dir, _ = pair
    code, out, _ = run_main(capsys, "--model", target_dir, "--drafter", drafter_dir, "--prompt", "def f(x):",
                            "--max-tokens", 40, "--json", "--ignore-chat-template")
    assert code == 0
    result = json.loads(out)
    assert set(result) == {"text", "tokens", "acceptance_lengths", "mean_acceptance_length", "prompt_tps",
                           "generation_tps", "peak_memory_gb", "mode", "model_path", "drafter_path",
                           "tree_size_auto"}
    assert result["mode"] == "treeflash" and result["drafter_path"] == str(drafter_dir)
    assert result["model_path"] == str(target_dir) and len(result["tokens"]) == 40
    model, tokenizer, _ = load(str(target_dir))
    assert result["tokens"] == mlx_lm_greedy(model, tokenizer.encode("def f(x):"), 40)
    assert sum(result["acceptance_lengths"]) == 40 - 1
    assert result["mean_acceptance_length"] == pytest.approx(39 / len(result["acceptance_lengths"]))


def test_streams_text_and_verbose_summary(pair, capsys):
    target_dir, drafter_dir, _ = pair
    code, out, _ = run_main(capsys, "--model", target_dir, "--drafter", drafter_dir, "-p", "hi", "-m", 10,
                            "--mode", "chain", "--verbose")
    assert code == 0 and "Generation: 10 tokens" in out and "Acceptance:" in out


def test_chat_template_is_applied_by_default(pair):
    _, tokenizer, _ = load(str(pair[0]))
    parse = build_parser().parse_args
    plain = prompt_tokens(tokenizer, parse(["--model", "m", "-p", "hi", "--ignore-chat-template"]))
    chat = prompt_tokens(tokenizer, parse(["--model", "m", "-p", "hi"]))
    system = prompt_tokens(tokenizer, parse(["--model", "m", "-p", "hi", "--system-prompt", "be brief"]))
    assert tokenizer.decode(plain) == "hi"
    assert tokenizer.decode(chat) == "<|user|>hi\n<|assistant|>"
    assert tokenizer.decode(system) == "<|system|>be brief\n<|user|>hi\n<|assistant|>"


BAD = {
    "empty prompt": (["-p", ""], "the prompt is empty"),
    "zero tokens": (["-p", "x", "--max-tokens", "0"], "--max-tokens must be at least 1"),
    "negative temp": (["-p", "x", "--temp", "-0.5"], "--temp must be >= 0"),
    "bad top-p": (["-p", "x", "--top-p", "0"], "--top-p must be in (0, 1]"),
    "bad tree size": (["-p", "x", "--tree-size", "0"], "tree_size must be at least 1"),
    "too long": (["-p", "x" * 5000, "--ignore-chat-template"], "the prompt has 5000 tokens but the model's context is 4096"),
    "missing drafter": (["-p", "x", "--drafter", "/nonexistent/drafter"], "drafter directory '/nonexistent/drafter' does not exist"),
    "missing model": (["-p", "x", "--model", "./no-model"], "model directory './no-model' does not exist"),
    "mismatched": (["-p", "x", "--drafter", "OTHER"], "drafter does not match the target: hidden size 32"),
    "empty stop string": (["-p", "x", "--stop", ""], "stop strings must be non-empty text"),
    "ar with head mode": (["-p", "x", "--drafter", "NONE", "--mode", "treeflash"], "mode 'treeflash' needs a drafter"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_gives_one_clear_line_and_no_output(pair, capsys, case):
    target_dir, _, other = pair
    argv, message = BAD[case]
    argv = [str(other) if a == "OTHER" else a for a in argv]
    if "--model" not in argv:
        argv = ["--model", target_dir] + argv
    if "NONE" in argv:
        argv = [a for a in argv if a not in ("--drafter", "NONE")]
    code, out, err = run_main(capsys, *argv, "--json")
    assert code == 1 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err


def test_eos_and_stop_strings_end_the_stream(pair):
    model, tokenizer, drafter = load(str(pair[0]), str(pair[1]))
    prompt = tokenizer.encode("abc")
    reference = mlx_lm_greedy(model, prompt, 30)
    eos = reference[12]
    first = reference.index(eos)
    with_eos = TokenizerWrapper(tokenizer._tokenizer, eos_token_ids=[eos])
    out = list(stream_generate(model, with_eos, prompt, 30, drafter=drafter))
    assert [r.token for r in out] == reference[: first + 1] and out[-1].finish_reason == "stop"

    full = "".join(r.text for r in stream_generate(model, tokenizer, prompt, 30, drafter=drafter))
    stop = full[10:13]
    out = list(stream_generate(model, tokenizer, prompt, 30, drafter=drafter, stop_strings=[stop]))
    text = "".join(r.text for r in out)
    assert text == full[: full.index(stop)] and out[-1].finish_reason == "stop"


def test_module_entry_point_reads_the_prompt_from_stdin(pair):
    target_dir, drafter_dir, _ = pair
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "treeflash_mlx.generate", "--model", str(target_dir), "--drafter", str(drafter_dir),
         "--prompt", "-", "--max-tokens", "8", "--json", "--ignore-chat-template"],
        input="hello", capture_output=True, text=True, env=env, cwd=Path(__file__).parent, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["tokens"]) == 8
