"""--tree-size auto's models on synthetic round logs: the cost curve and the acceptance law behind the logs are
recovered, the choice maximizes the expected rate, drafting stops where it never pays, and the cache file is
bounded, versioned and ignored when corrupt."""

from __future__ import annotations

import json
from itertools import product

import numpy as np
import pytest

from treeflash_mlx import autotune
from treeflash_mlx.autotune import (CANDIDATES, Acceptance, CostModel, Knowledge, Tuner, knowledge_for,
                                    merged_gains, plan, read_cache, write_cache)


def true_cost(n, ctx):
    """A machine whose BLAS makes 4-12 rows dearer than 16, plus attention over the context."""
    base = {1: 10.0, 2: 10.5, 3: 11.0, 4: 14.0, 6: 15.0, 8: 15.5, 12: 16.0, 16: 12.5, 24: 17.0, 32: 20.0, 48: 27.0,
            64: 33.0}[n]
    return 1e-3 * (base + (0.8 + 0.05 * n) * ctx / 1024)


def test_the_cost_model_recovers_a_known_cost_curve():
    rng = np.random.default_rng(0)
    costs = CostModel(per_size=64)
    for i in range(500):
        n, ctx = int(rng.choice(CANDIDATES)), 200 + 6 * i  # the context grows as a generation goes on
        costs.add(n, ctx, true_cost(n, ctx) * rng.lognormal(0, 0.03))
    for ctx in (1000, 3000):
        want = np.array([true_cost(n, ctx) for n in CANDIDATES])
        np.testing.assert_allclose(costs.predict(CANDIDATES, ctx), want, rtol=0.04)
    _, _, beta, alpha = costs.fit()
    assert beta == pytest.approx(0.8e-3, rel=0.2) and alpha == pytest.approx(0.05e-3, rel=0.2)
    assert costs.predict([12], 1000)[0] > costs.predict([16], 1000)[0], "the bump is kept, not smoothed away"


def test_costs_at_one_context_are_the_sizes_means_and_unmeasured_sizes_are_interpolated():
    costs = CostModel()
    for s in (0.010, 0.012, 0.011):
        costs.add(1, 500, s)
        costs.add(4, 500, 1.5 * s)
        costs.add(16, 500, 2 * s)
    assert costs.fit()[2:] == (0.0, 0.0), "one context cannot tell slopes from intercepts"
    assert costs.predict([1, 4, 16], 500) == pytest.approx([0.011, 0.0165, 0.022], rel=1e-3)
    assert costs.predict([8], 500)[0] == pytest.approx(0.0165 + 4 / 12 * 0.0055, rel=1e-3)
    assert costs.predict([32], 500)[0] >= 0.022
    # Below the smallest tree measured: that tree's cost, not a share of a plain step's; above it, as measured
    # (a larger tree cheaper than the smallest one, as BLAS kernels make 16 rows cheaper than 4 here, stays so)
    assert costs.predict([2, 3], 500) == pytest.approx([0.0165, 0.0165], rel=1e-3)
    bumpy = CostModel()
    for n, s in ((1, 0.010), (4, 0.014), (16, 0.0125)) * 3:
        bumpy.add(n, 500, s)
    assert bumpy.predict([2, 4, 16], 500) == pytest.approx([0.014, 0.014, 0.0125], rel=1e-3)


def test_costs_follow_a_machine_that_gets_slower():
    costs = CostModel(decay=0.9)
    for _ in range(50):
        costs.add(4, 100, 0.01)
    for _ in range(50):
        costs.add(4, 100, 0.03)
    assert costs.predict([4], 100)[0] == pytest.approx(0.03, rel=0.02)


def acceptance_law(logp, depth):
    """The synthetic truth: drafters overrate deep nodes; acceptance = p^0.7 · 0.9^depth."""
    return np.exp(0.7 * logp) * 0.9**depth


def synthetic_round(rng, n=32):
    depths = np.sort(rng.integers(1, 12, n))
    logp = -rng.exponential(1.5, n) * np.sqrt(depths)
    return logp, depths, rng.random(n) < acceptance_law(logp, depths)


