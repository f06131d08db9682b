"""A seed pins the sampled output whatever the mode and tree settings: each generated position has its own
random seed, drawn in position order, and the walk samples one node per depth with it."""

from __future__ import annotations

import mlx.core as mx
import pytest
from conftest import save_drafter, save_target, tiny_drafter, tiny_target
from mlx_lm.sample_utils import make_sampler

from treeflash_mlx import load, stream_generate


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    target = tiny_target("qwen3")
    return save_target(target, root / "target"), save_drafter(tiny_drafter(target), root / "drafter")

@pytest.fixture(scope="module")
def loaded(pair):
    return load(str(pair[0]), str(pair[1]))

SETTINGS = [dict(mode="ar"), dict(mode="chain"), dict(mode="marginal", tree_size=6), dict(mode="treeflash", tree_size=4),
            dict(mode="treeflash", tree_size=12), dict(mode="treeflash", tree_size=40, draft_top_m=8, draft_vocab=32),
            dict(mode="treeflash", tree_size="auto"), dict(mode="marginal", tree_size="auto", draft_lookup=4)]

@pytest.mark.parametrize("sampler_args", [(1.0, 1.0, 0.0, 0), (0.8, 0.9, 0.0, 0), (0.7, 1.0, 0.05, 20)])
def test_the_same_seed_gives_the_same_text_in_every_mode_and_tree(loaded, sampler_args):
    model, tokenizer, drafter = loaded
    sampler = make_sampler(*sampler_args[:3], top_k=sampler_args[3])
    runs = {}
    for seed in (11, 12):
        for i, settings in enumerate(SETTINGS):
            mx.random.seed(seed)
            runs[seed, i] = [r.token for r in stream_generate(model, tokenizer, [7, 8, 9], 40, drafter=drafter,
                                                              sampler=sampler, **settings)]
    for seed in (11, 12):
        assert all(runs[seed, i] == runs[seed, 0] for i in range(len(SETTINGS))), runs
    assert runs[11, 0] != runs[12, 0]


def test_position_seeds_do_not_depend_on_how_far_a_round_looks_ahead():
    from treeflash_mlx.sampling import PositionKeys

    def stream(lookahead: list[int], commits: list[int]) -> list[int]:
        mx.random.seed(5)
        keys, out = PositionKeys(), []
        for ahead, n in zip(lookahead, commits):
            seen = [keys.seed(d) for d in range(ahead)]
            out += seen[:n]
            keys.commit(n)
        return out

    deep = stream([16, 16, 16, 16], [1, 3, 2, 4])  # big trees: many seeds drawn ahead, few committed
    shallow = stream([1, 3, 2, 4], [1, 3, 2, 4])  # exactly the committed ones
    assert deep == shallow and len(set(deep)) == 10
    mx.random.seed(6)
    assert PositionKeys().seed(0) != deep[0]
