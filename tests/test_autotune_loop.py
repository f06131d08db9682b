"""--tree-size auto in the decoding loop: lossless in every mode, plain steps where the drafter never matches,
trees where it does, and its choices reported."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import mlx_lm_greedy, random_prompts, save_drafter, save_target, tiny_drafter, tiny_target
from mlx_lm.sample_utils import make_sampler

from treeflash_mlx import autotune, stream_generate
from treeflash_mlx.drafting import AutoDrafting, DraftOptions, make_drafting
from treeflash_mlx.generate import main as generate_main
from treeflash_mlx.target import Target
from treeflash_mlx.tree import chain

CASES = [("treeflash", {}), ("treeflash", {"draft_lookup": 0}), ("treeflash", {"draft_vocab": 0, "draft_top_m": 4}),
         ("marginal", {}), ("chain", {})]


@pytest.mark.parametrize("mode,settings", CASES, ids=[f"{m}-{'-'.join(map(str, s.values())) or 'defaults'}"
                                                      for m, s in CASES])
def test_auto_is_lossless_in_every_mode(tokenizer, mode, settings):
    target = tiny_target("qwen3", seed=6)
    drafter = tiny_drafter(target)
    for prompt in random_prompts(3, seed=4) + [[5, 6, 7, 8] * 6]:  # the last repeats itself: copies
        out = [r.token for r in stream_generate(target, tokenizer, prompt, 40, drafter=drafter, mode=mode,
                                                tree_size="auto", **settings)]
        assert out == mlx_lm_greedy(target, prompt, 40)


def test_auto_is_lossless_with_a_sub_vocabulary_a_dflash_drafter_and_a_quantized_cache(tokenizer):
    target = tiny_target("llama", seed=2)
    ids = np.random.default_rng(4).permutation(target.args.vocab_size)[:96].tolist()
    prompt = random_prompts(1, seed=8)[0]
    want = mlx_lm_greedy(target, prompt, 40)
    for drafter in (tiny_drafter(target, sub_vocab=ids), tiny_drafter(target, head=False)):
        assert [r.token for r in stream_generate(target, tokenizer, prompt, 40, drafter=drafter)] == want
    # the K/V switches to 8 bits mid-generation: a round's tree is cut there (the cut tree is still observed)
    from mlx_lm.generate import generate_step
    target = tiny_target("qwen3", seed=5, hidden=128)  # head dimension 32: groups of 32
    want = [int(t) for t, _ in generate_step(mx.array(prompt), target, max_tokens=40, kv_bits=8, kv_group_size=32,
                                               quantized_kv_start=len(prompt) + 10)]
    got = [r.token for r in stream_generate(target, tokenizer, prompt, 40, drafter=tiny_drafter(target), kv_bits=8,
                                            kv_group_size=32, quantized_kv_start=len(prompt) + 10)]
    assert got == want


class Rigged(AutoDrafting):
    """Auto drafting whose trees are rewritten against the known greedy answer: every drafted token wrong
    (``right=False``: a drafter that never matches), or the tree made a chain of the right tokens, as long as
    the budget auto chose (``right=True``: a drafter that always matches)."""

    def __init__(self, target, drafter, truth: list[int], right: bool):
        super().__init__(drafter, Target(target), DraftOptions("treeflash", tree_size=64, top_m=8, lookup=0),
                         autotune.Knowledge())
        self.truth, self.right = truth, right

    def finish(self, root, pending, timer=None):
        tree = super().finish(root, pending) if timer is None else super().finish(root, pending, timer)
        if self.right:
            return chain(root, np.array(self.truth[pending.context : pending.context + len(tree) - 1]))
        true = np.array(self.truth)[np.minimum(pending.context - 1 + tree.depths, len(self.truth) - 1)]
        tree.tokens = np.where(tree.depths > 0, (true + 1) % 256, tree.tokens)
        return tree


def rigged_runs(tokenizer, right: bool, processors=None):
    target = tiny_target("qwen3", seed=5)
    drafter, taus, drafting = tiny_drafter(target), [], None
    reports = []
    for prompt in random_prompts(3, seed=12):
        reference = mlx_lm_greedy(target, prompt, 60)
        drafting = Rigged(target, drafter, prompt + reference, right) if drafting is None else drafting
        drafting.truth = prompt + reference
        drafting.tuner = autotune.Tuner(drafting.tuner.knowledge, 64)  # a new generation, what was learnt kept
        responses = list(stream_generate(target, tokenizer, prompt, 60, drafter=drafting,
                                         logits_processors=processors))
        assert [r.token for r in responses] == reference
        taus += list({r.round: r.acceptance_length for r in responses if r.round}.values())
        reports.append(drafting.tuner.report())
    return taus, reports


def test_a_drafter_that_never_matches_gives_way_to_plain_steps(tokenizer):
    taus, reports = rigged_runs(tokenizer, right=False)
    assert set(taus) == {1}
    assert reports[-1]["plain_step_fraction"] > 0.6, reports
    assert sum(n * c for n, c in reports[-1]["tree_sizes"].items()) / reports[-1]["rounds"] < 8, \
        "the drafted rounds left shrink their trees too"


@pytest.mark.parametrize("processors", [None, [lambda tokens, logits: logits]], ids=["", "logits processor"])
def test_a_drafter_that_always_matches_drafts_deep_trees(tokenizer, processors):
    """Also where plain steps cannot run ahead (a logits processor reads each token; a sharded target): their
    rounds then time the root alone, which the tuner needs before it drafts."""
    taus, reports = rigged_runs(tokenizer, right=True, processors=processors)
    assert reports[-1]["plain_step_fraction"] < 0.2, reports
    assert np.mean(taus) > 3


def test_the_same_seed_gives_the_same_sample_with_auto(tokenizer):
    target = tiny_target("qwen3", seed=6)
    drafter = tiny_drafter(target)
    sampler = make_sampler(0.8, 0.95)
    runs = []
    for tree_size in ("auto", 16, "auto"):
        mx.random.seed(3)
        runs.append([r.token for r in stream_generate(target, tokenizer, [7, 8, 9], 40, drafter=drafter,
                                                      sampler=sampler, tree_size=tree_size)])
    assert runs[0] == runs[1] == runs[2]


def test_a_bad_tree_size_is_one_clear_error(tokenizer):
    target = tiny_target("qwen3", seed=6)
    with pytest.raises(ValueError, match="tree_size must be a node count or 'auto', got 'big'"):
        make_drafting(tiny_drafter(target), Target(target), tree_size="big")


def test_generate_reports_the_budgets_auto_chose(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "autotune.json"))
    target = tiny_target("qwen3", seed=6)
    model = save_target(target, tmp_path / "target")
    drafter = save_drafter(tiny_drafter(target), tmp_path / "drafter")
    args = ["--model", str(model), "--drafter", str(drafter), "-p", "abcabcabcabc", "-m", "40",
            "--ignore-chat-template"]
    assert generate_main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    auto = out["tree_size_auto"]
    assert sum(auto["tree_sizes"].values()) == auto["rounds"] == len(out["acceptance_lengths"])
    assert 0 <= auto["plain_step_fraction"] <= 1
    assert generate_main(args + ["--verbose"]) == 0
    assert "Tree sizes (auto): {" in capsys.readouterr().out
    assert generate_main(args + ["--json", "--tree-size", "8"]) == 0
    assert "tree_size_auto" not in json.loads(capsys.readouterr().out)
    entries = autotune.read_cache(tmp_path / "autotune.json")
    assert len(entries) == 1 and str(model) in next(iter(entries)), "the pair's costs were remembered"


def test_plain_steps_defer_the_drafters_context_and_a_reused_prompt_cache_stays_exact(tokenizer, monkeypatch):
    """Rounds without drafting leave the drafter's context to the next drafted round (one append for all of
    them) or the generation's end; a prompt cache left behind holds all of it, and the next generation from it
    reuses it all and is still exact."""
    from treeflash_mlx import make_prompt_cache
    from treeflash_mlx.drafter import Drafter

    appends, real_append = [], Drafter.append_context
    monkeypatch.setattr(Drafter, "append_context", lambda self, f, c: appends.append(f.shape[1]) or real_append(self, f, c))
    target = tiny_target("qwen3", seed=5)
    drafter = tiny_drafter(target)
    prompt = random_prompts(1, seed=12)[0]
    reference = mlx_lm_greedy(target, prompt, 60)
    drafting = Rigged(target, drafter, prompt + reference, right=False)
    cache = make_prompt_cache(target, drafter)
    responses = list(stream_generate(target, tokenizer, prompt, 60, drafter=drafting, prompt_cache=cache))
    assert [r.token for r in responses] == reference
    report = drafting.tuner.report()
    drafted = round(report["rounds"] * (1 - report["plain_step_fraction"]))
    assert report["plain_step_fraction"] > 0.5
    # the prefill, each drafted round's own and the one flush of what waited before it, the end's: not one per round
    assert len(appends) <= 2 + 2 * drafted < 1 + report["rounds"]
    assert sum(appends) == cache.drafter_length == len(cache.tokens)
    follow = prompt + reference[:-1] + [3, 4, 5]
    want = mlx_lm_greedy(target, follow, 30)
    drafting.tuner = autotune.Tuner(drafting.tuner.knowledge, 64)
    drafting.truth = follow + want
    got = [r.token for r in stream_generate(target, tokenizer, follow, 30, drafter=drafting, prompt_cache=cache)]
    assert got == want and cache.reused == len(prompt + reference) - 1
    ours = [r.token for r in stream_generate(target, tokenizer, follow, 30, drafter=drafter, prompt_cache=cache)]
    assert ours == want, "the real drafter, drafting from the cache's context"
    stopped = stream_generate(target, tokenizer, follow + want, 40, drafter=drafting, prompt_cache=cache)
    for _ in zip(range(20), stopped):  # the caller stops early
        pass
    stopped.close()
    assert cache.drafter_length == len(cache.tokens)
    from treeflash_mlx.speculative import generate_step

    for _ in generate_step(follow + want + [9], target, drafting, prompt_cache=cache, max_tokens=40):
        pass  # run to its own end
    assert cache.drafter_length == len(cache.tokens)


def test_costs_learnt_with_another_blas_are_kept_apart(tmp_path, monkeypatch):
    """A process left with MLX's reference BLAS (mlx imported first) verifies trees as slowly as that many single
    steps: what it learns must not become the next processes' costs."""
    from treeflash_mlx import _blas
    from treeflash_mlx.loading import load

    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "autotune.json"))
    target = tiny_target("qwen3", seed=6)
    model, _, drafter = load(save_target(target, tmp_path / "target"),
                             save_drafter(tiny_drafter(target), tmp_path / "drafter"))
    keys = set()
    for blas in ("/usr/lib/libopenblas.so.0", None):
        monkeypatch.setattr(_blas, "active_blas", blas)
        keys.add(make_drafting(drafter, Target(model)).cache_key)
    assert len(keys) == 2 and any("reference BLAS" in k for k in keys)