def test_the_acceptance_calibration_recovers_a_known_law():
    rng = np.random.default_rng(1)
    model = Acceptance(decay=1.0)
    for _ in range(3000):
        model.observe(*synthetic_round(rng))
    logp, depths, _ = synthetic_round(rng, 4000)
    truth = acceptance_law(logp, depths)
    assert np.abs(model.prob(logp, depths) - truth).mean() < 0.02
    assert np.abs(np.exp(logp) - truth).mean() > 0.05, "uncalibrated scores are off: the test can fail"
    # E[τ] of a round, the sum of its nodes' probabilities, within 5% of the truth
    for _ in range(20):
        logp, depths, _ = synthetic_round(rng)
        assert 1 + model.prob(logp, depths).sum() == pytest.approx(1 + truth_sum(logp, depths), rel=0.05)


def truth_sum(logp, depths):
    return acceptance_law(logp, depths).sum()


def test_copies_are_calibrated_per_position():
    rng = np.random.default_rng(2)
    model = Acceptance(decay=1.0)
    rates = 0.9 ** np.arange(1, 16)
    for _ in range(2000):
        positions = np.arange(1, 16)
        model.observe(np.zeros(0), np.zeros(0, np.int64), np.zeros(0, bool), positions, rng.random(15) < rates)
    np.testing.assert_allclose(model.copy_prob(np.arange(1, 16)), rates, atol=0.04)


def test_a_copy_position_rarely_verified_is_no_likelier_than_those_before_it():
    """Copies that fail early are seldom verified deep: the deep positions' own records are thin, and their
    prior alone would promise more than the positions before them deliver (a 15-token copy at T=0.7 looked
    worth four plain steps, and was verified for one token)."""
    model = Acceptance()
    for _ in range(30):
        model.observe(np.zeros(0), np.zeros(0, np.int64), np.zeros(0, bool), np.arange(1, 3), np.array([True, False]))
    p = model.copy_prob(np.arange(1, 16))
    assert p[1] < 0.1 and np.all(np.diff(p) <= 0) and p.sum() < 1.5


def test_merged_gains_take_the_best_split_of_tree_and_copy():
    rng = np.random.default_rng(3)
    for _ in range(50):
        tree, copy = np.sort(rng.random(8))[::-1], np.sort(rng.random(5))[::-1]
        cum, copied = merged_gains(tree, copy)
        for j in range(1, 14):
            best = max(tree[: j - k].sum() + copy[:k].sum() for k in range(0, min(j, 5) + 1) if j - k <= 8)
            assert cum[j - 1] == pytest.approx(best)
            assert tree[: j - copied[j - 1]].sum() + copy[: copied[j - 1]].sum() == pytest.approx(best)


def fitted(cost=true_cost, ctx=1000):
    costs = CostModel()
    for n in CANDIDATES:
        costs.add(n, ctx, cost(n, ctx))
    return costs


def test_the_plan_maximizes_expected_tokens_per_second():
    rng = np.random.default_rng(4)
    costs = fitted()
    for _ in range(30):
        gains = np.sort(rng.random(63) ** 3)[::-1]
        draft = rng.uniform(0, 0.01)
        got = plan(gains, np.zeros(0), costs, 1000, draft)
        rates = {n: (1 + gains[: n - 1].sum()) / (draft + true_cost(n, 1000)) for n in CANDIDATES}
        assert got.size == max(rates, key=rates.get)
        assert got.expected == pytest.approx(1 + gains[: got.size - 1].sum())


def test_a_draft_that_cannot_pay_is_verified_as_the_root_alone():
    got = plan(np.full(63, 0.01), np.zeros(0), fitted(), 1000, 0.002)
    assert (got.size, got.copied) == (1, 0)


def test_a_good_copy_joins_the_tree():
    got = plan(np.full(63, 0.05), np.full(10, 0.9), fitted(), 1000, 0.002)
    assert got.copied == 10 and got.size >= 11


