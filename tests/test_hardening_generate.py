"""Generation's inputs, through the API and the command lines: token ids, sizes, text encodings, numbers, closed
pipes, Ctrl-C, the context's limit and stop strings. Each is refused in one line (or said in one line), never a
crash, a traceback, unbounded memory or silent nonsense."""

from __future__ import annotations

import io
import math
import signal
import subprocess
import sys
import time
import warnings
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from cli_helpers import ENV, ROOT, one_error_line, run_main
from conftest import mlx_lm_greedy, save_drafter, save_target, tiny_drafter, tiny_target

from treeflash_mlx import load, stream_generate
from treeflash_mlx._cli import is_command_line
from treeflash_mlx.benchmark import main as benchmark_main
from treeflash_mlx.generate import build_parser, main, prompt_tokens
from treeflash_mlx.speculative import ContextLimitWarning
from treeflash_mlx.validation import check_tree_budget, tables_bytes, tree_capacity, verify_bytes


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    target = tiny_target("qwen3")
    return save_target(target, root / "target"), save_drafter(tiny_drafter(target), root / "drafter")

@pytest.fixture(scope="module")
def loaded(pair):
    return load(str(pair[0]), str(pair[1]))

@pytest.mark.parametrize("bad", [10**9, 256, 99999, -1, -(2**40), 2.0, True, "7"])
def test_prompt_token_ids_outside_the_vocabulary_are_refused(loaded, bad):
    model, tokenizer, drafter = loaded
    with pytest.raises(ValueError, match="prompt"):
        next(stream_generate(model, tokenizer, [1, 2, bad], 2, drafter=drafter))

def test_prompt_arrays_must_hold_integers(loaded):
    model, tokenizer, drafter = loaded
    with pytest.raises(ValueError, match="token ids"):
        next(stream_generate(model, tokenizer, mx.array([1.0, 2.5]), 2, drafter=drafter))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        next(stream_generate(model, tokenizer, mx.array([1, 300]), 2, drafter=drafter))
    out = [r.token for r in stream_generate(model, tokenizer, np.array([1, 255]), 3, drafter=drafter)]
    assert out == mlx_lm_greedy(model, [1, 255], 3)  # numpy integers are ids like any other

@pytest.mark.parametrize("returned", [256, -1, 10**6])
def test_a_sampler_returning_an_id_outside_the_vocabulary_is_refused(loaded, returned):
    model, tokenizer, drafter = loaded
    with pytest.raises(ValueError, match="the sampler returned token id"):
        list(stream_generate(model, tokenizer, [1, 2], 8, drafter=drafter,
                             sampler=lambda logprobs: mx.full(logprobs.shape[:-1], returned)))

def test_tree_capacity_is_what_the_tables_can_fill():
    assert tree_capacity("treeflash", 16, 16, 16) == 1 + 16 + 14 * 16 * 16
    assert tree_capacity("marginal", 3, 8, 4) == 1 + 4 + 16
    assert tree_capacity("chain", 16, 8, 4) == 16 and tree_capacity("ar", 16, 8, 4) == 1
    assert tree_capacity("marginal", 200, 8, 16) > 10**12  # no overflow, no endless loop

@pytest.mark.parametrize("mode,size", [("treeflash", 10**5), ("marginal", 10**9), ("treeflash", 1 + 16 + 6 * 8 * 16 + 1)])
def test_a_tree_budget_beyond_the_tables_or_memory_is_refused_before_allocating(loaded, mode, size):
    model, tokenizer, drafter = loaded  # block 8, top-m 8, top-k 16
    with pytest.raises(ValueError, match="tree_size"):
        next(stream_generate(model, tokenizer, [1, 2], 4, drafter=drafter, mode=mode, tree_size=size, draft_top_m=8))

