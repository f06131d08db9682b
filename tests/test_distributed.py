"""The target sharded over 2 processes on 127.0.0.1 (``mlx.launch --backend ring -n 2``), against one process.

Each launch runs tests/distributed_worker.py on both ranks; the single-process runs happen here. Launches are
few (every case of a kind shares one) because each starts two Python processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlx_lm.sample_utils import make_sampler

from conftest import save_drafter, save_target, tiny_drafter, tiny_target
from treeflash_mlx.loading import DEMO, load
from treeflash_mlx.speculative import stream_generate

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
LAUNCH = Path(sys.executable).with_name("mlx.launch")
PROMPT = "def fib(n):"

pytestmark = pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed next to this Python")


def run_launched(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` of an ``mlx.launch`` command line whose ranks end with it: a launcher that runs past
    ``timeout`` is ended with its whole process group (it does not pass a signal on to the ranks)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def launch(spec: list[dict], out: Path, timeout: float = 400, ranks: int = 2) -> subprocess.CompletedProcess:
    """``ranks`` ranks of the worker over ``spec``; their results land in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return run_launched(
        [str(LAUNCH), "--backend", "ring", "-n", str(ranks), "--python", sys.executable, "--",
         str(WORKER), str(out / "spec.json"), str(out)], timeout, env=env, cwd=ROOT)


def single(case: dict, mode: str, acceptance: bool = False):
    """The same case in this (single) process: its tokens (and with ``acceptance`` the rounds' lengths)."""
    import mlx.core as mx

    model, tokenizer, drafter = load(case["model"], case.get("drafter"))
    if case.get("seed") is not None:
        mx.random.seed(case["seed"])
    kwargs = {"tree_size": case["tree_size"]} if case.get("tree_size") and mode != "ar" else {}
    responses = list(stream_generate(model, tokenizer, case["prompt"], case["max_tokens"],
                                     drafter=drafter if mode != "ar" else None, mode=mode,
                                     sampler=make_sampler(case.get("temp", 0.0)), **kwargs))
    tokens = [r.token for r in responses]
    if not acceptance:
        return tokens
    return tokens, list({r.round: r.acceptance_length for r in responses if r.round > 0}.values())


def save_pair(root: Path, **kwargs) -> tuple[str, str]:
    """A random-weight qwen2 target (tensor- and pipeline-shardable in mlx-lm) and a drafter for it, saved with
    the index file pipeline loading reads."""
    target = tiny_target("qwen2", layers=4, **kwargs)
    path = save_target(target, root / "target")
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "np") as f:
        weights = {k: "model.safetensors" for k in f.keys()}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weights}))
    return str(path), str(save_drafter(tiny_drafter(target), root / "drafter"))


@pytest.fixture(scope="module")
def qwen2_pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="module")
def qwen3_5_pair(tmp_path_factory):
    """A random-weight Qwen3.5 hybrid (Gated DeltaNet and gated attention layers, its own vocabulary-sharded head)."""
    root = tmp_path_factory.mktemp("qwen3_5")
    target = tiny_target("qwen3_5", layers=4)
    return str(save_target(target, root / "target")), str(save_drafter(tiny_drafter(target), root / "drafter"))


@pytest.fixture(scope="module")
def sharded_runs(qwen2_pair, qwen3_5_pair, tmp_path_factory):
    """One launch (mlx.launch's status is 0 even when a rank fails: the result files tell): tensor parallel, the
    demo pair (qwen3) in every mode and the qwen2 pair; the qwen2 pair as a pipeline; seeded sampling; rank 1
    drafting other trees. Each rank's holdings, tokens and acceptance per case and mode."""
    demo = {"model": str(DEMO / "target"), "drafter": str(DEMO / "drafter"), "prompt": PROMPT, "max_tokens": 20}
    qwen2 = {"model": qwen2_pair[0], "drafter": qwen2_pair[1], "prompt": "abcab", "max_tokens": 16, "tree_size": 8}
    cases = [
        {**demo, "name": "demo", "modes": ["treeflash", "marginal", "chain", "ar"], "reference": True},
        {**qwen2, "name": "qwen2", "modes": ["treeflash", "chain"], "reference": True, "probe": True},
        {**qwen2, "name": "qwen2-pipeline", "modes": ["treeflash", "ar"], "pipeline": True, "reference": True,
         "probe": True},
        {**demo, "name": "sampled", "modes": ["treeflash"], "temp": 1.0, "seed": 7, "max_tokens": 16},
        {**qwen2, "name": "other-trees", "modes": ["treeflash"], "rank1_tree_size": 3},
        {**qwen2, "model": qwen3_5_pair[0], "drafter": qwen3_5_pair[1], "name": "qwen3_5",
         "modes": ["treeflash", "chain"], "reference": True},
    ]
    out = tmp_path_factory.mktemp("sharded")
    done = launch(cases, out)
    assert done.returncode == 0 and all((out / f"rank{r}.json").is_file() for r in range(2)), done.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["size"] for r in ranks] == [2, 2]
    return {c["name"]: c for c in cases}, [r["results"] for r in ranks]