def run_tuner(tuner, accept, rounds, rng, draft=0.004, ctx=100):
    """Drive a tuner as the loop does, with costs from ``true_cost`` and ``accept(logp, depths)`` the law."""
    for _ in range(rounds):
        ctx += 1
        if not tuner.wants_draft(ctx):
            tuner.observe(1, False, 1, ctx, 0.0, true_cost(1, ctx))
            continue
        logp = np.sort(-rng.exponential(1.0, 63).cumsum() / 8)[::-1]
        depths = np.minimum(1 + np.arange(63) // 4, 15)
        p = tuner.choose(logp, depths, np.zeros(0, np.int64), ctx, draft)
        hit = rng.random(p.size - 1) < accept(logp[: p.size - 1], depths[: p.size - 1])
        tokens = 1 + int(hit.any()) * int(depths[: p.size - 1][hit].max(initial=0))
        tuner.observe(p.size, True, tokens, ctx, draft, true_cost(p.size, ctx),
                      (logp[: p.size - 1], depths[: p.size - 1], hit, np.zeros(0, np.int64), np.zeros(0, bool)))


def test_a_drafter_that_never_matches_falls_back_to_plain_steps():
    tuner = Tuner(Knowledge())
    run_tuner(tuner, lambda logp, d: np.zeros(len(logp)), 400, np.random.default_rng(5))
    report = tuner.report()
    assert report["plain_step_fraction"] > 0.85
    assert report["rounds"] == 400 and sum(report["tree_sizes"].values()) == 400
    drafted = 400 * (1 - report["plain_step_fraction"])
    assert drafted >= 400 / (tuner.knowledge.backoff + 1), "it still looks, now and then, whether drafting pays"


def test_the_gap_goes_straight_to_its_cap_where_drafting_is_far_behind_and_doubles_where_it_is_close():
    """A drafter that never matches and costs two plain steps (far behind them): after its first losing look the
    next one waits the longest gap at once, rather than 1, 2, 4, ... rounds. One that costs a fifth of a step
    loses narrowly (the tree's verification costs more than a plain step): looked at again soon."""
    first_gap = {}
    for name, draft in (("far", 0.02), ("close", 0.002)):
        knowledge = Knowledge()
        tuner = Tuner(knowledge)
        gaps = []
        real_wants = tuner.wants_draft
        tuner.wants_draft = lambda ctx, *a: (real_wants(ctx, *a), gaps.append(knowledge.backoff))[0]
        run_tuner(tuner, lambda logp, d: np.zeros(len(logp)), 200, np.random.default_rng(3), draft=draft)
        first_gap[name] = next(g for g in gaps if g > 1)
    assert first_gap["far"] >= autotune.MIN_LOOK_GAP and first_gap["close"] == 2, first_gap


def run_copies(tuner, matches, rounds, length=7, ctx=100):
    """Rounds without drafting (it never pays here) where the context always offers a copy of ``length`` tokens,
    all accepted if ``matches`` else none; returns how many rounds verified the copy."""
    verified = 0
    for _ in range(rounds):
        positions = np.arange(1, length + 1)
        drafted = tuner.wants_draft(ctx, positions)  # (only the drafting looks: a drafter that never matches)
        if not drafted and tuner.alone.size == 1:
            tuner.observe(1, False, 1, ctx, 0.0, true_cost(1, ctx))
            continue
        logp, depths = (np.full(7, -9.0), np.arange(1, 8)) if drafted else (np.zeros(0), np.zeros(0, np.int64))
        p = tuner.choose(logp, depths, positions, ctx, 0.05 if drafted else None)
        kept = p.size - p.copied - 1
        hit = np.arange(p.copied) < (p.copied if matches else 0)
        tuner.observe(p.size, drafted, 1 + int(hit.sum()), ctx, 0.05 * drafted, true_cost(p.size, ctx),
                      (logp[:kept], depths[:kept], np.zeros(kept, bool), positions[: p.copied], hit), 0.001)
        verified += p.copied > 0
    return verified


def test_copies_that_failed_are_looked_at_again_and_taken_up_when_they_match():
    """The copies' calibration learns only from copies verified: after copies failed, one is still verified now
    and then (a copy look, COPY_LOOK_SHARE of the time at most), so that copies which match again are taken up."""
    tuner = Tuner(Knowledge())
    tuner.warm = tuner.timed = True
    tuner.probes = []
    for n in CANDIDATES:
        tuner.knowledge.costs.add(n, 100, true_cost(n, 100))
    tuner.knowledge.drafted = (1.0, 0.05)  # drafting gives 20 tokens/s against a plain step's 100: no drafting
    failing = run_copies(tuner, False, 1000)
    assert 0 < failing < 0.05 * 1000, "failing copies are verified, but seldom"
    gap = tuner.knowledge.copy_backoff
    assert gap >= autotune.MIN_LOOK_GAP
    assert run_copies(tuner, True, gap + 200) > 150, "copies that match again are taken up after the next look"


def test_a_stalled_timing_of_the_root_alone_does_not_rule_plain_steps_out():
    """The probe that times the root alone stalls (kernels compiled for its shapes, another process): a tree can
    never cost less than its root, so plain steps still win against a drafter that never matches, and their own
    timings replace the stall."""
    tuner = Tuner(Knowledge())
    real_observe = tuner.observe

    def observe(n, drafted, tokens, ctx, draft, seconds, *a):
        stalled = n == 1 and not tuner.knowledge.costs.count(1)
        real_observe(n, drafted, tokens, ctx, draft, 30 * seconds if stalled else seconds, *a)

    tuner.observe = observe
    run_tuner(tuner, lambda logp, d: np.zeros(len(logp)), 400, np.random.default_rng(5))
    assert tuner.report()["plain_step_fraction"] > 0.85
    assert tuner.knowledge.costs.predict([1], 500)[0] == pytest.approx(true_cost(1, 500), rel=0.05)


@pytest.mark.parametrize("draft", [0.004, 0.05])
def test_the_looks_at_a_drafter_that_never_matches_take_a_small_share_of_the_time(draft):
    """However dear a drafted round is against a plain step (the drafter costs 0.4 or 5 plain steps here), the
    drafted rounds that look whether drafting pays cost about LOOK_SHARE of the time more than plain steps in
    their place would have, once the gap has grown."""
    knowledge = Knowledge()
    run_tuner(Tuner(knowledge), lambda logp, d: np.zeros(len(logp)), 1000, np.random.default_rng(5), draft=draft)
    seconds = {True: 0.0, False: 0.0}
    extra = [0.0]  # the looks' seconds beyond the plain steps they replaced

    def observe(n, drafted, tokens, ctx, draft_seconds, verify_seconds, *a, **k):
        seconds[drafted] += draft_seconds + verify_seconds
        extra[0] += (draft_seconds + verify_seconds - true_cost(1, ctx)) if drafted else 0.0
        return real_observe(n, drafted, tokens, ctx, draft_seconds, verify_seconds, *a, **k)

    tuner = Tuner(knowledge)  # the next generation, from what the first learnt
    real_observe, tuner.observe = tuner.observe, observe
    run_tuner(tuner, lambda logp, d: np.zeros(len(logp)), 2000, np.random.default_rng(6), draft=draft)
    assert extra[0] / (seconds[True] + seconds[False]) < 1.5 * autotune.LOOK_SHARE
    assert tuner.report()["plain_step_fraction"] < 1, "it still looks"


def test_the_next_generation_keeps_looking_as_rarely_as_the_last_one_ended():
    """The gap between the drafted rounds that look whether drafting pays again is part of what a setup has
    learnt: a new generation (the server's next request) does not start looking every other round again."""
    knowledge = Knowledge()
    run_tuner(Tuner(knowledge), lambda logp, d: np.zeros(len(logp)), 400, np.random.default_rng(5))
    assert knowledge.backoff >= autotune.MIN_LOOK_GAP
    tuner = Tuner(knowledge)
    run_tuner(tuner, lambda logp, d: np.zeros(len(logp)), 66, np.random.default_rng(6))
    assert tuner.report()["plain_step_fraction"] >= 64 / 66


def test_a_drafter_that_matches_drafts_every_round():
    tuner = Tuner(Knowledge())
    run_tuner(tuner, lambda logp, d: np.exp(logp), 300, np.random.default_rng(6))
    report = tuner.report()
    assert report["plain_step_fraction"] == 1 / 300, "one plain step: the one that times the root alone"
    assert sum(v for n, v in report["tree_sizes"].items() if n >= 4) > 250


def test_probes_run_once_per_setup_and_only_where_costs_are_unknown():
    knowledge = Knowledge()
    first = Tuner(knowledge)
    assert first.probes == list(autotune.PROBES)
    run_tuner(first, lambda logp, d: np.exp(logp), 20, np.random.default_rng(7))
    assert Tuner(knowledge).probes == [] and Tuner(Knowledge()).probes == list(autotune.PROBES)
    small = Tuner(Knowledge(), max_size=10)
    assert small.probes == [4] and small.candidates[-1] == 10 and small.draft_size() == 10


# --- the cache file -------------------------------------------------------------------------------------------

def learnt(n_obs=40) -> Knowledge:
    k = Knowledge()
    for i in range(n_obs):
        k.costs.add(CANDIDATES[i % len(CANDIDATES)], 100 + i, 0.01 + 0.001 * (i % 5))
    k.add_draft(0.004, 16)
    k.add_draft(0.006, 64)
    return k


def test_the_cache_file_round_trips_and_seeds_a_new_process(tmp_path, monkeypatch):
    path = tmp_path / "autotune.json"
    write_cache(path, "pair A", learnt())
    entry = read_cache(path)["pair A"]
    assert entry["draft"] == [[16, 0.004], [64, 0.006]] and len(entry["costs"]) == 40
    monkeypatch.setattr(autotune, "_PROCESS", type(autotune._PROCESS)())
    k = knowledge_for("pair A", path)
    assert (k.draft_seconds(16), k.draft_seconds(8), k.draft_seconds(64)) == (0.004, 0.004, 0.006)
    assert k.costs.count(1) == 4
    assert Tuner(k).probes == [], "costs from the file: no probing"
    assert knowledge_for("pair A", path) is k, "the same setup in one process shares its knowledge"
    assert knowledge_for("pair B", path).costs.count(1) == 0


def test_the_cache_file_is_bounded(tmp_path):
    path = tmp_path / "autotune.json"
    for i in range(autotune.CACHE_ENTRIES + 5):
        write_cache(path, f"pair {i}", learnt(400))
    entries = read_cache(path)
    assert len(entries) == autotune.CACHE_ENTRIES and "pair 0" not in entries and f"pair {i}" in entries
    assert all(len(e["costs"]) <= 8 * len(CANDIDATES) for e in entries.values())
    assert path.stat().st_size < 64 * 1024
    assert [p.name for p in tmp_path.iterdir()] == ["autotune.json"], "no temporary file left behind"


V = autotune.CACHE_VERSION


@pytest.mark.parametrize("content", [
    "", "{", "not json", "[]", "null", json.dumps({"version": V}), json.dumps({"version": V, "entries": []}),
    json.dumps({"version": 999, "entries": {"pair A": {"costs": [[1, 10, 0.01]], "used": 1.0}}}),
    json.dumps({"version": 1, "entries": {"pair A": {"costs": [[1, 10, 0.01]], "draft": 0.004, "used": 1.0}}}),
    json.dumps({"version": V, "entries": {"pair A": {"costs": [[1, 10, -1]], "used": 1.0}}}),
    json.dumps({"version": V, "entries": {"pair A": {"costs": [["x"]], "used": 1.0}}}),
    json.dumps({"version": V, "entries": {"pair A": {"costs": [[1e9, 10, 0.01]], "used": 1.0}}}),
    json.dumps({"version": V, "entries": {"pair A": {"costs": [[1, 10, 0.01]]}}}),
    json.dumps({"version": V, "entries": {"pair A": {"costs": [[1, 10, 0.01]], "draft": 0.004, "used": 1.0}}}),
    json.dumps({"version": V, "entries": {"pair A": {"costs": [[1, 10, 0.01]], "draft": [[16, -1]], "used": 1.0}}}),
    json.dumps({"version": V, "entries": {"pair A": {"costs": [[1, 10, 0.01]], "draft": [[999, 0.1]], "used": 1.0}}}),
    b"\xff\xfe\x00garbage",
], ids=range(17))
def test_a_corrupt_or_foreign_cache_file_is_ignored_and_replaced(tmp_path, monkeypatch, content):
    path = tmp_path / "autotune.json"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    assert "pair A" not in read_cache(path)
    monkeypatch.setattr(autotune, "_PROCESS", type(autotune._PROCESS)())
    assert knowledge_for("pair A", path).costs.count(1) == 0
    write_cache(path, "pair B", learnt())
    assert set(read_cache(path)) == {"pair B"}


def test_an_unwritable_cache_location_loses_only_the_head_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    write_cache(blocker / "sub" / "autotune.json", "pair A", learnt())  # the parent is a file: cannot be made
    assert read_cache(blocker / "sub" / "autotune.json") == {}


def test_the_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(autotune.CACHE_ENV, "")
    assert autotune.cache_path() is None
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "c.json"))
    assert autotune.cache_path() == tmp_path / "c.json"
    monkeypatch.delenv(autotune.CACHE_ENV)
    assert autotune.cache_path().name == "autotune.json"


