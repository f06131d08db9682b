"""Drafter checkpoints: finding them (local or Hugging Face), reading the published layouts, validation.

Layouts read directly (SPEC §6), safetensors single or sharded:
- TreeFlash: backbone keys under ``model.``, head keys under ``ar_approximation.``;
- DFlash: the same backbone keys without the ``model.`` prefix, no head;
- ours (written by the converter): the TreeFlash layout, optionally mlx-quantized (``quantization`` in config).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .drafter import Drafter, DrafterConfig
from .target import Target

DRAFTER_FILES = ["*.json", "*.safetensors"]
MODEL_FILES = ["*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]


def resolve(path_or_repo: str, allow_patterns: list[str], what: str) -> Path:
    """A local directory as it is, else a Hugging Face repo id fetched (or found in the local cache)."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{what} '{path_or_repo}' is a file; pass the directory that holds config.json")
    looks_like_repo = path_or_repo.count("/") == 1 and not path_or_repo.startswith((".", "/", "~"))
    if not looks_like_repo:
        raise FileNotFoundError(f"{what} directory '{path_or_repo}' does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path_or_repo, allow_patterns=allow_patterns))
    except Exception as err:  # offline, unknown repo, gated repo, network: one clear line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(
            f"{what} '{path_or_repo}' is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(err).__name__}: {reason})"
        ) from None


def read_config(path: Path) -> DrafterConfig:
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"drafter directory '{path}' has no config.json")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"drafter config '{file}' is not valid JSON ({err})") from None
    try:
        return DrafterConfig.from_dict(raw)
    except KeyError as err:
        raise ValueError(f"drafter config '{file}' lacks the required key {err.args[0]!r}") from None
    except (TypeError, ValueError) as err:
        raise ValueError(f"drafter config '{file}' is invalid: {err}") from None


def read_weights(path: Path) -> dict[str, mx.array]:
    """All tensors of a safetensors checkpoint (single file or shards), keys as stored."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        hint = " (a PyTorch .bin checkpoint: convert it to safetensors first)" if any(path.glob("*.bin")) else ""
        raise FileNotFoundError(f"drafter directory '{path}' has no .safetensors weights{hint}")
    weights: dict[str, mx.array] = {}
    for file in files:
        try:
            weights.update(mx.load(str(file)))
        except Exception as err:
            raise ValueError(f"drafter weights '{file}' cannot be read ({err}); the file is corrupt or truncated") from None
    return weights


def to_treeflash_layout(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """DFlash checkpoints store the backbone without the ``model.`` prefix: add it."""
    return {k if k.startswith(("model.", "ar_approximation.")) else f"model.{k}": v for k, v in weights.items()}


def load_drafter(path_or_repo: str | Path, dtype: mx.Dtype | None = None) -> tuple[Drafter, Path]:
    """Build a drafter from a TreeFlash, DFlash or converted MLX checkpoint; returns it and its directory."""
    path = resolve(str(path_or_repo), DRAFTER_FILES, "drafter")
    config = read_config(path)
    weights = to_treeflash_layout(read_weights(path))
    drafter = Drafter(config)
    quant = json.loads((path / "config.json").read_text()).get("quantization")
    if quant:
        nn.quantize(
            drafter,
            group_size=quant["group_size"],
            bits=quant["bits"],
            class_predicate=lambda p, m: f"{p}.scales" in weights,
        )
    expected = dict(tree_flatten(drafter.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        raise ValueError(f"drafter checkpoint '{path}' is missing {len(missing)} tensor(s), e.g. '{missing[0]}'")
    if unexpected:
        raise ValueError(f"drafter checkpoint '{path}' has {len(unexpected)} unexpected tensor(s), e.g. '{unexpected[0]}'")
    for key, value in expected.items():
        if weights[key].shape != value.shape:
            raise ValueError(
                f"drafter tensor '{key}' has shape {tuple(weights[key].shape)}, "
                f"config.json implies {tuple(value.shape)}"
            )
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    drafter.load_weights(list(weights.items()))
    mx.eval(drafter.parameters())
    drafter.eval()
    return drafter, path


def validate(config: DrafterConfig, target: Target) -> None:
    """Refuse a drafter that was not made for this target, with the reason in one line."""
    n_layers = len(target.layers)
    problems = []
    if config.hidden_size != target.hidden_size:
        problems.append(f"hidden size {config.hidden_size} != target's {target.hidden_size}")
    if config.vocab_size != target.vocab_size:
        problems.append(f"vocabulary {config.vocab_size} != target's {target.vocab_size}")
    if config.num_target_layers != n_layers:
        problems.append(f"made for a {config.num_target_layers}-layer target, this one has {n_layers}")
    bad_ids = [i for i in config.target_layer_ids if not 0 <= i < n_layers]
    if bad_ids:
        problems.append(f"target_layer_ids {bad_ids} out of range for {n_layers} layers")
    if not 0 <= config.mask_token_id < target.vocab_size:
        problems.append(f"mask_token_id {config.mask_token_id} outside the vocabulary of {target.vocab_size}")
    if config.block_size < 2:
        problems.append(f"block_size {config.block_size} < 2")
    if problems:
        raise ValueError("drafter does not match the target: " + "; ".join(problems))
