"""Every target family and quantization the library runs: greedy output equals mlx-lm's own decoding of the
same model (sparse MoE blocks route each tree node on its own; quantized layers are the model's own; sliding
windows cut attention as mlx-lm's rotating caches do)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import mlx_lm_greedy, random_prompts, tiny_drafter, tiny_target

from treeflash_mlx import make_prompt_cache, stream_generate
from treeflash_mlx.target import SUPPORTED_FAMILIES, Target

N_PROMPTS, N_TOKENS = 4, 40
MODES = ("treeflash", "marginal", "chain")
WINDOW = 8  # shorter than most prompts plus their generations, and than the drafter's block
SLIDING = {  # config keys that give each family sliding-window layers next to full ones
    "llama": {"layer_types": ["sliding_attention", "full_attention"] * 2, "sliding_window": WINDOW},
    "gemma3_text": {"sliding_window": WINDOW, "sliding_window_pattern": 2},
}


def quantized(model: nn.Module, bits: int | None) -> nn.Module:
    if bits:
        nn.quantize(model, group_size=32, bits=bits)
    return model


def assert_every_mode_matches_mlx_lm_greedy(target: nn.Module, tokenizer, label) -> None:
    """Every tree and chain mode, with a random drafter, gives mlx-lm's greedy tokens on the standard prompts."""
    drafter = tiny_drafter(target)
    prompts = random_prompts(N_PROMPTS, seed=11)
    expected = [mlx_lm_greedy(target, p, N_TOKENS) for p in prompts]
    for mode in MODES:
        for prompt, reference in zip(prompts, expected):
            out = [r.token for r in stream_generate(target, tokenizer, prompt, N_TOKENS, drafter=drafter, mode=mode)]
            assert out == reference, (label, mode)


@pytest.mark.parametrize("bits", [None, 8, 4], ids=["float", "8-bit", "4-bit"])
@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_every_family_and_quantization_matches_mlx_lm_greedy(tokenizer, family, bits):
    assert_every_mode_matches_mlx_lm_greedy(quantized(tiny_target(family, seed=6), bits), tokenizer, (family, bits))


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_every_family_matches_mlx_lm_greedy_with_the_cpu_attention_in_every_layer(tokenizer, family, monkeypatch):
    """Tiny models' attention is below the size where the CPU attention takes over from MLX's fused kernel
    (cpu_kernels.MIN_SCORES); here it runs every layer of every pass, prefill included."""
    from treeflash_mlx import cpu_kernels

    calls = []
    real = cpu_kernels.attention
    monkeypatch.setattr(cpu_kernels, "MIN_SCORES", 0)
    monkeypatch.setattr(cpu_kernels, "attention", lambda *a: calls.append(1) or real(*a))
    assert_every_mode_matches_mlx_lm_greedy(tiny_target(family, seed=6), tokenizer, family)
    assert calls, "the CPU attention must have run"


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_the_cpu_swiglu_runs_where_the_family_has_mlx_lms_swiglu_mlp_and_stays_lossless(tokenizer, family,
                                                                                       monkeypatch):
    """Every dense SwiGLU MLP of the tree passes runs the CPU kernel (Gemma's GELU and sparse MoE blocks keep
    their own), and the output stays mlx-lm's."""
    from treeflash_mlx import cpu_kernels

    calls = []
    real = cpu_kernels.swiglu
    monkeypatch.setattr(cpu_kernels, "swiglu", lambda *a: calls.append(1) or real(*a))
    target = tiny_target(family, seed=6)
    assert_every_mode_matches_mlx_lm_greedy(target, tokenizer, family)
    family_of = Target(target).family
    dense = [type(layer.mlp) is family_of.dense_mlp for layer in family_of.layers]
    assert bool(calls) == any(dense), family
    assert any(dense) == (family in ("qwen3", "qwen2", "llama", "qwen3_5")), family  # the tiny MoE configs: none


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_drafter_with_a_quantized_target_stays_lossless(tokenizer, bits):
    target = quantized(tiny_target("qwen3_moe", seed=3), bits)
    drafter = quantized(tiny_drafter(target), bits)
    assert "scales" in drafter.model.layers[0].self_attn.q_proj
    for prompt in random_prompts(N_PROMPTS, seed=2):
        reference = mlx_lm_greedy(target, prompt, N_TOKENS)
        assert [r.token for r in stream_generate(target, tokenizer, prompt, N_TOKENS, drafter=drafter)] == reference


def test_an_unsupported_family_is_refused_in_one_line():
    fake = type("Model", (nn.Module,), {"__module__": "mlx_lm.models.mamba"})()
    with pytest.raises(ValueError, match="is not supported; use a model of the qwen3, qwen3_moe, qwen2, llama"):
        Target(fake)


def long_prompts() -> list[list[int]]:
    """Short prompts that the window overtakes while generating, and one three windows long."""
    return random_prompts(2, seed=11) + [np.random.default_rng(5).integers(0, 255, 3 * WINDOW).tolist()]


