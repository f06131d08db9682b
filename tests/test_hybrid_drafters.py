"""The published DFlash drafters for hybrid and gpt-oss targets: their configs load (sliding drafter layers,
options inside ``dflash_config``, rope in ``rope_parameters``, YaRN), fit their targets, go through our converter
to the published layout and back unchanged, and draft losslessly for a target of the shape they were made for.

The configs are the published ones as reported (their files cannot be fetched here). The end-to-end tests keep
what the drafter and target share (width, target layer count and ids, block size, layer types, windows) and
shrink the rest (heads, MLP widths, vocabulary: the mask token moves to the last id)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from conftest import mlx_lm_greedy, random_prompts, save_target, tiny_target
from mlx.utils import tree_flatten, tree_map

from treeflash_mlx import load, stream_generate
from treeflash_mlx.checkpoints import save_drafter, validate
from treeflash_mlx.convert import convert, export
from treeflash_mlx.drafter import Drafter, DrafterConfig

QWEN35_DRAFTER = dict(architectures=["DFlashDraftModel"], model_type="qwen3", num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, vocab_size=248320,
                      max_position_embeddings=262144, attention_bias=False, tie_word_embeddings=False)
DRAFTERS = {
    "Qwen3.5-9B-DFlash": dict(QWEN35_DRAFTER, hidden_size=4096, num_hidden_layers=5, intermediate_size=12288,
                              block_size=16, num_target_layers=32, rope_theta=10_000_000.0,
                              dflash_config={"target_layer_ids": [1, 8, 15, 22, 29], "mask_token_id": 248070}),
    "Qwen3.5-27B-DFlash": dict(QWEN35_DRAFTER, hidden_size=5120, num_hidden_layers=5, intermediate_size=17408,
                               block_size=16, num_target_layers=64, rope_theta=10_000_000.0,
                               dflash_config={"target_layer_ids": [1, 16, 31, 46, 61], "mask_token_id": 248070}),
    "Qwen3.6-35B-A3B-DFlash": dict(
        QWEN35_DRAFTER, hidden_size=2048, num_hidden_layers=6, intermediate_size=6144, num_target_layers=40,
        num_attention_heads=16, num_key_value_heads=2, head_dim=256,
        layer_types=["sliding_attention"] * 5 + ["full_attention"], sliding_window=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0},
        dflash_config={"target_layer_ids": [1, 6, 11, 16, 22, 27, 32, 37], "mask_token_id": 248077,
                       "block_size": 16}),
    "gpt-oss-20b-DFlash": dict(
        architectures=["DFlashDraftModel"], model_type="qwen3", hidden_size=2880, num_hidden_layers=8,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, intermediate_size=2880, vocab_size=201088,
        rms_norm_eps=1e-5, max_position_embeddings=131072, block_size=8, num_target_layers=24,
        rope_theta=150000.0, rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                           "beta_slow": 1.0, "original_max_position_embeddings": 4096},
        dflash_config={"target_layer_ids": [1, 6, 11, 16, 21], "mask_token_id": 200000}),
}
TARGET_FAMILY = {"Qwen3.5-9B-DFlash": "qwen3_5", "Qwen3.5-27B-DFlash": "qwen3_5",
                 "Qwen3.6-35B-A3B-DFlash": "qwen3_5_moe", "gpt-oss-20b-DFlash": "gpt_oss"}


def test_the_published_configs_load_with_what_they_say():
    nine = DrafterConfig.from_dict(DRAFTERS["Qwen3.5-9B-DFlash"])
    assert (nine.block_size, nine.mask_token_id, nine.rope_theta) == (16, 248070, 1e7) and nine.layer_types is None
    moe = DrafterConfig.from_dict(DRAFTERS["Qwen3.6-35B-A3B-DFlash"])
    assert moe.block_size == 16 and moe.mask_token_id == 248077 and moe.rope_theta == 1e7
    assert [moe.window(i) for i in range(6)] == [4096] * 5 + [None]
    oss = DrafterConfig.from_dict(DRAFTERS["gpt-oss-20b-DFlash"])
    assert oss.block_size == 8 and oss.rope_scaling["rope_type"] == "yarn" and oss.target_layer_ids[-1] == 21
    for name, raw in DRAFTERS.items():  # each fits a target of its own width and depth
        config = DrafterConfig.from_dict(raw)
        n = raw["num_target_layers"]
        validate(config, SimpleNamespace(layers=[None] * n, num_layers=n, hidden_size=raw["hidden_size"],
                                         vocab_size=raw["vocab_size"]))
        assert config.ar_approximation is None, name  # DFlash drafters: no AR head


@pytest.mark.parametrize("bad,message", [
    ({"layer_types": ["sliding_attention"] * 6}, "needed by the sliding_attention layers"),
    ({"layer_types": ["sliding_attention"] * 5}, "layer_types must list 'full_attention' or 'sliding_attention' "
                                                 "for each of the 6 layers"),
    ({"layer_types": ["local"] * 6, "sliding_window": 8}, "layer_types must list"),
])
def test_bad_layer_types_are_one_line_errors(bad, message):
    raw = {k: v for k, v in DRAFTERS["Qwen3.6-35B-A3B-DFlash"].items() if k not in ("layer_types", "sliding_window")}
    with pytest.raises(ValueError, match=message):
        DrafterConfig.from_dict({**raw, **bad})


SMALL_VOCAB = 512
SHRINK_DRAFTER = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=64,
                      vocab_size=SMALL_VOCAB, max_position_embeddings=4096)
SHRINK_TARGET = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=64,
                     moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4,
                     num_experts_per_tok=2, num_local_experts=4, vocab_size=SMALL_VOCAB, linear_num_value_heads=2,
                     linear_num_key_heads=1, linear_key_head_dim=16, linear_value_head_dim=16,
                     full_attention_interval=4, max_position_embeddings=4096)


def target_for(name: str):
    raw = DRAFTERS[name]
    family = TARGET_FAMILY[name]
    extra = dict(SHRINK_TARGET, hidden_size=raw["hidden_size"], num_hidden_layers=raw["num_target_layers"])
    if family == "gpt_oss":
        extra.update(layer_types=["sliding_attention", "full_attention"] * (raw["num_target_layers"] // 2),
                     sliding_window=128)
    if family == "qwen3_5":
        extra.update(num_experts=0)
    return tiny_target(family, seed=3, extra=extra)


@pytest.mark.slow  # 24-64 target layers at the published widths: 10-40 s each on 2 cores
@pytest.mark.parametrize("name", DRAFTERS)
def test_a_published_shape_drafter_goes_through_the_published_layout_and_drafts_losslessly(name, tokenizer,
                                                                                          tmp_path):
    raw = DRAFTERS[name]
    dflash = {**raw["dflash_config"], "mask_token_id": SMALL_VOCAB - 1}
    config = DrafterConfig.from_dict({**raw, **SHRINK_DRAFTER, "dflash_config": dflash})
    mx.random.seed(5)
    drafter = Drafter(config)
    drafter.update(tree_map(lambda w: w * 2.0, drafter.parameters()))
    ours = save_drafter(drafter, tmp_path / "ours")
    export(ours, tmp_path / "published")
    published = json.loads((tmp_path / "published" / "config.json").read_text())
    assert published["architectures"] == ["DFlashDraftModel"]
    assert published.get("layer_types") == raw.get("layer_types")
    convert(str(tmp_path / "published"), tmp_path / "back")
    back = load_weights(tmp_path / "back")
    assert DrafterConfig.from_dict(json.loads((tmp_path / "back" / "config.json").read_text())) == config
    for key, value in tree_flatten(drafter.parameters()):  # exactly the weights we wrote
        assert np.array_equal(np.array(back[key]), np.array(value)), key

    target = target_for(name)
    save_target(target, tmp_path / "target")
    model, _, loaded = load(str(tmp_path / "target"), str(tmp_path / "back"))
    assert loaded.args.block_size == raw.get("block_size", raw["dflash_config"].get("block_size"))
    prompt = random_prompts(1, vocab=SMALL_VOCAB, seed=4)[0]
    out = [r.token for r in stream_generate(model, tokenizer, prompt, 16, drafter=loaded)]
    assert out == mlx_lm_greedy(model, prompt, 16)


def load_weights(path) -> dict:
    weights = {}
    for f in sorted(path.glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    return weights