def test_the_draft_covers_most_recent_choices_and_grows_when_they_use_all_of_it():
    tuner = Tuner(Knowledge())
    assert tuner.draft_size() == 64, "warming up and probing: the largest"
    tuner.warm, tuner.probes = True, []
    for n in (4, 8, 6):
        tuner.knowledge.recent.append(n)
    assert tuner.draft_size() == 8
    for n in CANDIDATES:
        tuner.knowledge.costs.add(n, 100, 0.01 + 0.0005 * n)
    got = tuner.choose(np.full(7, -0.1), np.arange(1, 8), np.zeros(0, np.int64), 100, 0.001)
    assert got.size == 8 and tuner.capped and tuner.draft_size() == 12
    got = tuner.choose(np.full(15, -9.0), np.arange(1, 16), np.zeros(0, np.int64), 100, 0.001)
    assert got.size < 16 and not tuner.capped and tuner.draft_size() == 8
    tuner.knowledge.recent.extend([8] * 12 + [48])
    assert tuner.draft_size() == 8, "one large tree among 16 rounds: not drafted for by the next ones"
    tuner.knowledge.recent.extend([24] * 6)
    assert tuner.draft_size() == 24, "a quarter of the recent rounds wanting 24 drafted nodes: drafted for"
    tuner.knowledge.recent.extend([4] * 6 + [20, 20, 20, 20])  # drafted nodes, copies apart (``observe``)
    assert tuner.draft_size() == 24