@pytest.mark.parametrize("attention", ["fused", "cpu"])
@pytest.mark.parametrize("bits", [None, 4], ids=["float", "4-bit"])
@pytest.mark.parametrize("family", SLIDING)
def test_sliding_window_targets_match_mlx_lm_greedy_in_every_mode(tokenizer, family, bits, attention, monkeypatch):
    from treeflash_mlx import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "MIN_SCORES", 0 if attention == "cpu" else 1 << 62)
    target = quantized(tiny_target(family, seed=6, extra=SLIDING[family]), bits)
    assert None in Target(target).windows and WINDOW in Target(target).windows
    drafter = tiny_drafter(target, block_size=16)  # trees and chains deeper than the window
    for prompt in long_prompts():
        reference = mlx_lm_greedy(target, prompt, N_TOKENS)
        for mode in MODES + ("ar",):  # prefill in chunks of 5: chunks that start past the window
            out = [r.token for r in stream_generate(target, tokenizer, prompt, N_TOKENS, drafter=drafter, mode=mode,
                                                    prefill_step_size=5)]
            assert out == reference, (family, bits, mode, len(prompt))


@pytest.mark.parametrize("family", list(SLIDING) + ["gpt_oss"])
def test_a_tree_deeper_than_the_window_sees_what_mlx_lm_sees(family):
    """A 20-node path verified as a tree (per-node positions, ancestor mask: one extra leaf off its middle makes
    it a tree) and as a causal chunk after a 9-token prefix gives mlx-lm's logits, which it computes one token
    at a time through its rotating caches."""
    from treeflash_mlx.tree import DraftTree

    model = tiny_target(family, seed=2, extra=SLIDING.get(family))
    tokens = np.random.default_rng(0).integers(0, 255, 30).tolist()
    cache = model.make_cache()
    model(mx.array([tokens[:9]]), cache=cache)
    reference = mx.concatenate([model(mx.array([[t]]), cache=cache)[0] for t in tokens[9:29]])
    target = Target(model)
    path = DraftTree(np.array(tokens[9:29]), np.arange(20) - 1, np.arange(20))
    branched = DraftTree(np.array(tokens[9:29] + [3]), np.append(np.arange(20) - 1, 9), np.append(np.arange(20), 10))
    for tree in (branched, path):
        ours = target.make_cache()
        target.forward(mx.array(tokens[:9]), ours)
        logits, _ = target.verify(tree, ours)
        assert np.allclose(np.array(logits[:20]), np.array(reference), atol=1e-4), (family, len(tree))


def test_a_sliding_window_target_reuses_its_prompt_cache_losslessly(tokenizer):
    target = tiny_target("llama", seed=4, extra=SLIDING["llama"])
    drafter = tiny_drafter(target, block_size=16)
    cache = make_prompt_cache(target, drafter)
    first = long_prompts()[2]
    answer = [r.token for r in stream_generate(target, tokenizer, first, 20, drafter=drafter, prompt_cache=cache)]
    second = first + answer + [7, 8, 9]  # the next turn: the whole conversation again, then more
    out = [r.token for r in stream_generate(target, tokenizer, second, 20, drafter=drafter, prompt_cache=cache)]
    assert cache.reused > 2 * WINDOW and out == mlx_lm_greedy(target, second, 20)


def test_sliding_windows_without_a_size_or_in_other_families_are_refused_in_one_line():
    target = tiny_target("llama", extra={"layer_types": ["sliding_attention", "full_attention"] * 2})
    with pytest.raises(ValueError, match="llama config has sliding-window layers but sliding_window is None"):
        Target(target)
    target = tiny_target("qwen3")
    target.model.layers[1].use_sliding = True  # what a future mlx-lm could give a family we run without windows
    with pytest.raises(ValueError, match="qwen3 targets with sliding-window attention layers are not supported; "
                                         "sliding windows run in the llama, gemma3_text and gpt_oss families"):
        Target(target)


