"""The library's surface: mlx-lm's call shapes, one name per setting, the step generator, errors with causes."""

from __future__ import annotations

import pytest
from conftest import mlx_lm_greedy, random_prompts, tiny_drafter, tiny_target

import treeflash_mlx
from treeflash_mlx import generate, load, stream_generate
from treeflash_mlx.drafting import Drafting, make_drafting
from treeflash_mlx.speculative import generate_step
from treeflash_mlx.target import Target


@pytest.fixture(scope="module")
def pair():
    target = tiny_target("qwen3", seed=5)
    return target, tiny_drafter(target)


def test_max_tokens_is_the_fourth_argument_as_in_mlx_lm(pair, tokenizer):
    target, drafter = pair
    prompt = random_prompts(1, seed=1)[0]
    plain = [r.token for r in stream_generate(target, tokenizer, prompt, 7)]
    drafted = [r.token for r in stream_generate(target, tokenizer, prompt, 7, drafter=drafter)]
    assert plain == drafted == mlx_lm_greedy(target, prompt, 7)
    with pytest.raises(TypeError):
        stream_generate(target, tokenizer, prompt, 7, drafter)  # the drafter is a keyword


def test_generate_is_the_function_even_after_the_command_line_module_is_imported(pair, tokenizer):
    import treeflash_mlx.generate  # noqa: F401  (the command line's module)
    from treeflash_mlx.generate import main

    assert callable(main)
    assert treeflash_mlx.generate is generate and generate.__module__ == "treeflash_mlx.speculative"
    target, drafter = pair
    prompt = random_prompts(1, seed=2)[0]
    text = generate(target, tokenizer, prompt, max_tokens=6, drafter=drafter)
    assert text == tokenizer.decode(mlx_lm_greedy(target, prompt, 6))


def test_the_drafters_branching_is_not_the_samplers_top_k(pair, tokenizer):
    target, drafter = pair
    with pytest.raises(TypeError):
        list(stream_generate(target, tokenizer, [1, 2], 4, drafter=drafter, top_k=3))
    out = [r.token for r in stream_generate(target, tokenizer, [1, 2], 4, drafter=drafter, draft_top_k=3)]
    assert out == mlx_lm_greedy(target, [1, 2], 4)


def test_step_generator_yields_each_rounds_committed_tokens(pair):
    target, drafter = pair
    prompt = random_prompts(1, seed=3)[0]
    rounds = list(generate_step(prompt, target, make_drafting(drafter, Target(target)), max_tokens=40))
    assert [c.round for c in rounds[0]] == [0] and not rounds[0][0].from_draft
    for i, committed in enumerate(rounds[1:], start=1):
        assert {c.round for c in committed} == {i}
        assert [c.from_draft for c in committed][:-1] == [True] * (len(committed) - 1)
    assert not rounds[-2][-1].from_draft  # every full round ends with the target's own token
    assert [c.token for r in rounds for c in r] == mlx_lm_greedy(target, prompt, 40)


def test_ar_is_the_root_only_drafting(pair):
    target, _ = pair
    drafting = make_drafting(None, Target(target))
    assert type(drafting) is Drafting and drafting.mode == "ar" and drafting.capture == []
    rounds = list(generate_step([3, 4, 5], target, drafting, max_tokens=5))
    assert [len(r) for r in rounds] == [1] * 5


def test_plain_steps_are_built_before_the_caller_gets_the_last_token(pair, monkeypatch):
    """As in mlx-lm's loop, a plain step is built and started before the previous step's token reaches the
    caller, so the host's work overlaps the model's: when the caller holds n tokens, n steps are under way."""
    target, _ = pair
    steps = []
    real = Target.forward
    monkeypatch.setattr(Target, "forward", lambda self, tokens, *a, **k: steps.append(1) or real(self, tokens, *a, **k))
    got = []
    for committed in generate_step([3, 4, 5], target, make_drafting(None, Target(target)), max_tokens=12):
        got += [c.token for c in committed]
        assert len(steps) == 1 + min(len(got), 11)  # the prefill, then one step per token (none past the last)
    assert got == mlx_lm_greedy(target, [3, 4, 5], 12)


@pytest.mark.parametrize("kwargs,message", [
    (dict(mode="chain", tree_size=4), "carries its own settings"),
])
def test_a_drafting_object_carries_its_own_settings(pair, tokenizer, kwargs, message):
    target, drafter = pair
    with pytest.raises(ValueError, match=message):
        list(stream_generate(target, tokenizer, [1, 2], 4, drafter=make_drafting(drafter, Target(target)), **kwargs))


def test_load_lives_with_loading_and_errors_keep_their_cause(tmp_path):
    from treeflash_mlx import loading

    assert load is loading.load and treeflash_mlx.load is loading.load
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load model") as info:
        load(str(tmp_path))
    assert info.value.__cause__ is not None
