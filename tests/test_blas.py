"""On Linux the library puts a fast BLAS under MLX when one is installed, can be told not to, and says so once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from treeflash_mlx import _blas

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MLX uses Accelerate off Linux")
OPENBLAS = next((p for p in _blas.CANDIDATES if os.path.exists(p)), None)
PROBE = "import treeflash_mlx, mlx.core as mx; from treeflash_mlx import _blas; print(_blas.active_blas)"


def probe(**env):
    full = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", _blas.ENV_VAR)}
    full.update(env)
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=full, timeout=120)


@pytest.mark.skipif(OPENBLAS is None, reason="no OpenBLAS installed (apt-get install libopenblas0-pthread)")
def test_openblas_is_loaded_before_mlx():
    proc = probe()
    assert proc.stdout.strip() == OPENBLAS and proc.stderr == ""
    assert "libopenblas" in open("/proc/self/maps").read(), "the test process itself runs on OpenBLAS"


def test_can_be_told_not_to():
    proc = probe(**{_blas.ENV_VAR: "off"})
    assert proc.stdout.strip() == "None" and proc.stderr == ""


def test_says_once_when_the_library_is_missing():
    proc = probe(**{_blas.ENV_VAR: "/nonexistent/libopenblas.so.0"})
    assert proc.stdout.strip() == "None"
    assert proc.stderr.count("[treeflash-mlx]") == 1 and "does not exist" in proc.stderr


WHEEL = _blas.wheel_library()
MATMUL = ("import treeflash_mlx, mlx.core as mx, numpy as np; from treeflash_mlx import _blas; "
          "a = np.random.default_rng(0).normal(size=(64, 48)).astype(np.float32); b = a.T.copy(); "
          "print(_blas.active_blas); print(float(np.abs(np.array(mx.array(a) @ mx.array(b)) - a @ b).max())); "
          "print(any('libscipy_openblas' in line for line in open('/proc/self/maps')))")


@pytest.mark.skipif(WHEEL is None, reason="the OpenBLAS wheel (scipy-openblas32, a Linux dependency) is missing")
def test_the_openblas_wheel_serves_through_a_compiled_shim(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", _blas.ENV_VAR)}
    env.update({_blas.ENV_VAR: "wheel", "XDG_CACHE_HOME": str(tmp_path)})
    for _ in range(2):  # built once, then taken from the cache
        proc = subprocess.run([sys.executable, "-c", MATMUL], capture_output=True, text=True, env=env, timeout=120)
        path, error, mapped = proc.stdout.split()
        assert path.startswith(str(tmp_path / "treeflash-mlx" / "treeflash-cblas-")) and proc.stderr == ""
        assert float(error) < 1e-3 and mapped == "True"
    assert len(list((tmp_path / "treeflash-mlx").glob("*.so"))) == 1


@pytest.mark.skipif(WHEEL is None, reason="the OpenBLAS wheel (scipy-openblas32, a Linux dependency) is missing")
def test_without_a_compiler_the_wheel_is_passed_over_with_one_line(tmp_path):
    proc = probe(**{_blas.ENV_VAR: "wheel", "XDG_CACHE_HOME": str(tmp_path), "CC": str(tmp_path / "no-cc")})
    assert proc.stdout.strip() == "None"
    assert "cannot use the OpenBLAS wheel" in proc.stderr and "no fast BLAS found" in proc.stderr
    assert proc.stderr.count("\n") == 2, "one line for the cause, one for the consequence"


def test_auto_tries_the_system_openblas_before_the_wheel():
    assert _blas.candidates("auto") == [*_blas.CANDIDATES, "wheel"]
    assert _blas.candidates("system") == list(_blas.CANDIDATES) and _blas.candidates("WHEEL") == ["wheel"]
    assert _blas.candidates("/opt/blis/libblis.so") == ["/opt/blis/libblis.so"]
