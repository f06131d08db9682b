"""Every target family and quantization the library runs: greedy output equals mlx-lm's own decoding of the
same model (sparse MoE blocks route each tree node on its own; quantized layers are the model's own)."""

from __future__ import annotations

import mlx.nn as nn
import pytest
from conftest import mlx_lm_greedy, random_prompts, tiny_drafter, tiny_target

from treeflash_mlx import stream_generate
from treeflash_mlx.target import SUPPORTED_FAMILIES, Target

N_PROMPTS, N_TOKENS = 4, 40
MODES = ("treeflash", "marginal", "chain")


def quantized(model: nn.Module, bits: int | None) -> nn.Module:
    if bits:
        nn.quantize(model, group_size=32, bits=bits)
    return model


@pytest.mark.parametrize("bits", [None, 8, 4], ids=["float", "8-bit", "4-bit"])
@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_every_family_and_quantization_matches_mlx_lm_greedy(tokenizer, family, bits):
    target = quantized(tiny_target(family, seed=6), bits)
    drafter = tiny_drafter(target)
    prompts = random_prompts(N_PROMPTS, seed=11)
    expected = [mlx_lm_greedy(target, p, N_TOKENS) for p in prompts]
    for mode in MODES:
        for prompt, reference in zip(prompts, expected):
            out = [r.token for r in stream_generate(target, tokenizer, prompt, N_TOKENS, drafter=drafter, mode=mode)]
            assert out == reference, (family, bits, mode)


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
