"""Convert trained PyTorch TreeFlash/DFlash drafters to MLX, and MLX drafters back to the published layout.

    python -m treeflash_mlx.convert --hf-path peerrh/treeflash-qwen3-4b --mlx-path treeflash-4b-mlx [-q]
    python -m treeflash_mlx.convert --export --mlx-path my-drafter --hf-path my-drafter-hf [--layout dflash]

Input shards are converted one at a time (peak memory near the largest shard) and written to a temporary
sibling directory that is renamed into place only when everything succeeded: a failure leaves nothing behind.
Quantization (``-q``) covers the decoder layers and the AR head; the norms and the feature fusion ``fc``,
which every context token goes through, stay exact.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ._cli import run_cli
from .checkpoints import (
    cast_floating,
    check_complete,
    check_tensors,
    load_drafter,
    parameter_shapes,
    read_config,
    read_shard,
    resolve_drafter,
    save_weights,
    to_treeflash_layout,
    validate,
    weight_files,
)
from .drafter import Drafter
from .loading import load
from .target import Target

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
KNOWN_ARCHITECTURES = {"DFlashDraftModel", "TreeFlashDraftModel"}
EXPORT_LAYOUTS = ("treeflash", "dflash")
QUANTIZABLE = ("_proj.weight", "ar_approximation.ug.weight", "ar_approximation.d.weight")


def quantizable(key: str) -> bool:
    return key.endswith(QUANTIZABLE)


def quantize_shard(weights: dict[str, mx.array], bits: int, group_size: int) -> dict[str, mx.array]:
    out = {}
    for key, value in weights.items():
        if not quantizable(key):
            out[key] = value
            continue
        if value.shape[-1] % group_size:
            raise ValueError(f"cannot quantize '{key}': its input size {value.shape[-1]} is not a multiple of "
                             f"--q-group-size {group_size}")
        base = key.removesuffix(".weight")
        out[f"{base}.weight"], out[f"{base}.scales"], out[f"{base}.biases"] = mx.quantize(value, group_size, bits)
    return out


OUTPUT_FILES = {"config.json", "README.md", "model.safetensors.index.json"}  # plus model*.safetensors
STAGING_MARK = ".treeflash-staging"  # inside every staging directory: only those are ever cleaned up


def _is_previous_output(path: Path) -> bool:
    """A directory that holds what convert or export writes, and nothing else."""
    names = {p.name for p in path.iterdir()}
    weights = {n for n in names if n.startswith("model") and n.endswith(".safetensors")}
    return "config.json" in names and bool(weights) and names <= OUTPUT_FILES | weights


def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process, or not a pid we can judge: leave it alone
    return True


def remove_stale_staging(dst: Path) -> list[Path]:
    """Delete staging directories of ``dst`` that a killed conversion left (``.NAME.tmp-PID`` holding our
    mark, whose process is gone); returns them."""
    removed = []
    prefix = f".{dst.name}.tmp-"
    if not dst.parent.is_dir():
        return removed
    for entry in dst.parent.iterdir():
        pid = entry.name[len(prefix):]
        if not (entry.name.startswith(prefix) and pid.isdigit() and entry.is_dir() and not entry.is_symlink()):
            continue
        if (entry / STAGING_MARK).is_file() and not _pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


class StagedOutput:
    """Write into a hidden sibling of ``dst``; move it into place on success, delete it on any failure
    (SIGTERM included; what a SIGKILL leaves is removed by the next run for the same destination).

    ``dst`` must not be, or contain, the working directory or the source; an existing ``dst`` is replaced
    only with ``force`` and only when it holds a previous conversion (never an arbitrary directory)."""

    def __init__(self, dst: Path, force: bool, sources: tuple[Path, ...] = ()):
        self.dst = Path(os.path.abspath(dst))  # absolute, symlinks kept: a link is replaced, not its target
        real = self.dst.resolve()
        for what, path in (("the working directory", Path.cwd()), *(("the source", p) for p in sources)):
            if _inside(path.resolve(), real):
                raise ValueError(f"output directory '{dst}' is or contains {what} ('{path}'); "
                                 "choose a new directory for the output")
        if self.dst.exists() or self.dst.is_symlink():
            if not force:
                raise FileExistsError(f"output directory '{dst}' already exists; pass --force to replace it")
            if self.dst.is_symlink() or not self.dst.is_dir():
                raise ValueError(f"output path '{dst}' exists and is not a directory; remove it or choose another")
            if any(self.dst.iterdir()) and not _is_previous_output(self.dst):
                raise ValueError(f"output directory '{dst}' holds files that are not a previous conversion; "
                                 "--force replaces only a converted drafter: choose a new directory")
        self.tmp = self.dst.parent / f".{self.dst.name}.tmp-{os.getpid()}"
        self._previous_term = None

    def _on_term(self, signum, frame):
        raise SystemExit(128 + signum)  # unwinds through __exit__, which removes the staging directory

    def __enter__(self) -> Path:
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(self.dst)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        (self.tmp / STAGING_MARK).touch()
        if threading.current_thread() is threading.main_thread():
            self._previous_term = signal.signal(signal.SIGTERM, self._on_term)
        return self.tmp

    def __exit__(self, kind, *_):
        try:
            if kind is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return False
            # The previous output is moved aside, not deleted, until the new one is in place.
            aside = self.dst.parent / f".{self.dst.name}.old-{os.getpid()}"
            moved = False
            try:
                (self.tmp / STAGING_MARK).unlink()
                if self.dst.exists() or self.dst.is_symlink():
                    self.dst.rename(aside)
                    moved = True
                self.tmp.rename(self.dst)
            except BaseException:
                if moved and not self.dst.exists():
                    aside.rename(self.dst)
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
            if moved:
                if aside.is_dir() and not aside.is_symlink():
                    shutil.rmtree(aside, ignore_errors=True)
                else:
                    aside.unlink()
            return False
        finally:
            if self._previous_term is not None:
                signal.signal(signal.SIGTERM, self._previous_term)


def _progress(items: list, what: str):
    if len(items) < 2:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=what, unit="shard", file=sys.stderr)


def _model_card(source: str, notes: list[str]) -> str:
    lines = "\n".join(f"- {n}" for n in notes)
    return (f"# Drafter converted with treeflash-mlx\n\nSource: `{source}`\n\n{lines}\n\n"
            f"Use: `python -m treeflash_mlx.generate --model <its target> --drafter <this directory> --prompt ...`\n")


def convert(
    hf_path: str,
    mlx_path: str | Path,
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    target: str | None = None,
    force: bool = False,
) -> Path:
    """Convert a published PyTorch drafter (local directory or hub repo) into an MLX drafter directory."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantize and q_bits not in (4, 8):
        raise ValueError(f"--q-bits must be 4 or 8, got {q_bits}")
    if quantize and q_group_size not in (32, 64, 128):
        raise ValueError(f"--q-group-size must be 32, 64 or 128, got {q_group_size}")
    dst = Path(mlx_path)
    src = resolve_drafter(hf_path)
    staging = StagedOutput(dst, force, sources=(src,))
    config, raw = read_config(src)
    architectures = raw.get("architectures") or []
    if architectures and not KNOWN_ARCHITECTURES & set(architectures):
        raise ValueError(f"unknown drafter architecture {architectures}; expected one of {sorted(KNOWN_ARCHITECTURES)}")
    if target is not None:
        validate(config, Target(load(target)[0]))
    expected = parameter_shapes(Drafter(config))
    files = weight_files(src)
    seen: set[str] = set()
    index: dict[str, str] = {}
    with staging as out:
        for i, file in enumerate(_progress(files, "converting")):
            weights = to_treeflash_layout(read_shard(file))
            check_tensors(weights, expected, file)
            seen |= set(weights)
            if dtype is not None:
                weights = cast_floating(weights, DTYPES[dtype])
            if quantize:
                weights = quantize_shard(weights, q_bits, q_group_size)
            name = "model.safetensors" if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            save_weights(out / name, weights, {"format": "mlx"})
            index.update({k: name for k in weights})
            del weights
        check_complete(seen, expected, src)
        out_config = config.to_dict()
        notes = [f"layout: {'TreeFlash (with AR head)' if config.ar_approximation else 'DFlash (no head)'}",
                 f"dtype: {dtype or 'as stored'}"]
        if quantize:
            out_config["quantization"] = {"group_size": q_group_size, "bits": q_bits}
            notes.append(f"quantized: {q_bits}-bit, group size {q_group_size} (norms and fc kept exact)")
        (out / "config.json").write_text(json.dumps(out_config, indent=2))
        if len(files) > 1:
            (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}, indent=2))
        (out / "README.md").write_text(_model_card(hf_path, notes))
    return dst