def test_the_memory_estimate_refuses_what_does_not_fit():
    need = verify_bytes(1000, 4000, 150_000, 32)
    assert need > 1000 * 150_000 * 4 and need > 1000 * 5000 * 32 * 4
    check_tree_budget(64, "treeflash", 16, 16, 16, 4000, 150_000, 32, available=64 << 30)
    with pytest.raises(ValueError, match=r"needs about .* GiB .* use a smaller tree_size"):
        check_tree_budget(3000, "treeflash", 16, 16, 16, 4000, 150_000, 32, available=8 << 30)
    # the head's tables: (B-2)·m rows of hidden states and logits, whatever the tree budget
    assert tables_bytes(16, 10**9, 150_000, 4096) == tables_bytes(16, 150_000, 150_000, 4096) > 14 * 150_000**2 * 8
    assert tables_bytes(16, 16, 150_000, 4096, head_vocab=64) < tables_bytes(16, 16, 150_000, 4096) / 50
    with pytest.raises(ValueError, match=r"tree_size 16 \(top_m 150000\) needs about"):
        check_tree_budget(16, "treeflash", 16, 10**9, 16, 100, 150_000, 32, available=64 << 30, hidden_size=4096)
    check_tree_budget(16, "marginal", 16, 10**9, 16, 100, 150_000, 32, available=64 << 30, hidden_size=4096)
    check_tree_budget(10**6, "chain", 16, 16, 16, 4000, 150_000, 32, available=1)  # budget unused: no check


def test_a_top_m_beyond_the_vocabulary_is_the_vocabulary(loaded):
    model, tokenizer, drafter = loaded
    out = [r.token for r in stream_generate(model, tokenizer, [1, 2], 4, drafter=drafter, draft_top_m=10**9, draft_top_k=10**9)]
    assert out == mlx_lm_greedy(model, [1, 2], 4)  # top_m beyond the vocabulary is the vocabulary


def test_cli_tree_size_out_of_bounds_is_one_line(pair, capsys):
    code, out, err = run_main(capsys, main, "--model", pair[0], "--drafter", pair[1], "-p", "x", "--tree-size",
                              100000, "--json")
    assert code == 1 and out == "" and "tree_size 100000" in one_error_line(err)

class _Stdin:
    def __init__(self, data: bytes):
        self.buffer = io.BytesIO(data)

@pytest.mark.parametrize("data", [b"\xff\xfe def f", b"abc \xc3", b"\xed\xa0\x80 surrogate"])
@pytest.mark.parametrize("template", [True, False])
def test_invalid_utf8_on_stdin_is_one_clear_line(pair, capsys, monkeypatch, data, template):
    monkeypatch.setattr(sys, "stdin", _Stdin(data))
    argv = ["--model", pair[0], "--prompt", "-", "--json"] + ([] if template else ["--ignore-chat-template"])
    code, out, err = run_main(capsys, main, *argv)
    assert code == 1 and out == "" and "the prompt read from stdin is not valid UTF-8" in one_error_line(err)

def test_undecodable_prompt_argument_is_refused(loaded):
    _, tokenizer, _ = loaded
    args = build_parser().parse_args(["-p", "abc" + b"\xff".decode("utf-8", "surrogateescape")])
    with pytest.raises(ValueError, match="the --prompt text is not valid UTF-8"):
        prompt_tokens(tokenizer, args)

def test_valid_utf8_on_stdin_is_read(loaded, monkeypatch):
    _, tokenizer, _ = loaded
    monkeypatch.setattr(sys, "stdin", _Stdin("é ✓".encode()))
    args = build_parser().parse_args(["-p", "-", "--ignore-chat-template"])
    assert tokenizer.decode(prompt_tokens(tokenizer, args)) == "é ✓"

FLOAT_OPTIONS = ["--temp", "--top-p", "--min-p", "--repetition-penalty", "--draft-temp"]

@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("option", FLOAT_OPTIONS)
def test_non_finite_float_options_are_refused(pair, capsys, option, value):
    code, out, err = run_main(capsys, main, "--model", pair[0], "-p", "x", f"{option}={value}", "--json")
    assert code == 1 and out == "" and option in one_error_line(err)

@pytest.mark.parametrize("option,value", [("--seed", -1), ("--seed", 2**64), ("--repetition-context-size", 0),
                                          ("--top-k", -3), ("--max-tokens", -5)])
def test_out_of_range_integer_options_are_refused(pair, capsys, option, value):
    code, out, err = run_main(capsys, main, "--model", pair[0], "-p", "x", option, value, "--json")
    assert code == 1 and out == "" and option in one_error_line(err)

@pytest.mark.parametrize("value", [math.nan, math.inf, 0.0, -1.0])
def test_api_drafter_temperature_must_be_finite_and_positive(loaded, value):
    model, tokenizer, drafter = loaded
    with pytest.raises(ValueError, match="draft_temp must be (a finite number )?> 0"):
        next(stream_generate(model, tokenizer, [1, 2], drafter=drafter, draft_temp=value))

