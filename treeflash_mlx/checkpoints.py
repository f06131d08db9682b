"""Drafter checkpoints: finding them (local or Hugging Face), reading the published layouts, validation.

Layouts read directly (docs/checkpoints.md), safetensors or PyTorch .bin, single or sharded:
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
from .torch_pickle import load_bin

MODEL_FILES = ["*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]


def first_line(err: BaseException) -> str:
    """An exception as one line: libraries' multi-line messages must not reach the user as a wall of text."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
        raise FileNotFoundError(
            f"{what} '{path_or_repo}' is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(err).__name__}: {first_line(err)})"
        ) from err


def resolve_drafter(path_or_repo: str) -> Path:
    """Like ``resolve``; from the hub only the safetensors are fetched, or the .bin files when there are none."""
    path = resolve(path_or_repo, ["*.json", "*.safetensors"], "drafter")
    if not any(path.glob("*.safetensors")) and not Path(path_or_repo).expanduser().is_dir():
        path = resolve(path_or_repo, ["*.json", "*.bin"], "drafter")
    return path


def read_config(path: Path) -> tuple[DrafterConfig, dict]:
    """The parsed config and the raw JSON (which may carry extra keys such as ``quantization``)."""
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"drafter directory '{path}' has no config.json")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"drafter config '{file}' is not valid JSON ({err})") from err
    try:
        config = DrafterConfig.from_dict(raw)
    except KeyError as err:
        raise ValueError(f"drafter config '{file}' lacks the required key {err.args[0]!r}") from err
    except (TypeError, ValueError, ArithmeticError, AttributeError) as err:
        raise ValueError(f"drafter config '{file}' is invalid: {err}") from err
    quant = raw.get("quantization")
    if quant is not None and not (
        isinstance(quant, dict) and quant.get("bits") in (2, 3, 4, 5, 6, 8) and quant.get("group_size") in (32, 64, 128)
    ):
        raise ValueError(f"drafter config '{file}' has an invalid quantization entry {quant!r}")
    return config, raw


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files: safetensors preferred, else PyTorch .bin; shards as the index lists them."""
    for index, pattern in (("model.safetensors.index.json", "*.safetensors"), ("pytorch_model.bin.index.json", "*.bin")):
        if (path / index).is_file():
            try:
                names = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as err:
                raise ValueError(f"shard index '{path / index}' is not a valid weight_map index") from err
            outside = [n for n in names if (path / n).resolve().parent != path.resolve()]
            if outside:
                raise ValueError(f"shard index '{path / index}' names a file outside the checkpoint: '{outside[0]}'")
            missing = [n for n in names if not (path / n).is_file()]
            if missing:
                raise FileNotFoundError(f"shard '{missing[0]}' listed in '{path / index}' is missing")
            return [path / n for n in names]
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"drafter directory '{path}' has no weights (*.safetensors or pytorch_model*.bin)")


def read_shard(file: Path) -> dict[str, mx.array]:
    """One weight file, keys as stored. A .bin is read without running code from it."""
    if file.suffix == ".bin":
        return load_bin(file)
    try:
        return mx.load(str(file))
    except Exception as err:
        raise ValueError(f"drafter weights '{file}' cannot be read ({err}); the file is corrupt or truncated") from err


def to_treeflash_layout(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """DFlash checkpoints store the backbone without the ``model.`` prefix: add it."""
    ours = ("model.", "ar_approximation.", "sub_vocab")
    return {k if k.startswith(ours) else f"model.{k}": v for k, v in weights.items()}


def parameter_shapes(drafter: Drafter) -> dict[str, tuple[int, ...]]:
    """The shapes a checkpoint must hold for this drafter (MLX builds modules lazily: nothing is allocated)."""
    return {k: tuple(v.shape) for k, v in tree_flatten(drafter.parameters())}


def cast_floating(weights: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    """Floating tensors cast to ``dtype``; integer ones (quantized weights) left as they are."""
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}


def check_tensors(weights: dict[str, mx.array], expected: dict[str, tuple[int, ...]], where: Path) -> None:
    """Refuse unexpected or mis-shaped tensors (missing ones are checked once all shards are read)."""
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise ValueError(f"drafter checkpoint '{where}' has {len(unexpected)} unexpected tensor(s), e.g. '{unexpected[0]}'")
    for key, value in weights.items():
        if tuple(value.shape) != expected[key]:
            raise ValueError(f"drafter tensor '{key}' has shape {tuple(value.shape)}, config.json implies {expected[key]}")
    check_values(weights, where)


def check_values(weights: dict[str, mx.array], where: Path) -> None:
    """Refuse weights that would load but compute nonsense: a non-floating tensor (other than the packed
    weights of a quantized layer, which come with their scales) or any NaN or infinity. A sub-vocabulary
    holds token ids, not weights: ``check_sub_vocab`` checks it."""
    for key, value in weights.items():
        if key == "sub_vocab":
            continue
        if not mx.issubdtype(value.dtype, mx.floating):
            quantized = key.endswith(".weight") and f"{key.removesuffix('.weight')}.scales" in weights
            if not (quantized and value.dtype == mx.uint32):
                raise ValueError(f"drafter tensor '{key}' in '{where}' holds {str(value.dtype).removeprefix('mlx.core.')} values, not floating "
                                 "point ones; the checkpoint is damaged or mislabelled")
        elif not mx.all(mx.isfinite(value)).item():
            raise ValueError(f"drafter tensor '{key}' in '{where}' holds NaN or infinite values; "
                             "the checkpoint is damaged (or its training diverged)")


def check_complete(seen: set[str], expected: dict[str, tuple[int, ...]], where: Path) -> None:
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"drafter checkpoint '{where}' is missing {len(missing)} tensor(s), e.g. '{missing[0]}'")


def load_drafter(path_or_repo: str | Path, dtype: mx.Dtype | None = None) -> tuple[Drafter, Path]:
    """Build a drafter from a TreeFlash, DFlash or converted MLX checkpoint; returns it and its directory."""
    path = resolve_drafter(str(path_or_repo))
    config, raw = read_config(path)
    weights: dict[str, mx.array] = {}
    for file in weight_files(path):
        weights.update(to_treeflash_layout(read_shard(file)))
    drafter = Drafter(config)
    quant = raw.get("quantization")
    if quant:
        nn.quantize(drafter, group_size=quant["group_size"], bits=quant["bits"],
                    class_predicate=lambda p, m: f"{p}.scales" in weights)
    expected = parameter_shapes(drafter)
    check_tensors(weights, expected, path)
    check_complete(set(weights), expected, path)
    if dtype is not None:
        weights = cast_floating(weights, dtype)
    drafter.load_weights(list(weights.items()))
    mx.eval(drafter.parameters())
    drafter.eval()
    if "sub_vocab" in drafter:
        check_sub_vocab(drafter.sub_vocab, config.vocab_size, path)
    return drafter, path


def check_sub_vocab(ids: mx.array, vocab_size: int, where: Path) -> None:
    """A sub-vocabulary must name distinct target token ids (docs/checkpoints.md)."""
    if not mx.issubdtype(ids.dtype, mx.integer):
        raise ValueError(f"drafter checkpoint '{where}': sub_vocab must hold integer token ids, not {ids.dtype}")
    values = ids.tolist()
    if min(values) < 0 or max(values) >= vocab_size:
        raise ValueError(f"drafter checkpoint '{where}': sub_vocab holds ids outside [0, {vocab_size})")
    if len(set(values)) != len(values):
        raise ValueError(f"drafter checkpoint '{where}': sub_vocab repeats token ids")


def save_weights(file: Path, weights: dict[str, mx.array], metadata: dict[str, str]) -> None:
    """``mx.save_safetensors`` with its write failures (full disk, quota, read-only) as a one-line OSError."""
    try:
        mx.save_safetensors(str(file), weights, metadata=metadata)
    except RuntimeError as err:
        raise OSError(f"cannot write '{file}' ({first_line(err)}); is the disk full or not writable?") from err


def save_drafter(drafter: Drafter, path: Path, dtype: mx.Dtype | None = None) -> Path:
    """Write a drafter in our MLX format: the published TreeFlash layout in safetensors, plus config.json.
    ``dtype`` casts the floating weights (the sub-vocabulary stays integer)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(drafter.parameters()))
    if dtype is not None:
        weights = cast_floating(weights, dtype)
    save_weights(path / "model.safetensors", weights, {"format": "mlx"})
    (path / "config.json").write_text(json.dumps(drafter.args.to_dict(), indent=2))
    return path


def validate(config: DrafterConfig, target: Target) -> None:
    """Refuse a drafter that was not made for this target, with the reason in one line."""
    n_layers = target.num_layers
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