def export(mlx_path: str | Path, hf_path: str | Path, dtype: str | None = None, force: bool = False,
           layout: str = "treeflash", drop_sub_vocab: bool = False) -> Path:
    """Write an MLX drafter (quantized ones are dequantized) in the published PyTorch/Hugging Face layout:
    ``treeflash`` (ours, every tensor kept) or ``dflash`` (the backbone alone, as DFlash checkpoints and
    dflash-mlx read it: no head, no sub-vocabulary). A drafter with a sub-vocabulary goes to the DFlash layout
    only with ``drop_sub_vocab``: the backbone is kept as it is and then scores the whole vocabulary."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if layout not in EXPORT_LAYOUTS:
        raise ValueError(f"--layout must be one of {', '.join(EXPORT_LAYOUTS)}, got {layout!r}")
    from mlx_lm.utils import dequantize_model

    dst = Path(hf_path)
    src = resolve_drafter(str(mlx_path))
    staging = StagedOutput(dst, force, sources=(src,))
    drafter, src = load_drafter(src)
    drafter = dequantize_model(drafter)
    weights = dict(tree_flatten(drafter.parameters()))
    if dtype is not None:
        weights = cast_floating(weights, DTYPES[dtype])
    config = drafter.args.to_dict()
    notes = ["exported to the published PyTorch layout", f"dtype: {dtype or 'as stored'}"]
    if layout == "dflash":
        if drop_sub_vocab and "sub_vocab" in weights:
            weights.pop("sub_vocab")  # its size lives in treeflash_config, which the DFlash layout drops
            notes.append("sub-vocabulary dropped: the backbone scores the whole vocabulary")
        weights, config = dflash_layout(weights, config, src)
        notes[0] = "exported to the DFlash layout (backbone only" + (", AR head dropped)" if drafter.has_head else ")")
    elif not drafter.has_head:  # the published DFlash layout has no "model." prefix
        weights = {k.removeprefix("model."): v for k, v in weights.items()}
    with staging as out:
        save_weights(out / "model.safetensors", weights, {"format": "pt"})
        (out / "config.json").write_text(json.dumps(config, indent=2))
        (out / "README.md").write_text(_model_card(str(src), notes))
    return dst


def dflash_layout(weights: dict[str, mx.array], config: dict, src: Path) -> tuple[dict[str, mx.array], dict]:
    """The backbone's tensors without the ``model.`` prefix and a ``DFlashDraftModel`` config; refuses a
    sub-vocabulary, which DFlash drafters do not have (dropping it would change what the drafter proposes)."""
    if "sub_vocab" in weights:
        raise ValueError(f"drafter '{src}' drafts over a sub-vocabulary of {weights['sub_vocab'].size} tokens, "
                         "which the DFlash layout cannot hold; export it in the TreeFlash layout, or pass "
                         "--drop-sub-vocab to score the whole vocabulary with its backbone")
    weights = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    config = {k: v for k, v in config.items() if k != "treeflash_config"}
    config["architectures"] = ["DFlashDraftModel"]
    config["tie_word_embeddings"] = False  # no embedding or head of its own; dflash-mlx requires the key
    return weights, config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m treeflash_mlx.convert", description=__doc__.splitlines()[0])
    p.add_argument("--hf-path", required=True, help="PyTorch drafter: local directory or hub repo (output with --export)")
    p.add_argument("--mlx-path", required=True, help="MLX drafter directory to write (input with --export)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="cast floating tensors (default: as stored)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize decoder layers and the AR head")
    p.add_argument("--q-bits", type=int, default=4)
    p.add_argument("--q-group-size", type=int, default=64)
    p.add_argument("--target", default=None, help="an mlx-lm target to check the drafter against")
    p.add_argument("--force", action="store_true", help="replace the output directory if it exists")
    p.add_argument("--export", action="store_true", help="MLX drafter at --mlx-path -> published layout at --hf-path")
    p.add_argument("--layout", choices=EXPORT_LAYOUTS, default=None,
                   help="with --export: treeflash (default; every tensor) or dflash (the backbone alone, as DFlash "
                        "checkpoints and dflash-mlx read it)")
    p.add_argument("--drop-sub-vocab", action="store_true",
                   help="with --layout dflash: drop a drafter's sub-vocabulary (its backbone then scores the whole "
                        "vocabulary, which the DFlash layout implies)")
    return p


def run(args: argparse.Namespace) -> None:
    if args.export:
        if args.quantize:
            raise ValueError("--export writes the published (unquantized) layout; drop -q")
        if args.drop_sub_vocab and args.layout != "dflash":
            raise ValueError("--drop-sub-vocab goes with --layout dflash (the TreeFlash layout keeps the sub-vocabulary)")
        out = export(args.mlx_path, args.hf_path, args.dtype, args.force, args.layout or "treeflash",
                     args.drop_sub_vocab)
    else:
        if args.layout is not None:
            raise ValueError("--layout chooses what --export writes; conversion reads either layout as it is")
        out = convert(args.hf_path, args.mlx_path, args.dtype, args.quantize, args.q_bits, args.q_group_size,
                      args.target, args.force)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