def test_windows_mlx_lm_ignores_are_ignored_here_too():
    """mlx-lm's qwen2.py reads no window keys, and llama.py windows only the layers ``layer_types`` names."""
    qwen2 = tiny_target("qwen2", extra={"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2})
    mistral = tiny_target("llama", extra={"sliding_window": WINDOW})  # a Mistral-7B-v0.1-style config
    assert Target(qwen2).windows == Target(mistral).windows == [None] * 4


@pytest.mark.parametrize("family", ["gemma2", "cohere2"])
def test_other_sliding_window_families_are_refused_by_name(family):
    fake = type("Model", (nn.Module,), {"__module__": f"mlx_lm.models.{family}", "model_type": family})()
    with pytest.raises(ValueError, match=f"target model type '{family}' is not supported; use a model of the "):
        Target(fake)


# Qwen3-Coder-30B-A3B-Instruct's config.json: the keys mlx-lm's qwen3_moe reads.
CODER_30B = dict(
    model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
    head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
    decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, vocab_size=151936, rms_norm_eps=1e-6,
    max_position_embeddings=262144, rope_theta=10_000_000.0, tie_word_embeddings=False,
)
# peerrh/treeflash-qwen3-coder-30b-a3b's config.json in the published TreeFlash layout. Its file could not be
# read here (no hub access); this is the config the published rules give for that target: the target's width
# and attention shape, 5 drafter layers reading 5 target layers spread over [1, n - 3] (the rule of
# default_target_layer_ids, which other DFlash configs for 48-layer Qwen3 MoE targets follow), block 16, and
# the mask token every Qwen3 DFlash/TreeFlash drafter uses (151669, a reserved id of the Qwen3 vocabulary).
CODER_30B_DRAFTER = {
    "architectures": ["TreeFlashDraftModel"], "model_type": "qwen3", "hidden_size": 2048, "num_hidden_layers": 5,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144,
    "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "max_position_embeddings": 40960,
    "attention_bias": False, "block_size": 16, "num_target_layers": 48,
    "dflash_config": {"target_layer_ids": [1, 12, 23, 34, 45], "mask_token_id": 151669},
    "treeflash_config": {"ar_approximation": "swiglu", "candidate_tokens": 16},
}
# What the tests shrink: nothing the drafter and the target share (width, layer count and ids, block size).
SMALL_VOCAB = 512  # the mask token moves to the last id, as 151669 sits past Qwen3's ordinary tokens
SHRINK_TARGET = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=64,
                     moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, vocab_size=SMALL_VOCAB)
SHRINK_DRAFTER = {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 64,
                  "vocab_size": SMALL_VOCAB,
                  "dflash_config": {**CODER_30B_DRAFTER["dflash_config"], "mask_token_id": SMALL_VOCAB - 1}}


def test_the_coder_30b_drafter_config_fits_its_target():
    from types import SimpleNamespace

    from treeflash_mlx.checkpoints import validate
    from treeflash_mlx.drafter import DrafterConfig, default_target_layer_ids

    config = DrafterConfig.from_dict(CODER_30B_DRAFTER)
    assert config.target_layer_ids == default_target_layer_ids(48, 5) and config.ar_approximation == "swiglu"
    target = SimpleNamespace(layers=[None] * 48, num_layers=48, hidden_size=2048, vocab_size=151936)
    validate(config, target)


@pytest.mark.slow  # ~25 s on 2 cores: 48 sparse layers per token
def test_a_coder_30b_shaped_pair_loads_through_the_published_layout_and_stays_lossless(tokenizer, tmp_path):
    """A drafter of the published Coder-30B config (random weights), written by our writer, exported to the
    published PyTorch layout and converted back, loads against a qwen3_moe target of the Coder-30B shape where
    the two meet (width 2048, 48 layers) and decodes greedily as mlx-lm does."""
    from conftest import save_target
    from mlx.utils import tree_map

    from treeflash_mlx import load
    from treeflash_mlx.checkpoints import save_drafter
    from treeflash_mlx.convert import convert, export
    from treeflash_mlx.drafter import Drafter, DrafterConfig

    target = tiny_target("qwen3_moe", seed=7, extra={**CODER_30B, **SHRINK_TARGET})
    save_target(target, tmp_path / "target")
    mx.random.seed(3)
    drafter = Drafter(DrafterConfig.from_dict({**CODER_30B_DRAFTER, **SHRINK_DRAFTER}))
    drafter.update(tree_map(lambda w: w * 2.0, drafter.parameters()))
    export(save_drafter(drafter, tmp_path / "ours"), tmp_path / "published")
    assert "model.fc.weight" in mx.load(str(tmp_path / "published" / "model.safetensors"))
    convert(str(tmp_path / "published"), tmp_path / "converted")
    model, _, loaded = load(str(tmp_path / "target"), str(tmp_path / "converted"))
    assert loaded.args.target_layer_ids == [1, 12, 23, 34, 45] and loaded.args.block_size == 16
    prompt = random_prompts(1, vocab=SMALL_VOCAB, seed=4)[0]
    out = [r.token for r in stream_generate(model, tokenizer, prompt, 20, drafter=loaded, mode="treeflash")]
    assert out == mlx_lm_greedy(model, prompt, 20)


def test_a_quantized_kv_cache_is_refused_for_sliding_window_targets_in_one_line(tokenizer):
    """mlx-lm cannot quantize the rotating caches of sliding layers, so there is no output to match."""
    target = tiny_target("llama", seed=4, extra=SLIDING["llama"])
    with pytest.raises(ValueError, match="kv_bits is not supported for targets with sliding-window layers"):
        list(stream_generate(target, tokenizer, [1, 2, 3], 4, kv_bits=8, kv_group_size=32))