@pytest.mark.parametrize("name, mode", [("demo", "treeflash"), ("demo", "marginal"), ("demo", "chain"),
                                        ("demo", "ar"), ("qwen2", "treeflash"), ("qwen2", "chain")])
def test_tensor_parallel_greedy_is_the_single_process_output(sharded_runs, name, mode):
    cases, ranks = sharded_runs
    layers = 5 if name == "demo" else 4
    assert [(r[name]["layers"], r[name]["heads"]) for r in ranks] == [(layers, 2)] * 2  # every layer, half the heads
    assert ranks[0][name][mode] == ranks[1][name][mode]
    assert ranks[0][name][mode] == ranks[0][name]["mlx_lm"]  # lossless against mlx-lm on the same shards
    assert ranks[0][name][mode] == single(cases[name], mode)


@pytest.mark.parametrize("mode", ["treeflash", "chain"])
def test_a_tensor_parallel_hybrid_is_the_single_process_output(sharded_runs, mode):
    """Qwen3.5 over 2 ranks: each holds half of every Gated DeltaNet and attention layer's heads and half the
    vocabulary of the head; the trees' recurrent states and the gathered logits give one process's tokens."""
    cases, ranks = sharded_runs
    assert [(r["qwen3_5"]["layers"], r["qwen3_5"]["heads"]) for r in ranks] == [(4, 2)] * 2
    assert ranks[0]["qwen3_5"][mode] == ranks[1]["qwen3_5"][mode] == ranks[0]["qwen3_5"]["mlx_lm"]
    assert ranks[0]["qwen3_5"][mode] == single(cases["qwen3_5"], mode)


@pytest.mark.parametrize("mode", ["treeflash", "ar"])
def test_pipeline_greedy_is_the_single_process_output(sharded_runs, mode):
    """Each rank runs 2 of the 4 layers. The acceptance is the single process's too: the drafter reads captured
    layers of both ranks (1 and 2), gathered exactly, so every rank drafts the single process's trees."""
    cases, ranks = sharded_runs
    run = [r["qwen2-pipeline"] for r in ranks]
    assert [(r["layers"], r["heads"]) for r in run] == [(2, 4)] * 2
    assert run[0][mode] == run[1][mode] == run[0]["mlx_lm"]
    tokens, acceptance = single(cases["qwen2-pipeline"], mode, acceptance=True)
    assert run[0][mode] == tokens
    assert run[0][f"{mode} acceptance"] == run[1][f"{mode} acceptance"] == acceptance


