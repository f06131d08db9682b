"""Drafter checkpoints a careless or hostile user can hand over: config fields of the wrong type or absurd size,
weights that are not floating point or not finite. Each is refused in one line naming the field or tensor."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import pytest
from conftest import save_drafter, tiny_drafter, tiny_target
from mlx.utils import tree_flatten

from treeflash_mlx.checkpoints import load_drafter, read_config
from treeflash_mlx.convert import convert


CONFIG_EDITS = {
    "rms_norm_eps": ("1e-6", "rms_norm_eps must be a number"),
    "rope_theta": ("abc", "rope_theta must be a number"),
    "target_layer_ids": ("0,1", "target_layer_ids must be a list"),
    "mask_token_id": ("7", "mask_token_id must be an integer"),
    "attention_bias": ("false", "attention_bias must be true or false"),
    "hidden_size": (64.0, "hidden_size must be a positive integer"),
    "block_size": (100000, "block_size 100000 is far beyond"),
    "num_hidden_layers": (10**6, "num_hidden_layers must be in"),
    "max_position_embeddings": ("4096", "max_position_embeddings must be a positive integer"),
    "head_dim": (-4, "head_dim must be at least 1"),
}

@pytest.mark.parametrize("field", CONFIG_EDITS)
def test_wrongly_typed_or_absurd_config_fields_are_named(tmp_path, field):
    path = save_drafter(tiny_drafter(tiny_target("qwen3", hidden=32, layers=2)), tmp_path / "d")
    config = json.loads((path / "config.json").read_text())
    value, message = CONFIG_EDITS[field]
    if field in ("target_layer_ids", "mask_token_id"):
        config["dflash_config"][field] = value
    else:
        config[field] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message) as info:
        read_config(path)
    assert "\n" not in str(info.value)

@pytest.mark.parametrize("case", ["int32", "nan", "inf"])
def test_non_floating_or_non_finite_drafter_weights_are_refused(tmp_path, case):
    path = save_drafter(tiny_drafter(tiny_target("qwen3", hidden=32, layers=2)), tmp_path / "d")
    weights = dict(mx.load(str(path / "model.safetensors")))
    key = "model.layers.0.mlp.up_proj.weight"
    if case == "int32":
        weights[key] = weights[key].astype(mx.int32)
    else:
        weights[key] = mx.full(weights[key].shape, math.nan if case == "nan" else -math.inf)
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    message = "holds int32 values, not floating point" if case == "int32" else "holds NaN or infinite values"
    with pytest.raises(ValueError, match=message):
        load_drafter(path)
    with pytest.raises(ValueError, match=message):
        convert(str(path), tmp_path / "out")
    assert not (tmp_path / "out").exists()

def test_quantized_drafters_still_load(tmp_path):
    path = save_drafter(tiny_drafter(tiny_target("qwen3", hidden=64, layers=2)), tmp_path / "d")
    convert(str(path), tmp_path / "q", quantize=True, q_bits=4, q_group_size=32)
    drafter, _ = load_drafter(tmp_path / "q")
    assert any(v.dtype == mx.uint32 for _, v in tree_flatten(drafter.parameters()))