@pytest.mark.parametrize("argv", [["--temp", "nan"], ["--temp", "inf"], ["--seed", "-1"]])
def test_benchmark_refuses_non_finite_or_out_of_range_numbers(pair, capsys, argv):
    code, out, err = run_main(capsys, benchmark_main, "--model", pair[0], "--drafter", pair[1], *argv)
    assert code == 1 and argv[0] in one_error_line(err)

def test_a_closed_output_pipe_ends_quietly(pair):
    cmd = (f"{sys.executable} -m treeflash_mlx.generate --model {pair[0]} --drafter {pair[1]} -p abc "
           "--max-tokens 300 --ignore-chat-template | head -c 1")
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, env=ENV, timeout=120)
    assert proc.stderr.decode() == "" and proc.returncode == 141

def mlx_loaded(pid: int) -> bool:
    try:
        return "libmlx" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see when MLX is being loaded")
def test_ctrl_c_while_importing_is_one_line(pair):
    def as_from_a_shell():  # a Ctrl-C reaches the command: the test process's own signal state is not passed on
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # an ignored SIGINT is inherited through exec...
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])  # ...and so is a blocked one

    proc = subprocess.Popen([sys.executable, "-m", "treeflash_mlx.generate", "--model", str(pair[0]), "-p", "x",
                             "--max-tokens", "4000", "--ignore-chat-template"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, preexec_fn=as_from_a_shell)
    deadline = time.monotonic() + 60
    while not mlx_loaded(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)  # MLX's library is mapped: the package's imports are under way
    _, err = proc.communicate(timeout=120)
    assert err.decode().strip() == "error: interrupted" and proc.returncode in (130, -signal.SIGINT)


@pytest.mark.parametrize("argv0,orig,expected", [
    ("-m", ["python", "-m", "treeflash_mlx.generate", "-p", "x"], True),
    ("-m", ["python", "-m", "treeflash_mlx", "-p", "x"], True),
    ("/venv/bin/treeflash-convert", None, True),
    (str(ROOT / "convert" / "convert.py"), None, True),
    ("-m", ["python", "-m", "pytest"], False),
    ("my_app.py", None, False),
    ("", None, False),
])
def test_only_the_packages_command_lines_replace_pythons_interrupt_report(monkeypatch, argv0, orig, expected):
    monkeypatch.setattr(sys, "argv", [argv0])
    monkeypatch.setattr(sys, "orig_argv", orig or ["python", argv0])
    assert is_command_line() is expected


def test_a_generation_cut_short_by_the_context_says_so(loaded, pair, capsys):
    model, tokenizer, drafter = loaded
    prompt = [5] * 4090  # context 4096
    with pytest.warns(ContextLimitWarning, match="leaves room for only 6 of the 32 tokens"):
        out = list(stream_generate(model, tokenizer, prompt, 32, drafter=drafter, mode="chain"))
    assert len(out) == 6 and out[-1].finish_reason == "length"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(stream_generate(model, tokenizer, prompt, 6, drafter=drafter, mode="chain"))  # nothing cut: quiet
    code, out, err = run_main(capsys, main, "--model", pair[0], "--drafter", pair[1], "-p", "a" * 4090,
                              "--ignore-chat-template", "--max-tokens", 32, "--mode", "chain", "--json")
    assert code == 0 and len(json.loads(out)["tokens"]) == 6
    assert [line for line in err.splitlines() if line] == [
        "warning: the model's context of 4096 tokens leaves room for only 6 of the 32 tokens asked after a "
        "4090-token prompt"]

def test_a_single_stop_string_is_one_string(loaded):
    model, tokenizer, drafter = loaded
    full = "".join(r.text for r in stream_generate(model, tokenizer, [1, 2, 3], 30, drafter=drafter))
    stop = full[8:11]
    assert len(set(stop)) > 1 and full.index(stop) > 0
    as_string = "".join(r.text for r in stream_generate(model, tokenizer, [1, 2, 3], 30, drafter=drafter,
                                                        stop_strings=stop))
    as_list = "".join(r.text for r in stream_generate(model, tokenizer, [1, 2, 3], 30, drafter=drafter,
                                                      stop_strings=[stop]))
    assert as_string == as_list == full[: full.index(stop)]