@pytest.mark.parametrize("name", ["qwen2", "qwen2-pipeline"])
def test_a_tree_verification_gives_every_rank_the_whole_logits_and_features(sharded_runs, name):
    """One branching tree verified after the prompt: every rank holds the logits and every captured layer's
    features (layer 1 runs on rank 1 of the pipeline, layer 2 on rank 0), those of one process: exactly for the
    pipeline (its sums add zeros), to rounding for tensor parallelism (its sums add partial products)."""
    import numpy as np

    from distributed_worker import probe

    cases, ranks = sharded_runs
    model, tokenizer, drafter = load(cases[name]["model"], cases[name]["drafter"])
    alone = probe(model, tokenizer, drafter, cases[name]["prompt"])
    for r in ranks:
        for key in ("logits", "features"):
            got, want = np.array(r[name]["probe"][key]), np.array(alone[key])
            if name.endswith("pipeline"):
                np.testing.assert_array_equal(got, want)
            else:
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_every_rank_verifies_rank_0s_tree(sharded_runs):
    """Rank 1 drafts trees of 3 nodes, rank 0 of 8: both verify and commit rank 0's, as one process does."""
    cases, ranks = sharded_runs
    tokens, acceptance = single(cases["other-trees"], "treeflash", acceptance=True)
    assert ranks[0]["other-trees"]["treeflash"] == ranks[1]["other-trees"]["treeflash"] == tokens
    assert ranks[1]["other-trees"]["treeflash acceptance"] == acceptance


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    """One launch of 4 ranks on a qwen2 pair with 4 key/value heads: tensor parallel (each rank one head of
    each kind) and a pipeline of one layer per rank (the drafter reads layers 1 and 2, run by ranks 2 and 1)."""
    model, drafter = save_pair(tmp_path_factory.mktemp("qwen2-4"), extra={"num_key_value_heads": 4})
    base = {"model": model, "drafter": drafter, "prompt": "abcab", "max_tokens": 16, "tree_size": 8,
            "reference": True}
    cases = [{**base, "name": "tensor", "modes": ["treeflash", "chain"]},
             {**base, "name": "pipeline", "modes": ["treeflash"], "pipeline": True},
             {**base, "name": "sampled", "modes": ["treeflash"], "temp": 1.0, "seed": 3, "reference": False}]
    out = tmp_path_factory.mktemp("four")
    done = launch(cases, out, timeout=600, ranks=4)
    assert done.returncode == 0 and all((out / f"rank{r}.json").is_file() for r in range(4)), done.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    assert [r["size"] for r in ranks] == [4] * 4
    return {c["name"]: c for c in cases}, [r["results"] for r in ranks]


@pytest.mark.parametrize("name, mode, holds", [("tensor", "treeflash", (4, 1)), ("tensor", "chain", (4, 1)),
                                                ("pipeline", "treeflash", (1, 4))])
def test_four_ranks_give_the_single_process_output(four_ranks, name, mode, holds):
    """4 ranks, each holding (layers, attention heads) ``holds``: every rank commits one process's tokens, which
    are mlx-lm's own on the same shards; the pipeline's acceptance is one process's round by round."""
    cases, ranks = four_ranks
    assert [(r[name]["layers"], r[name]["heads"]) for r in ranks] == [holds] * 4
    assert all(r[name][mode] == ranks[0][name][mode] for r in ranks)
    assert ranks[0][name][mode] == ranks[0][name]["mlx_lm"]
    tokens, acceptance = single(cases[name], mode, acceptance=True)
    assert ranks[0][name][mode] == tokens
    if name == "pipeline":
        assert all(r[name][f"{mode} acceptance"] == acceptance for r in ranks)


def test_four_ranks_sample_rank_0s_text(four_ranks):
    """Each of the 4 ranks seeded differently: all commit rank 0's samples, one process's with rank 0's seed."""
    cases, ranks = four_ranks
    assert all(r["sampled"]["treeflash"] == ranks[0]["sampled"]["treeflash"] for r in ranks)
    assert ranks[0]["sampled"]["treeflash"] == single(cases["sampled"], "treeflash")