def test_drafting_costs_are_learnt_per_draft_size_and_charged_to_the_size_drafted():
    tuner = Tuner(Knowledge())
    tuner.warm = tuner.timed = True
    tuner.probes = []
    for n in CANDIDATES:
        tuner.knowledge.costs.add(n, 100, 0.01)
    for size, seconds in ((8, 0.004), (32, 0.009)):
        tuner.drafting = size
        tuner._planned, tuner._expected = 0.02, 2.0  # (a choice of the model's: as ``choose`` leaves it)
        tuner.observe(6, True, 3, 100, seconds, 0.01, copied=2)
    k = tuner.knowledge
    assert sorted(k.drafts) == [8, 32] and list(k.recent) == [4, 4], "drafted nodes: copies apart"
    assert [k.draft_seconds(n) for n in (4, 8, 16, 64)] == [0.004, 0.004, 0.009, 0.009]
    tuner.drafting = 8
    got = tuner.choose(np.full(3, -0.1), np.arange(1, 4), np.zeros(0, np.int64), 100, 0.5)
    assert got.seconds == pytest.approx(0.004 + 0.01 + k.host_seconds), "the median of its own size's drafts"


def test_a_drafter_whose_scores_mean_nothing_is_found_out_in_a_few_rounds():
    """Confident scores, never accepted: after two rounds even bins never seen are rated far below the scores."""
    model = Acceptance()
    depths = np.repeat(np.arange(1, 5), 4)
    for _ in range(2):
        model.observe(np.full(16, -0.3), depths, np.zeros(16, bool))
    unseen = np.full(4, -1.2)  # another bin at the same depths
    assert np.all(model.prob(unseen, np.arange(1, 5)) < 0.25 * np.exp(-1.2))
    assert np.all(model.prob(unseen, np.arange(6, 10)) < 0.5 * np.exp(-1.2)), "deeper: the drafter's overall record"
    fresh = Acceptance()
    assert fresh.prob(unseen, np.arange(1, 5)) == pytest.approx(np.exp(-1.2)), "nothing seen: the drafter's scores"


