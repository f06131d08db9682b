"""Drafter checkpoints load in the published layouts and are refused, in one clear line, when wrong."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import random_prompts, save_drafter, tiny_drafter, tiny_target
from mlx.utils import tree_flatten

from treeflash_mlx import stream_generate
from treeflash_mlx.checkpoints import load_drafter, resolve, validate
from treeflash_mlx.target import Target


@pytest.fixture(scope="module")
def target():
    return tiny_target("qwen3")


def same_weights(a, b):
    wa, wb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    return wa.keys() == wb.keys() and all(np.array_equal(np.array(wa[k]), np.array(wb[k])) for k in wa)


@pytest.mark.parametrize("layout,head", [("treeflash", True), ("dflash", False)])
def test_published_layouts_load_and_draft_the_same(target, tokenizer, tmp_path, layout, head):
    original = tiny_drafter(target, head=head)
    loaded, path = load_drafter(save_drafter(original, tmp_path / "d", layout=layout))
    assert path == tmp_path / "d" and loaded.has_head == head and same_weights(original, loaded)
    validate(loaded.args, Target(target))
    prompt = random_prompts(1)[0]
    # (a fixed budget: auto's choices follow each run's own timings, and would differ where the drafts do not)
    runs = [[(r.token, r.acceptance_length) for r in stream_generate(target, tokenizer, prompt, 24, drafter=d,
                                                                     tree_size=16)] for d in (original, loaded)]
    assert runs[0] == runs[1]


def test_sharded_safetensors_with_index(target, tmp_path):
    original = tiny_drafter(target)
    weights = dict(tree_flatten(original.parameters()))
    keys = sorted(weights)
    path = tmp_path / "sharded"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(original.args.to_dict()))
    index = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        mx.save_safetensors(str(path / name), {k: weights[k] for k in part})
        index.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    assert same_weights(original, load_drafter(path)[0])


def test_config_variants_rope_parameters_and_top_level_options(target, tmp_path):
    original = tiny_drafter(target)
    path = save_drafter(original, tmp_path / "d")
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = {"rope_theta": config.pop("rope_theta"), "rope_type": "default"}
    config.update(config.pop("treeflash_config"))
    (path / "config.json").write_text(json.dumps(config))
    loaded, _ = load_drafter(path)
    assert loaded.args.rope_theta == original.args.rope_theta and loaded.has_head


def break_config(path, fn):
    config = json.loads((path / "config.json").read_text())
    fn(config)
    (path / "config.json").write_text(json.dumps(config))


def drop_tensor(path, key=None, add=None, reshape=None):
    weights = mx.load(str(path / "model.safetensors"))
    if key:
        weights.pop(key)
    if add:
        weights[add] = mx.zeros((2, 2))
    if reshape:
        weights[reshape] = weights[reshape][:-1]
    mx.save_safetensors(str(path / "model.safetensors"), weights)


def set_sub_vocab(path, ids):
    """Give a saved drafter a 3-token sub-vocabulary with the ids given (of any dtype)."""
    weights = dict(mx.load(str(path / "model.safetensors")))
    weights["sub_vocab"] = ids
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    break_config(path, lambda c: c["treeflash_config"].update(sub_vocab_size=3))


BROKEN = {
    "no config": (lambda p: (p / "config.json").unlink(), "has no config.json"),
    "bad json": (lambda p: (p / "config.json").write_text("{oops"), "is not valid JSON"),
    "missing key": (lambda p: break_config(p, lambda c: c.pop("hidden_size")), "lacks the required key 'hidden_size'"),
    "bad head kind": (lambda p: break_config(p, lambda c: c["treeflash_config"].update(ar_approximation="mlp")),
                      "ar_approximation must be 'swiglu' or null"),
    "no weights": (lambda p: (p / "model.safetensors").unlink(), "has no weights (*.safetensors or pytorch_model*.bin)"),
    "not a torch zip": (lambda p: (p / "model.safetensors").rename(p / "pytorch_model.bin"), "not a PyTorch zip checkpoint"),
    "corrupt": (lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 64), "corrupt or truncated"),
    "missing tensor": (lambda p: drop_tensor(p, key="ar_approximation.ug.bias"), "missing 1 tensor(s)"),
    "unexpected tensor": (lambda p: drop_tensor(p, add="model.extra.weight"), "unexpected tensor(s), e.g. 'model.extra.weight'"),
    "mis-shaped": (lambda p: drop_tensor(p, reshape="model.fc.weight"), "'model.fc.weight' has shape"),
    "zero heads": (lambda p: break_config(p, lambda c: c.update(num_attention_heads=0)),
                   "num_attention_heads must be a positive integer"),
    "one-token block": (lambda p: break_config(p, lambda c: c.update(block_size=1)),
                        "block_size must be at least 2"),
    "bad quantization": (lambda p: break_config(p, lambda c: c.update(quantization={"bits": 4})),
                         "invalid quantization entry"),
    "vocab out of range": (lambda p: set_sub_vocab(p, mx.array([3, 256, 7], dtype=mx.int32)),
                           "sub_vocab holds ids outside [0, 256)"),
    "vocab repeats": (lambda p: set_sub_vocab(p, mx.array([3, 9, 3], dtype=mx.int32)), "sub_vocab repeats"),
    "vocab not integer": (lambda p: set_sub_vocab(p, mx.array([3.0, 9.0, 4.0])), "integer token ids"),
    "vocab too large": (lambda p: break_config(p, lambda c: c["treeflash_config"].update(sub_vocab_size=257)),
                        "sub_vocab_size must be an integer in [1, vocab_size 256]"),
    "shard outside": (lambda p: (p / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.fc.weight": "../elsewhere.safetensors"}})), "names a file outside"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_checkpoints_are_refused_clearly(target, tmp_path, case):
    path = save_drafter(tiny_drafter(target), tmp_path / "d")
    damage, message = BROKEN[case]
    damage(path)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        load_drafter(path)
    assert message in str(err.value) and "\n" not in str(err.value)


MISMATCHES = {
    "hidden": (dict(hidden_size=32, head_dim=8), "hidden size 32 != target's 64"),
    "vocab": (dict(vocab_size=300), "vocabulary 300 != target's 256"),
    "layers": (dict(num_target_layers=6), "made for a 6-layer target"),
    "layer ids": (dict(target_layer_ids=[1, 9]), "target_layer_ids [9] out of range"),
    "mask": (dict(mask_token_id=999), "mask_token_id 999 outside the vocabulary"),
}


@pytest.mark.parametrize("case", MISMATCHES)
def test_drafter_for_another_target_is_refused(target, case):
    changes, message = MISMATCHES[case]
    config = tiny_drafter(target).args
    for key, value in changes.items():
        setattr(config, key, value)
    with pytest.raises(ValueError, match="drafter does not match the target") as err:
        validate(config, Target(target))
    assert message in str(err.value)


def test_hub_repo_ids_resolve_from_the_local_cache_offline(target, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-drafter" / "snapshots" / ("a" * 40)
    save_drafter(tiny_drafter(target), snapshot)
    (cache / "models--someone--tiny-drafter" / "refs").mkdir(parents=True)
    (cache / "models--someone--tiny-drafter" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    drafter, path = load_drafter("someone/tiny-drafter")
    assert path == snapshot and drafter.has_head
    with pytest.raises(FileNotFoundError, match="could not be fetched from the Hugging Face Hub"):
        resolve("someone/not-there", ["*.json"], "drafter")
    with pytest.raises(FileNotFoundError, match="directory './nowhere' does not exist"):
        resolve("./nowhere", ["*.json"], "drafter")


def test_a_sub_vocabulary_is_saved_loaded_and_drafts_only_its_tokens(target, tokenizer, tmp_path):
    from treeflash_mlx.checkpoints import save_drafter as save_ours
    from treeflash_mlx.drafting import DraftOptions, make_head, transition_tables

    ids = [200, 3, 77, 150, 9, 31, 64, 128, 5, 250, 11, 42]
    original = tiny_drafter(target, sub_vocab=ids)
    loaded, _ = load_drafter(save_ours(original, tmp_path / "d"))
    assert loaded.args.sub_vocab_size == 12 and np.array(loaded.sub_vocab).tolist() == ids
    assert same_weights(original, loaded)
    t = Target(target)
    hidden = mx.array(np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32))
    for opts in (DraftOptions("treeflash", 32, 4, 4, 1.0), DraftOptions("treeflash", 32, 4, 4, 1.0, head_vocab=6),
                 DraftOptions("marginal", 32, 4, 4, 1.0)):
        tokens, logp, _ = transition_tables(loaded, t, 9, hidden, opts, make_head(loaded, t))
        assert set(tokens[np.isfinite(logp)].ravel().tolist()) <= set(ids), opts
    assert "sub_vocab" not in dict(tree_flatten(loaded.trainable_parameters())), "the vocabulary is not trained"
