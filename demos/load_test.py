"""A bounded load test of ``python -m treeflash_mlx.server`` on the demo pair (or --model/--drafter), and the
prefill a prompt cache saves on the third turn of a chat.

    python demos/load_test.py --requests 56 --clients 8 --max-tokens 48

Starts a server on a free port of 127.0.0.1, sends ``--requests`` streaming requests (chat and text completions,
held-out prompts) from ``--clients`` concurrent clients, and reports completed and failed requests, the p50/p95
latency and time to first token, and the server's resident memory before and after. Every request has a timeout
and the whole run a deadline (``--deadline``), so it always ends. Then, in this process, it measures turn 3 of a
chat with and without the prompt cache (tokens prefilled and time to the first token).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
PROMPTS = [json.loads(line)["prompt"] for line in (ROOT / "demos" / "heldout_prompts.jsonl").read_text().splitlines()]


def rss_mb(pid: int) -> float:
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return int(out) / 1024 if out else float("nan")


def start_server(flags: list[str]) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "treeflash_mlx.server", "--port", "0", *flags],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    deadline = time.monotonic() + 120
    port = None
    while port is None and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        if " at http://127.0.0.1:" in line:
            port = int(line.rsplit(":", 1)[1].split("/")[0])
    if port is None:
        proc.kill()
        raise SystemExit("error: the server did not start")
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep the pipe drained
    return proc, port


def one_request(port: int, i: int, max_tokens: int, timeout: float) -> dict:
    prompt = PROMPTS[i % len(PROMPTS)]
    if i % 2:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}
    else:
        path, body = "/v1/completions", {"prompt": prompt}
    body.update(max_tokens=max_tokens, stream=True, stream_options={"include_usage": True})
    tic = time.perf_counter()
    first, usage, done = None, None, False
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            return {"ok": False, "error": f"HTTP {response.status}"}
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if first is None and event["choices"]:
                first = time.perf_counter() - tic
            if event.get("usage"):
                usage = event["usage"]
    except (OSError, ValueError) as err:
        return {"ok": False, "error": f"{type(err).__name__}: {err}"}
    finally:
        conn.close()
    ok = done and usage is not None and usage["completion_tokens"] >= 1
    return {"ok": ok, "latency": time.perf_counter() - tic, "ttft": first, "usage": usage,
            "error": None if ok else "incomplete stream"}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def load_test(args) -> dict:
    flags = (["--model", args.model] if args.model else []) + (["--drafter", args.drafter] if args.drafter else [])
    proc, port = start_server(flags)
    try:
        one_request(port, 0, 4, args.timeout)  # warm-up (kernels compile on first use)
        before = rss_mb(proc.pid)
        results, lock, counter = [], threading.Lock(), iter(range(args.requests))
        deadline = time.monotonic() + args.deadline

        def client():
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                r = one_request(port, i, args.max_tokens, args.timeout)
                with lock:
                    results.append(r)

        tic = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.deadline + args.timeout)
        wall = time.perf_counter() - tic
        after = rss_mb(proc.pid)
        alive = proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(30)
    good = [r for r in results if r["ok"]]
    tokens = sum(r["usage"]["completion_tokens"] for r in good)
    return {
        "requests": args.requests, "clients": args.clients, "max_tokens": args.max_tokens,
        "completed": len(good), "failed": len(results) - len(good), "not_sent": args.requests - len(results),
        "errors": sorted({r["error"] for r in results if not r["ok"]}),
        "latency_p50_s": percentile([r["latency"] for r in good], 0.5),
        "latency_p95_s": percentile([r["latency"] for r in good], 0.95),
        "ttft_p50_s": percentile([r["ttft"] for r in good if r["ttft"] is not None], 0.5),
        "ttft_p95_s": percentile([r["ttft"] for r in good if r["ttft"] is not None], 0.95),
        "wall_s": wall, "completion_tokens": tokens, "throughput_tokens_per_s": tokens / wall,
        "server_rss_mb_before": before, "server_rss_mb_after": after, "server_alive_after": alive,
    }


def prefill_saving(args) -> dict:
    """Turn 3 of a chat, with the cache of turns 1-2 and without: tokens prefilled, time to the first token."""
    sys.path.insert(0, str(ROOT))
    from treeflash_mlx import load, make_prompt_cache, stream_generate
    from treeflash_mlx.loading import demo_paths

    model, tokenizer, drafter = load(*demo_paths(args.model, args.drafter))
    cache, messages = make_prompt_cache(model, drafter), []
    for turn, user in enumerate(PROMPTS[:3], start=1):
        messages.append({"role": "user", "content": user})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        runs = {}
        for name, c in (("without_cache", None), ("with_cache", cache)) if turn == 3 else (("with_cache", cache),):
            tic, first, text = time.perf_counter(), None, ""
            for r in stream_generate(model, tokenizer, prompt, args.turn_tokens, drafter=drafter, prompt_cache=c):
                first = first or time.perf_counter() - tic
                text += r.text
            runs[name] = {"prompt_tokens": r.prompt_tokens, "prefilled_tokens": r.prompt_tokens - r.cached_tokens,
                          "time_to_first_token_ms": 1e3 * first, "text": text}
        messages.append({"role": "assistant", "content": runs["with_cache"]["text"]})
    assert runs["with_cache"]["text"] == runs["without_cache"]["text"], "the cache changed the output"
    for r in runs.values():
        r.pop("text")
    return runs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--drafter", default=None)
    p.add_argument("--requests", type=int, default=56)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--timeout", type=float, default=120, help="seconds per request")
    p.add_argument("--deadline", type=float, default=300, help="seconds for the whole load phase")
    p.add_argument("--turn-tokens", type=int, default=160, help="tokens per answer in the three-turn chat")
    p.add_argument("--output", type=Path, default=None, help="also write the figures as JSON here")
    args = p.parse_args()
    figures = {"load": load_test(args), "turn_3": prefill_saving(args)}
    print(json.dumps(figures, indent=2))
    if args.output:
        args.output.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if figures["load"]["failed"] == 0 and figures["load"]["not_sent"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
