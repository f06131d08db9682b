"""Tiny models built on the spot: random mlx-lm targets, random drafters, a byte-level tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["TREEFLASH_AUTOTUNE_CACHE"] = ""  # --tree-size auto: no cache file outside the tests' own

import treeflash_mlx  # noqa: E402,F401  (loads the fast BLAS before mlx)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402
from mlx_lm.utils import _get_classes  # noqa: E402

from treeflash_mlx.drafter import Drafter, DrafterConfig  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_tokenizer():
    """A byte-level tokenizer: ids 0..255 are bytes, 256 is the end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's printable stand-ins for the 256 bytes, id = byte value.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    byte_vocab = {chr(b if b in printable else next(extra)): b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def target_config(family: str, vocab: int = 256, hidden: int = 64, layers: int = 4, tie: bool = False) -> dict:
    config = {
        "model_type": family,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tie,
    }
    if family in ("qwen3", "qwen3_moe"):
        config["head_dim"] = hidden // 4
    if family == "qwen3_moe":  # every layer sparse: 4 experts, 2 per token
        config.update(num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                      moe_intermediate_size=hidden, norm_topk_prob=True)
    if family in ("qwen3_5", "qwen3_5_moe", "qwen3_next"):  # Gated DeltaNet layers between gated attention ones
        config.update(head_dim=hidden // 4, full_attention_interval=2, linear_num_value_heads=4,
                      linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                      linear_conv_kernel_dim=4, partial_rotary_factor=0.25)
        if family == "qwen3_next":
            config.update(num_experts=0, num_experts_per_tok=0, decoder_sparse_step=1, mlp_only_layers=[],
                          moe_intermediate_size=hidden, shared_expert_intermediate_size=hidden)
        else:
            config["rope_parameters"] = {"type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
    if family in ("qwen3_5_moe", "qwen3_next"):  # sparse MoE blocks with a shared expert
        config.update(num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, moe_intermediate_size=hidden,
                      shared_expert_intermediate_size=hidden, norm_topk_prob=True)
    if family == "gpt_oss":  # sinks, YaRN, sliding layers (window 8) alternating with full ones, 4 experts
        config.update(head_dim=hidden // 4, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                      layer_types=["sliding_attention", "full_attention"] * (layers // 2),
                      rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                    "original_max_position_embeddings": 128})
    if family == "gemma3_text":  # every other layer local, with a window short prompts already pass
        config.update(head_dim=hidden // 4, query_pre_attn_scalar=hidden // 4, sliding_window=8,
                      sliding_window_pattern=2, rope_local_base_freq=10000.0, rope_theta=1_000_000.0)
    return config


def tiny_target(family: str = "qwen3", seed: int = 0, extra: dict | None = None, **kwargs) -> nn.Module:
    """A random mlx-lm model of ``family``; ``extra`` adds or overrides config keys."""
    config = {**target_config(family, **kwargs), **(extra or {})}
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    # Bigger embeddings than the default init give peaked, varied distributions (fewer near-ties).
    model.model.embed_tokens.weight = 2.0 * model.model.embed_tokens.weight
    mx.eval(model.parameters())
    model.config_dict = config
    return model


def tiny_drafter(
    target: nn.Module, head: bool = True, block_size: int = 8, layers: int = 1, seed: int = 1,
    sub_vocab: list[int] | None = None, **overrides
) -> Drafter:
    from treeflash_mlx.target import Target

    args = Target(target).family.args
    n_target = args.num_hidden_layers
    config = DrafterConfig(
        hidden_size=args.hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * args.hidden_size,
        vocab_size=args.vocab_size,
        num_target_layers=n_target,
        mask_token_id=args.vocab_size - 1,
        head_dim=args.hidden_size // 4,
        block_size=block_size,
        target_layer_ids=[1, n_target - 2] if n_target > 2 else [0],
        ar_approximation="swiglu" if head else None,
        sub_vocab_size=len(sub_vocab) if sub_vocab is not None else None,
        **overrides,
    )
    mx.random.seed(seed)
    drafter = Drafter(config)
    # Random weights of a trained scale: make the head and the fusion matter.
    drafter.update(tree_map(lambda w: w * 2.0, drafter.parameters()))
    if sub_vocab is not None:
        drafter.sub_vocab = mx.array(list(sub_vocab), dtype=mx.int32)
    mx.eval(drafter.parameters())
    return drafter


def save_target(model: nn.Module, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(model.config_dict))
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    byte_tokenizer().save_pretrained(str(path))
    return path


def save_drafter(drafter: Drafter, path: Path, layout: str = "treeflash") -> Path:
    """Write a drafter as the published TreeFlash or DFlash checkpoints are laid out."""
    path.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(drafter.parameters()))
    config = drafter.args.to_dict()
    if layout == "dflash":
        weights = {k.removeprefix("model."): v for k, v in weights.items() if not k.startswith("ar_approximation")}
        config.pop("treeflash_config")
        config["architectures"] = ["DFlashDraftModel"]
    (path / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    return path


def mlx_lm_greedy(model: nn.Module, prompt: list[int], n: int) -> list[int]:
    """The reference: plain mlx-lm greedy decoding."""
    from mlx_lm.generate import generate_step

    out = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=n):
        out.append(int(token))
    return out


def random_prompts(count: int, vocab: int = 256, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab - 1, size=int(rng.integers(3, 24))).tolist() for _ in range(count)]


@pytest.fixture(scope="session")
def tokenizer():
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return TokenizerWrapper(byte_tokenizer())