def test_a_tree_rounds_host_work_is_part_of_its_cost(tokenizer):
    """A tree round is priced at its drafting, its verification and its host work (H): the time since the last
    round ended that neither took (the lookup, the search and plan, the commit, the caller's handling of the last
    round's tokens, here 20 ms a token). Priced by its verification alone, a tree round on a small target looked
    as cheap as a plain step while it cost two."""
    import time

    target = tiny_target("qwen3", seed=5)
    prompt = random_prompts(1, seed=12)[0]
    reference = mlx_lm_greedy(target, prompt, 60)
    drafting = Rigged(target, tiny_drafter(target), prompt + reference, right=True)
    knowledge = drafting.tuner.knowledge
    for n in (1, 4, 16, 64):  # costs known (as from the cache file): every round is a choice, none a probe
        knowledge.costs.add(n, len(prompt), 0.001 * n ** 0.5)
    drafting.tuner = autotune.Tuner(knowledge, 64)
    for r in stream_generate(target, tokenizer, prompt, 60, drafter=drafting):
        time.sleep(0.02)  # the caller's handling of each token: far beyond the tiny target's verification
    assert knowledge.host_seconds >= 0.02
    plan = drafting.tuner.choose(np.full(15, -0.1), np.arange(1, 16), np.arange(1, 4), len(prompt) + 60, 0.001)
    assert plan.seconds >= knowledge.host_seconds + 0.001, "a drafted round's plan pays it"
    alone = autotune.plan(np.zeros(0), np.full(3, 0.9), knowledge.costs, len(prompt) + 60, 0.0,
                          host_seconds=knowledge.host_seconds)
    assert alone.size == 1 or alone.seconds >= knowledge.host_seconds, "and a copy alone's too"


def test_the_root_alone_is_priced_by_plain_steps_not_by_tree_rounds_that_kept_only_it(tokenizer, monkeypatch):
    """A drafted round whose plan keeps the root alone still pays for a tree round's work (here 50 ms more on
    every tree verification); a plain step does not. Size 1's cost is the plain steps'."""
    import time

    real_verify = Target.verify
    monkeypatch.setattr(Target, "verify", lambda *a, **k: time.sleep(0.05) or real_verify(*a, **k))
    target = tiny_target("qwen3", seed=5)
    prompt = random_prompts(1, seed=12)[0]
    reference = mlx_lm_greedy(target, prompt, 60)
    drafting = Rigged(target, tiny_drafter(target), prompt + reference, right=False)
    assert [r.token for r in stream_generate(target, tokenizer, prompt, 60, drafter=drafting)] == reference
    report, costs = drafting.tuner.report(), drafting.tuner.knowledge.costs
    assert report["tree_sizes"][1] > report["rounds"] * report["plain_step_fraction"], "tree rounds kept the root"
    assert costs.predict([1], len(prompt) + 30)[0] < 0.012
