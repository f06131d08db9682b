"""`python -m treeflash_mlx.benchmark`: the report's structure and the losslessness check (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import save_drafter, save_target, tiny_drafter, tiny_target

import treeflash_mlx.benchmark as benchmark
from treeflash_mlx import autotune
from treeflash_mlx.loading import humaneval_messages
from treeflash_mlx.benchmark import main
from treeflash_mlx.convert import export

needs_peer = pytest.mark.skipif(importlib.util.find_spec("dflash_mlx") is None,
                                reason="the peer dflash-mlx is not installed (pip install 'treeflash-mlx[peers]')")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    target = tiny_target("qwen3", seed=4)
    return (save_target(target, root / "target"), save_drafter(tiny_drafter(target, block_size=6), root / "drafter"),
            save_target(tiny_target("qwen3", layers=1, seed=8), root / "small"))


def bench(capsys, models, tmp_path, *extra):
    target, drafter, small = models
    code = main(["--model", str(target), "--drafter", str(drafter), "--draft-model", str(small), "--prompts", "code",
                 "--num-prompts", "2", "--max-tokens", "10", "--output", str(tmp_path / "out"), *map(str, extra)])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out, json.loads((tmp_path / "out" / "results.json").read_text())


def test_every_mode_is_reported_and_lossless(models, tmp_path, capsys):
    table, report = bench(capsys, models, tmp_path)
    modes = [r["mode"] for r in report["results"]]
    assert modes == ["ar", "draft-model", "chain", "marginal", "treeflash"]
    for r in report["results"]:
        assert {"mode", "mean_acceptance_length", "tokens_per_s", "speedup_vs_ar", "efficiency", "lossless"} <= set(r)
        assert r["lossless"] is True and r["mean_acceptance_length"] >= 1 and r["tokens_per_s"] > 0
    assert report["results"][0]["speedup_vs_ar"] == pytest.approx(1.0)
    assert set(report["results"][-1]["ms_per_round"]) == {"drafter", "tables", "tree", "verify", "commit"}
    assert table.count("| yes |") == 5 and "verify cost / one mlx-lm step" in table


def test_tree_size_auto_runs_the_generation_mechanism_beside_fixed_sizes(models, tmp_path, capsys, monkeypatch):
    calls, real = [], benchmark.run_ours
    monkeypatch.setattr(benchmark, "run_ours", lambda *a, **k: calls.append((a[7], a[8])) or real(*a, **k))
    table, report = bench(capsys, models, tmp_path, "--modes", "treeflash,treeflash@16,marginal@auto",
                          "--tree-size", "8")
    # No separate profiling run: auto's timed runs choose as generation does, each round.
    assert {s["tree_size"] for s, _ in calls} == {8, 16, "auto"}
    rows = {r["mode"]: r for r in report["results"]}
    assert list(rows) == ["ar", "treeflash", "treeflash@16", "marginal@auto"]
    assert rows["treeflash"]["tree_size"] == 8 and rows["marginal@auto"]["tree_size"] == "auto"
    auto = rows["marginal@auto"]["tree_size_auto"]
    assert sum(auto["tree_sizes"].values()) == len(rows["marginal@auto"]["taus"]), "every timed round counted"
    assert {int(n) for n in auto["tree_sizes"]} <= set(autotune.CANDIDATES) and 0 <= auto["plain_step_fraction"] <= 1
    assert "tree_size_auto" not in rows["treeflash@16"] and rows["marginal@auto"]["ideal_speedup"] is None
    assert all(r["lossless"] for r in rows.values())
    assert "--tree-size auto in marginal@auto: budgets chosen (rounds) " in table


def test_a_mismatch_is_reported_loudly(models, tmp_path, capsys, monkeypatch):
    real = benchmark.run_ours

    def corrupted(*args, **kwargs):
        out = real(*args, **kwargs)
        out["tokens"] = [t + 1 for t in out["tokens"]]
        return out

    monkeypatch.setattr(benchmark, "run_ours", corrupted)
    table, report = bench(capsys, models, tmp_path, "--modes", "ar,chain", "--profile-prompts", "0")
    assert report["results"][1]["lossless"] is False
    assert "MISMATCH" in table
    assert report["results"][1]["ms_per_round"] is None, "no profiled runs were asked for: no time split"


def test_bad_options_fail_clearly(models, capsys):
    assert main(["--model", str(models[0]), "--modes", "ar,warp"]) == 1
    assert "unknown mode 'warp'" in capsys.readouterr().err
    for bad in ("chain@8", "treeflash@0", "treeflash@fast", "treeflash@8+16", "treeflash@8+nolookup+nolookup"):
        assert main(["--model", str(models[0]), "--modes", bad]) == 1
        assert f"mode '{bad}': only marginal and treeflash take a variant" in capsys.readouterr().err
    assert main(["--model", str(models[0]), "--modes", "ar@nolookup"]) == 1
    assert "mode 'ar@nolookup': only chain, marginal and treeflash take @nolookup" in capsys.readouterr().err
    assert main(["--model", str(models[0]), "--modes", "chain"]) == 1
    assert "need --drafter" in capsys.readouterr().err


def test_published_settings_run_beside_the_device_defaults(models, tmp_path, capsys):
    table, report = bench(capsys, models, tmp_path, "--modes", "treeflash,treeflash@published,marginal@8")
    rows = {r["mode"]: r for r in report["results"]}
    assert list(rows) == ["ar", "treeflash", "treeflash@published", "marginal@8"]
    assert rows["treeflash@published"]["tree_size"] == 64 and rows["marginal@8"]["tree_size"] == 8
    assert all(r["lossless"] for r in rows.values())
    assert "@published: {'tree_size': 64, 'top_m': 16, 'head_vocab': 0, 'window': 0, 'lookup': 0}" in table


def test_copies_from_the_context_can_be_left_out_beside_the_defaults(models, tmp_path, capsys):
    table, report = bench(capsys, models, tmp_path, "--modes",
                          "treeflash,treeflash@nolookup,chain@nolookup,treeflash@8+nolookup")
    rows = {r["mode"]: r for r in report["results"]}
    assert list(rows) == ["ar", "treeflash", "treeflash@nolookup", "chain@nolookup", "treeflash@8+nolookup"]
    assert rows["treeflash@8+nolookup"]["tree_size"] == 8 and rows["treeflash@8+nolookup"]["copied_rounds"] == 0
    assert rows["treeflash@nolookup"]["tree_size"] == rows["treeflash"]["tree_size"] == "auto"
    assert all(r["lossless"] for r in rows.values())
    assert "copies from the context up to 15 tokens after 2+ matched" in table
    assert rows["treeflash@nolookup"]["copied_rounds"] == 0 < rows["treeflash"]["rounds_counted"]
    assert rows["treeflash"]["copied_rounds"] <= rows["treeflash"]["rounds_counted"]


def test_plain_decoding_alone_reports_only_what_it_measured(models, tmp_path, capsys):
    """`--modes ar`: no verification costs, no tree budget, no τ histogram or cost plot to draw."""
    table, report = bench(capsys, models, tmp_path, "--modes", "ar")
    assert [r["mode"] for r in report["results"]] == ["ar"]
    assert "verify cost" not in table and "tree budget" not in table
    assert set(report["verify_costs_s"]) == {"step"}
    written = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert written in ([], ["speedup.png"])  # [] where matplotlib is missing


def test_humaneval_problems_go_through_the_chat_template(tmp_path, tokenizer):
    f = tmp_path / "HumanEval.jsonl"
    f.write_text(json.dumps({"task_id": "HumanEval/0", "prompt": "def f(x):\n    \"\"\"Double x.\"\"\"\n"}) + "\n")
    (prompt,) = benchmark.read_prompts("humaneval", f, tokenizer, 5)
    want = tokenizer.apply_chat_template(humaneval_messages("def f(x):\n    \"\"\"Double x.\"\"\"\n"),
                                         add_generation_prompt=True)
    assert list(prompt) == list(want) and "Complete the following Python function" in tokenizer.decode(prompt)


def test_the_long_set_reports_every_mode_at_every_prompt_length(models, tmp_path, capsys, monkeypatch):
    target, drafter, _ = models
    prefills, real = [], benchmark.shared_prefill
    monkeypatch.setattr(benchmark, "shared_prefill", lambda *a: prefills.append(len(a[3])) or real(*a))
    code = main(["--model", str(target), "--drafter", str(drafter), "--prompts", "long", "--context-lengths",
                 "96,48", "--num-prompts", "1", "--max-tokens", "8", "--modes", "ar,treeflash", "--draft-window", "32",
                 "--output", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert code == 0, out.err
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [c["context_tokens"] for c in report["contexts"]] == [48, 96]
    for context in report["contexts"]:
        rows = {r["mode"]: r for r in context["results"]}
        assert list(rows) == ["ar", "treeflash"] and all(r["lossless"] for r in rows.values())
        assert rows["ar"]["drafter_mb"] == 0 < rows["treeflash"]["drafter_mb"]
        assert all(r["peak_memory_gb"] > 0 for r in rows.values())
        assert context["verify_costs_prefix"] == context["context_tokens"] - 1  # after the shared prefill
    assert "## prompts of 48 tokens" in out.out and "| treeflash | 96 |" in out.out
    assert prefills == [48, 96], "each prompt is prefilled once, for every mode, its warm-up and its profile"


def test_long_prompts_must_fit_the_models_context(models, capsys):
    target, drafter, _ = models
    code = main(["--model", str(target), "--drafter", str(drafter), "--prompts", "long", "--context-lengths", "4000",
                 "--max-tokens", "200", "--modes", "ar,treeflash"])
    assert code == 1
    assert "exceed the model's context of 4096 tokens" in capsys.readouterr().err


@needs_peer
def test_the_peer_runs_interleaved_with_ours_on_the_same_drafter(models, tmp_path, capsys):
    before = benchmark.model_class_calls()
    table, report = bench(capsys, models, tmp_path, "--modes", "ar,chain@nolookup,dflash-mlx,dflash-mlx-ddtree",
                          "--profile-prompts", "0")
    after = benchmark.model_class_calls()
    assert all(after[cls] is call for cls, call in before.items()), "the peer's hooks outlive the run"
    rows = {r["mode"]: r for r in report["results"]}
    assert list(rows) == ["ar", "chain@nolookup", "dflash-mlx", "dflash-mlx-ddtree"]
    assert all(r["lossless"] for r in rows.values()) and table.count("| yes |") == 4
    for mode in ("dflash-mlx", "dflash-mlx-ddtree"):
        r = rows[mode]
        assert r["tokens_per_s"] > 0 and r["drafter_mb"] > 0 and r["ideal_speedup"] is None
        assert sum(r["taus"]) == sum(rows["chain@nolookup"]["taus"]), "cycles count the tokens they kept, as ours"
    if rows["dflash-mlx"]["copied_rounds"] == 0:  # no copy from the context replaced a draft: the same drafter
        assert rows["dflash-mlx"]["taus"] == rows["chain@nolookup"]["taus"], "the same chain, the same acceptance"


@needs_peer
def test_the_peer_takes_a_dflash_layout_drafter(models, tmp_path, capsys):
    peer = export(models[1], tmp_path / "dflash", layout="dflash")
    table, report = bench(capsys, models, tmp_path, "--modes", "dflash-mlx", "--peer-drafter", peer,
                          "--num-prompts", "1")
    assert [r["mode"] for r in report["results"]] == ["ar", "dflash-mlx"]
    assert report["results"][1]["lossless"] is True


def test_the_peer_modes_fail_up_front_when_they_cannot_run(models, capsys, monkeypatch):
    target, drafter, _ = models
    real = importlib.util.find_spec
    monkeypatch.setattr(benchmark.importlib.util, "find_spec",
                        lambda name: None if name == "dflash_mlx" else real(name))
    assert main(["--model", str(target), "--drafter", str(drafter), "--modes", "dflash-mlx"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install dflash-mlx" in err, err
    monkeypatch.setattr(benchmark.importlib.util, "find_spec", lambda name: object())
    assert main(["--model", str(target), "--drafter", str(drafter), "--modes", "dflash-mlx-ddtree",
                 "--temp", "0.7"]) == 1
    assert "greedy only" in capsys.readouterr().err
    assert main(["--model", str(target), "--modes", "dflash-mlx"]) == 1
    assert "need --drafter (exported to the DFlash layout) or --peer-drafter" in capsys.readouterr().err


@needs_peer
def test_a_sub_vocabulary_drafter_runs_in_the_peer_over_the_whole_vocabulary(models, tmp_path, capsys):
    target = tiny_target("qwen3", seed=4)
    drafter = save_drafter(tiny_drafter(target, block_size=6, sub_vocab=[3, 1, 4]), tmp_path / "sub")
    out = tmp_path / "out"
    assert main(["--model", str(models[0]), "--drafter", str(drafter), "--modes", "dflash-mlx", "--num-prompts", "1",
                 "--max-tokens", "8", "--profile-prompts", "0", "--output", str(out)]) == 0
    assert "backbone over the whole vocabulary" in capsys.readouterr().err
    report = json.loads((out / "results.json").read_text())
    assert report["peer_sub_vocab_dropped"] is True and report["results"][1]["lossless"] is True


@needs_peer
def test_the_peer_refuses_what_it_cannot_run_in_one_line(models, tmp_path, capsys):
    target = tiny_target("qwen3", seed=4)
    layout = save_drafter(tiny_drafter(target, block_size=6, head=False), tmp_path / "no-tie", layout="dflash")
    assert main(["--model", str(models[0]), "--peer-drafter", str(layout), "--modes", "dflash-mlx"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "tie_word_embeddings" in err and "--export --layout dflash" in err, err
    llama = save_target(tiny_target("llama", seed=4), tmp_path / "llama")
    assert main(["--model", str(llama), "--peer-drafter", str(layout), "--modes", "dflash-mlx"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "dflash-mlx cannot run the target" in err and "model_type=llama" in err, err


@needs_peer
def test_a_peer_mode_the_family_lacks_fails_in_one_line_before_anything_is_timed(tmp_path, capsys):
    """dflash-mlx's tree verify reads Qwen3's q_norm: on a Qwen2 target its ddtree mode fails in the probe."""
    target = tiny_target("qwen2", seed=4)
    model = save_target(target, tmp_path / "qwen2")
    drafter = save_drafter(tiny_drafter(target, block_size=6), tmp_path / "drafter")
    assert main(["--model", str(model), "--drafter", str(drafter), "--modes", "dflash-mlx-ddtree",
                 "--num-prompts", "1", "--max-tokens", "4"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # nothing measured before it
    assert "ddtree mode cannot run the target" in err and "q_norm" in err and "drop dflash-mlx-ddtree" in err, err


@needs_peer
@pytest.mark.slow
def test_the_peer_accepts_what_our_chain_accepts_with_the_demo_drafter(tmp_path, capsys):
    """The trained demo pair: the DFlash-layout export is the same drafter to dflash-mlx, round by round."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("def fib(n):", "class Stack:")))
    code = main(["--prompts", str(prompts), "--num-prompts", "2", "--max-tokens", "32", "--modes",
                 "ar,chain@nolookup,dflash-mlx", "--profile-prompts", "0", "--output", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    rows = {r["mode"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())["results"]}
    chain = rows["chain@nolookup"]  # our copies from the context would add branches the peer's chain lacks
    assert rows["dflash-mlx"]["lossless"] and rows["dflash-mlx"]["copied_rounds"] == 0
    assert rows["dflash-mlx"]["taus"] == chain["taus"] and chain["mean_acceptance_length"] > 1.2


def test_sampling_modes_sample_the_same_text_per_prompt(models, tmp_path, capsys, monkeypatch):
    """At a temperature, each prompt's runs start from one seed: every mode of ours samples the same text, so the
    table compares speeds, not which mode drew a text that copies its prompt."""
    texts, real = {}, benchmark.run_ours
    monkeypatch.setattr(benchmark, "run_ours", lambda *a, **k: (lambda r: texts.setdefault(
        (a[4], a[7]["tree_size"], a[7]["draft_lookup"]), []).append(r["tokens"]) or r)(real(*a, **k)))
    bench(capsys, models, tmp_path, "--modes", "ar,marginal,treeflash@4,treeflash@16+nolookup,treeflash@auto",
          "--temp", "0.9", "--num-prompts", "3", "--max-tokens", "16")
    runs = [t[1:] for t in texts.values()]  # the first run of each mode warms up; then timed and profiled runs
    assert len(runs) == 4 and all(r == runs[0] for r in runs)
    assert len({tuple(t) for t in runs[0]}) == 3, "each prompt has its own text"