def test_seeded_sampling_follows_rank_0(sharded_runs):
    """The ranks are seeded differently (the worker adds 1000 × rank): both commit rank 0's samples, which are
    the single process's with rank 0's seed."""
    cases, ranks = sharded_runs
    assert ranks[0]["sampled"]["treeflash"] == ranks[1]["sampled"]["treeflash"]
    assert ranks[0]["sampled"]["treeflash"] == single(cases["sampled"], "treeflash")


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_hung_rank_ends_the_other_with_one_line(tmp_path):
    """Rank 1 stops answering after 3 tokens (a machine asleep: no socket closes); rank 0 gives up after the
    rank timeout with one error line, and the launch ends."""
    case = {"name": "hang", "model": str(DEMO / "target"), "drafter": str(DEMO / "drafter"), "prompt": PROMPT,
            "max_tokens": 40, "modes": ["treeflash"], "hang_after": 3, "rank_timeout": 10}
    tic = time.perf_counter()
    done = launch([case], tmp_path, timeout=120)
    assert "Node with rank 0 exited with code 1" in done.stderr  # mlx.launch's own status is 0 whatever happens
    assert time.perf_counter() - tic < 100
    lines = _error_lines(done.stderr)
    assert len(lines) == 1 and "rank 0 waited 10 s for the other ranks" in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_a_dead_rank_ends_the_other_without_a_traceback(tmp_path):
    """Rank 1 dies after 3 tokens: rank 0's next collective fails and it ends (or the launcher ends it) at once,
    with at most one error line of ours."""
    case = {"name": "exit", "model": str(DEMO / "target"), "drafter": str(DEMO / "drafter"), "prompt": PROMPT,
            "max_tokens": 40, "modes": ["treeflash"], "exit_after": 3, "rank_timeout": 60}
    tic = time.perf_counter()
    done = launch([case], tmp_path, timeout=120)
    assert "Node with rank 1 exited with code 3" in done.stderr and not (tmp_path / "rank0.json").exists()
    assert time.perf_counter() - tic < 50  # well under the 60 s rank timeout: the closed socket is noticed
    assert len(_error_lines(done.stderr)) <= 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_the_command_line_prints_once_under_mlx_launch(tmp_path):
    """``python -m treeflash_mlx.generate`` on 2 ranks: one JSON object (rank 0's), the single process's tokens."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = ["-m", "treeflash_mlx.generate", "-p", PROMPT, "-m", "12", "--json", "--ignore-chat-template"]
    done = run_launched([str(LAUNCH), "--backend", "ring", "-n", "2", "--python", sys.executable, "--", *args],
                        240, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    alone = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=240, env=env,
                           cwd=tmp_path)
    assert json.loads(lines[0])["tokens"] == json.loads(alone.stdout)["tokens"]


def ranks_cpu_seconds(launcher: int) -> float:
    """The CPU time (user and system) so far of the processes the launcher started (its process group, less the
    launcher: mlx.launch itself polls its ranks' pipes without blocking, a cost of MLX's launcher, not of ours)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        # the fields after the command name: state, ppid, pgrp, ..., utime (11), stime (12)
        if int(fields[2]) == launcher and int(stat.parent.name) != launcher:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def test_the_server_answers_from_rank_0_with_the_single_process_text(tmp_path):
    """``python -m treeflash_mlx.server`` on 2 ranks: rank 0 answers HTTP and shares each request; both ranks run
    it. Two completions (the second reusing the first's prompt cache) give the single process's text."""
    import http.client
    import re
    import threading

    from treeflash_mlx.speculative import generate as generate_text

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([str(LAUNCH), "--backend", "ring", "-n", "2", "--python", sys.executable, "--",
                             "-m", "treeflash_mlx.server", "--port", "0", "--rank-timeout", "60"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path,
                            start_new_session=True)  # its own process group: the ranks end with the launcher
    lines, ready = [], threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "serving" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(180), "".join(lines)[-2000:]
        port = int(re.search(r":(\d+)/v1", next(line for line in lines if "serving" in line)).group(1))
        model, tokenizer, drafter = load(str(DEMO / "target"), str(DEMO / "drafter"))
        for prompt in (PROMPT, PROMPT + " return"):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn.request("POST", "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 12}),
                         {"Content-Type": "application/json"})
            answer = json.loads(conn.getresponse().read())
            assert answer["choices"][0]["text"] == generate_text(model, tokenizer, prompt, max_tokens=12,
                                                                 drafter=drafter)
        # Idle between requests, the ranks sleep: the waiting ranks meet rank 0 every IDLE_TICK instead of
        # spinning inside a collective (which took most of a core per waiting rank)
        if Path("/proc/self/stat").exists():
            before = ranks_cpu_seconds(proc.pid)
            time.sleep(3)
            assert ranks_cpu_seconds(proc.pid) - before < 0.6
    finally:  # mlx.launch does not pass a SIGTERM on to the ranks, which would serve (and spin) on: end them all
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    assert sum("serving" in line for line in lines) == 1  # rank 0 alone says it serves


def test_the_distributed_flags_refuse_a_lone_process(capsys):
    """Outside mlx.launch: --pipeline and the distributed benchmark each end in one line saying what to do."""
    from treeflash_mlx.distributed_benchmark import main as benchmark_main
    from treeflash_mlx.generate import main as generate_main

    assert generate_main(["-p", "hi", "--pipeline"]) == 1
    assert benchmark_main([]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "this process is alone" in err[0] and "under mlx.launch" in err[1]
    assert generate_main(["-p", "hi", "--rank-timeout", "0"]) == 1
    assert "--rank-timeout" in capsys.readouterr().err
