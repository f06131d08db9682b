"""The PyTorch .bin reader's limits: no tensor may hold more bytes than the file stores, and no archive member
is inflated beyond the file's size. The files are written here without torch, as ``torch.save`` lays them out."""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from treeflash_mlx.torch_pickle import load_bin


class _Global:
    """A name the pickle refers to (written as a GLOBAL opcode, never imported here)."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle wants reduce callables to be callable
        raise AssertionError

class _StorageRef:
    def __init__(self, key, numel):
        self.key, self.numel = key, numel

class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, OrderedDict())

    def __reduce__(self):
        return _Global("torch._utils", "_rebuild_tensor_v2"), self.args

class _TorchLikePickler(pickle._Pickler):
    """Writes what ``torch.save`` writes for a state dict, without torch."""

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return "storage", _Global("torch", "FloatStorage"), obj.key, "cpu", obj.numel
        return None

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        super().save(obj, save_persistent_id)

def write_bin(path: Path, tensors: dict, storages: dict, compress: bool = False) -> Path:
    buf = io.BytesIO()
    _TorchLikePickler(buf, protocol=2).dump(OrderedDict(tensors))
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=mode) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
    return path

def test_bin_reader_reads_honest_views_and_shared_storages(tmp_path):
    data = np.arange(12, dtype=np.float32)
    s = _StorageRef("0", 12)
    path = write_bin(tmp_path / "ok.bin", {"a": _Tensor(s, 0, (3, 2), (2, 1)), "b": _Tensor(s, 6, (2, 3), (1, 2)),
                                           "tied": _Tensor(s, 0, (3, 2), (2, 1))}, {"0": data.tobytes()})
    out = load_bin(path)
    np.testing.assert_array_equal(np.array(out["a"]), data[:6].reshape(3, 2))
    np.testing.assert_array_equal(np.array(out["b"]), data[6:].reshape(3, 2).T)
    np.testing.assert_array_equal(np.array(out["tied"]), np.array(out["a"]))

@pytest.mark.parametrize("case", ["stride 0", "overlapping views", "reshaped copies"])
def test_bin_tensors_larger_than_what_the_file_stores_are_refused(tmp_path, case):
    s = _StorageRef("0", 4096)
    tensors = {
        "stride 0": {"w": _Tensor(s, 0, (32768, 32768), (0, 0))},
        "overlapping views": {f"w{i}": _Tensor(s, i, (4088,), (1,)) for i in range(8)},
        "reshaped copies": {"a": _Tensor(s, 0, (4096,), (1,)), "b": _Tensor(s, 0, (64, 64), (64, 1)),
                            "c": _Tensor(s, 0, (64, 64), (1, 64)), "d": _Tensor(s, 0, (4096, 1), (1, 1)),
                            "e": _Tensor(s, 0, (2, 2048), (2048, 1)), "f": _Tensor(s, 0, (1, 4096), (4096, 1))},
    }[case]
    path = write_bin(tmp_path / "bad.bin", tensors, {"0": np.zeros(4096, np.float32).tobytes()})
    with pytest.raises(ValueError, match="storage holds only|more bytes than the file stores"):
        load_bin(path)

def test_bin_members_that_inflate_beyond_the_file_are_refused_before_inflating(tmp_path, monkeypatch):
    s = _StorageRef("0", 1 << 22)  # 16 MiB of zeros deflate to a few KiB
    path = write_bin(tmp_path / "bomb.bin", {"w": _Tensor(s, 0, (1 << 22,), (1,))},
                     {"0": bytes(4 << 22)}, compress=True)
    assert path.stat().st_size < 1 << 20
    inflated = []
    real_read = zipfile.ZipFile.read
    monkeypatch.setattr(zipfile.ZipFile, "read", lambda self, name, pwd=None: inflated.append(name) or real_read(self, name, pwd))
    with pytest.raises(ValueError, match="inflates to 16777216 bytes, more than"):
        load_bin(path)
    assert not any("data/0" in str(getattr(n, "filename", n)) for n in inflated)