def test_sizes_chosen_rarely_keep_what_they_measured():
    costs = CostModel(per_size=4)
    costs.add(64, 100, 0.05)
    for i in range(1000):  # a long spell of plain steps
        costs.add(1, 100 + i % 10, 0.01)
    assert costs.count(64) == 1 and costs.count(1) == 4
    assert costs.predict([64], 100)[0] == pytest.approx(0.05, rel=0.01)
    assert Tuner(Knowledge(costs=costs)).probes == [4, 16], "measured once: not probed again"


def test_stalls_of_a_busy_machine_are_not_taken_for_costs():
    costs, knowledge = CostModel(), Knowledge()
    rng = np.random.default_rng(9)
    for i in range(200):
        stall = 20.0 if rng.random() < 0.1 else 1.0  # one round in ten stalls (another process ran)
        costs.add(8, 500, 0.01 * stall)
        knowledge.add_draft(0.004 * stall)
    assert costs.predict([8], 500)[0] < 0.0125, "a mean with the stalls in would be 0.029"
    assert knowledge.draft_seconds() == pytest.approx(0.004)


def test_probes_and_the_warm_up_teach_costs_but_are_not_taken_for_choices():
    logp, depths = np.full(63, -0.5), np.arange(63) // 4 + 1

    def round_(tuner):
        if not tuner.wants_draft(100):
            tuner.observe(1, False, 1, 100, 0.0, true_cost(1, 100))
            return None
        p = tuner.choose(logp, depths, np.zeros(0, np.int64), 100, 0.004)
        tuner.observe(p.size, True, 3, 100, 0.004, true_cost(p.size, 100))
        return p

    tuner = Tuner(Knowledge())
    rounds = [round_(tuner) for _ in range(2 + len(autotune.PROBES))]
    assert rounds[1] is None, "after the warm-up, a plain step times the root alone"
    assert sorted(tuner.knowledge.costs.sizes) == sorted((1,) + autotune.PROBES), "the warm-up is not timed"
    assert list(tuner.knowledge.recent) == [] and tuner.knowledge.drafted is None
    p = round_(tuner)
    assert list(tuner.knowledge.recent) == [p.size] and tuner.knowledge.drafted is not None
    # Costs known for plain steps only: the first round plans (untimed), the next ones probe the other sizes.
    knowledge = Knowledge()
    for _ in range(3):
        knowledge.costs.add(1, 100, true_cost(1, 100))
    tuner = Tuner(knowledge)
    assert tuner.warm and tuner.probes == [4, 16, 64]
    first = round_(tuner)
    probes = [round_(tuner).size for _ in range(3)]
    assert probes == [4, 16, 64] and list(knowledge.recent) == [], (first, list(knowledge.recent))
