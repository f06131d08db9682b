"""Tree verification over mlx-lm targets: per-node logits, feature capture, the commit of the accepted path (K/V
compaction; a recurrent layer's state taken from the accepted node) (docs/algorithm.md, "Verification", "Commit")."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import tiny_target

from treeflash_mlx.target import Target, cache_offset
from treeflash_mlx.tree import best_first


def random_tree(seed: int, vocab: int = 255):
    rng = np.random.default_rng(seed)
    depths, rows, k = 5, 3, 3
    logits = rng.normal(size=(depths, rows, k)) * 2
    logp = np.sort(logits - np.log(np.exp(logits).sum(-1, keepdims=True)), axis=-1)[..., ::-1].copy()
    tokens = rng.integers(0, vocab, size=(depths, rows, k))
    next_row = rng.integers(-1, rows, size=(depths, rows, k))
    return best_first(int(rng.integers(vocab)), tokens, logp, next_row, tree_size=24)


def plain_logits(model, tokens):
    return np.array(model(mx.array(tokens)[None])[0, -1])


def quantized(model):
    nn.quantize(model, group_size=32, bits=8)
    return model


TARGETS = {
    "qwen3": lambda: tiny_target("qwen3"),
    "qwen2": lambda: tiny_target("qwen2"),
    "llama": lambda: tiny_target("llama"),
    "qwen3-tied": lambda: tiny_target("qwen3", tie=True),
    "qwen3-8bit": lambda: quantized(tiny_target("qwen3")),
    "qwen3_5": lambda: tiny_target("qwen3_5"),  # Gated DeltaNet layers: each node continues its parent's state
    "qwen3_5-8bit": lambda: quantized(tiny_target("qwen3_5")),
    "qwen3_next": lambda: tiny_target("qwen3_next"),
    "gpt_oss": lambda: tiny_target("gpt_oss"),  # sinks, YaRN, windows of 8 (the tree reaches past them)
}


@pytest.mark.parametrize("name", TARGETS)
def test_tree_logits_compaction_and_features(name):
    model = TARGETS[name]()
    target = Target(model)
    prompt = np.random.default_rng(0).integers(0, 255, size=13).tolist()
    tree = random_tree(seed=len(name))
    cache = target.make_cache()
    target.forward(mx.array(prompt), cache)
    start = cache_offset(cache)
    capture = [0, 2]
    logits, feats = target.verify(tree, cache, capture)
    # Every node's logits are those of its own path, computed plainly.
    for i in range(len(tree)):
        path = [int(tree.tokens[0])] + [int(tree.tokens[j]) for j in tree.path(i)]
        np.testing.assert_allclose(np.array(logits[i]), plain_logits(model, prompt + path), atol=2e-4, rtol=2e-4)
    # Accept the deepest path (not contiguous in node order) and continue from it.
    leaf = int(np.argmax(tree.depths))
    keep = [0] + tree.path(leaf)
    assert keep != list(range(len(keep)))
    target.commit(cache, start, keep)
    assert all(c.offset == start + len(keep) for c in cache)
    committed = prompt + [int(tree.tokens[j]) for j in keep]
    nxt, _ = target.forward(mx.array([7]), cache)
    np.testing.assert_allclose(np.array(nxt[0]), plain_logits(model, committed + [7]), atol=2e-4, rtol=2e-4)
    # Features: outputs of layers 0 and 2 of each node, concatenated.
    assert feats.shape == (len(tree), 2 * target.hidden_size)


def test_features_are_the_outputs_of_the_selected_layers():
    model = tiny_target("qwen3")
    target = Target(model)
    tokens = [5, 9, 33, 2]
    _, feats = target.forward(mx.array(tokens), target.make_cache(), capture=[2, 0])
    h = model.model.embed_tokens(mx.array(tokens)[None])
    outs = []
    for layer in model.model.layers:
        h = layer(h, "causal", None)
        outs.append(h[0])
    want = np.concatenate([np.array(outs[2]), np.array(outs[0])], axis=-1)  # in the order asked for
    np.testing.assert_allclose(np.array(feats), want, atol=1e-4, rtol=1e-4)
    _, twice = target.forward(mx.array(tokens), target.make_cache(), capture=[1, 1])
    np.testing.assert_allclose(np.array(twice), np.concatenate([np.array(outs[1])] * 2, axis=-1), atol=1e-4)


def test_chunked_prefill_equals_one_pass():
    model = tiny_target("llama")
    target = Target(model)
    tokens = np.random.default_rng(1).integers(0, 255, size=20).tolist()
    cache = target.make_cache()
    target.forward(mx.array(tokens[:7]), cache)
    logits, _ = target.forward(mx.array(tokens[7:]), cache, last_only=True)
    np.testing.assert_allclose(np.array(logits[0]), plain_logits(model, tokens), atol=2e-4, rtol=2e-4)


def test_llama_family_models_of_other_types_are_served():
    from mlx_lm.utils import _get_classes

    from conftest import target_config

    config = dict(target_config("llama"), model_type="mistral")
    model_class, args_class = _get_classes(config)
    assert Target(model_class(args_class.from_dict(config))).family_name == "llama"


def test_unsupported_family_is_refused():
    class Other(nn.Module):
        model_type = "mamba"

    with pytest.raises(ValueError, match="target model type 'mamba' is not supported"):
        Target(Other())
