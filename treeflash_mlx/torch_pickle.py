"""Read PyTorch ``.bin`` checkpoints without torch and without running code from the file.

A ``torch.save`` file is a zip of ``data.pkl`` (the object graph) and ``data/<key>`` (raw storages). A pickle
can name any Python callable, so an ordinary unpickler would run whatever the file asks. This one resolves
only the few names a state dict needs and refuses everything else with a clear error.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import mlx.core as mx
import numpy as np

STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16,  # raw bits; viewed as bfloat16 once in MLX
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafeCheckpointError(ValueError):
    pass


class _Storage(str):
    """The storage type named in the pickle (a marker, not a callable)."""


class _BF16(np.ndarray):
    """A uint16 array that holds bfloat16 bits."""


class _Budget:
    """The bytes a file may still turn into tensors: never more than it stores on disk. A tensor is a view of
    its storage, so an honest checkpoint's tensors (identical views, e.g. tied weights, counted once) fit in
    the file; a small file declaring huge or overlapping views (stride 0, ...) is refused before copying."""

    def __init__(self, total: int):
        self.left = total
        self.seen: set = set()

    def take(self, key, nbytes: int) -> None:
        if key in self.seen:
            return
        if nbytes > self.left:
            raise UnsafeCheckpointError(
                f"its tensors would need more bytes than the file stores ({nbytes} more, {self.left} left): "
                "tensors that repeat or overlap their storage are refused")
        self.left -= nbytes
        self.seen.add(key)


def _rebuild_tensor(storage, offset, size, stride, *_, budget: _Budget | None = None):
    if not isinstance(storage, np.ndarray):
        raise UnsafeCheckpointError("a tensor's storage is not a storage")
    try:
        offset, size, stride = int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride)
    except (TypeError, ValueError) as err:
        raise UnsafeCheckpointError("a tensor's layout is not made of integers") from err
    if offset < 0 or len(size) != len(stride) or any(s < 0 for s in size + stride):
        raise UnsafeCheckpointError(f"tensor layout offset={offset} size={size} stride={stride} is invalid")
    if all(size) and offset + sum((n - 1) * st for n, st in zip(size, stride)) >= len(storage):
        raise UnsafeCheckpointError(f"tensor of size {size} reaches past the end of its storage")
    elements = int(np.prod(size, dtype=object))  # exact: no overflow for absurd sizes
    if elements > len(storage):
        raise UnsafeCheckpointError(
            f"tensor of size {size} has {elements} elements but its storage holds only {len(storage)}")
    itemsize = storage.dtype.itemsize
    if budget is not None:
        budget.take((id(storage), offset, size, stride), elements * itemsize)
    out = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    ).copy()
    return out.view(_BF16) if isinstance(storage, _BF16) else out


def _rebuild_parameter(data, *_):
    return data


ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _Storage(name) for name in STORAGE_DTYPES},
}


def read_member(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """A member's bytes, refused before inflating when it declares more than ``limit`` (the file's own size:
    PyTorch stores members uncompressed, so only a crafted archive inflates beyond it). zipfile reads no
    more than the declared size and checks the CRC, so the declaration bounds the memory."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise ValueError(f"the archive has no member '{name}'") from None
    if info.file_size > limit:
        raise UnsafeCheckpointError(
            f"member '{name}' inflates to {info.file_size} bytes, more than the {limit} bytes of the whole file")
    return archive.read(info)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, limit: int):
        super().__init__(file)
        self.archive, self.prefix, self.limit = archive, prefix, limit
        self.storages: dict[str, np.ndarray] = {}
        self.budget = _Budget(limit)

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED:
            raise UnsafeCheckpointError(f"refusing to load '{module}.{name}': not part of a plain PyTorch state dict")
        found = ALLOWED[(module, name)]
        if found is _rebuild_tensor:
            return lambda *args: _rebuild_tensor(*args, budget=self.budget)
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and isinstance(pid[1], _Storage)):
            raise UnsafeCheckpointError(f"unexpected persistent id {pid!r}")
        kind, key = str(pid[1]), str(pid[2])
        if key not in self.storages:  # storages shared by several tensors are read once
            raw = read_member(self.archive, f"{self.prefix}data/{key}", self.limit)
            array = np.frombuffer(raw, dtype=STORAGE_DTYPES[kind])
            self.storages[key] = array.view(_BF16) if kind == "BFloat16Storage" else array
        return self.storages[key]


def load_bin(path: Path) -> dict[str, mx.array]:
    """The tensors of a ``torch.save``d state dict, as MLX arrays (bfloat16 preserved)."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"'{path}' is not a PyTorch zip checkpoint (legacy or corrupt); re-save it with torch>=1.6")
    try:
        return _load_zip(path)
    except zipfile.BadZipFile as err:
        raise ValueError(f"'{path}' is a damaged zip archive ({err})") from err


def _load_zip(path: Path) -> dict[str, mx.array]:
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pkl) != 1:
            raise ValueError(f"'{path}' has no data.pkl: not a PyTorch checkpoint")
        prefix = pkl[0][: -len("data.pkl")]
        limit = path.stat().st_size
        try:
            state = _Unpickler(io.BytesIO(read_member(archive, pkl[0], limit)), archive, prefix, limit).load()
        except UnsafeCheckpointError as err:
            raise UnsafeCheckpointError(f"'{path}': {err}") from err
        except Exception as err:  # any damage to the file: one clear line, never a traceback
            raise ValueError(f"'{path}' cannot be read ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict):
        raise ValueError(f"'{path}' does not hold a state dict")
    out = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise ValueError(f"'{path}': entry {key!r} is not a named tensor")
        out[key] = mx.array(value.view(np.uint16)).view(mx.bfloat16) if isinstance(value, _BF16) else mx.array(value)
    return out
