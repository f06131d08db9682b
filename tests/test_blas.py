"""On Linux the library puts a fast BLAS under MLX when one is installed, can be told not to, and says so once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from treeflash_mlx import _blas

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MLX uses Accelerate off Linux")
OPENBLAS = next((p for p in _blas.OPENBLAS if os.path.exists(p)), None)
MKL = next((p for p in _blas.mkl_candidates() if os.path.exists(p)), None)
PROBE = "import treeflash_mlx, mlx.core as mx; from treeflash_mlx import _blas; print(_blas.active_blas)"


def probe(**env):
    full = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", _blas.ENV_VAR)}
    full.update(env)
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=full, timeout=120)


@pytest.mark.skipif(MKL is None, reason="the mkl wheel is not installed (a dependency on Linux x86_64)")
def test_the_mkl_wheel_is_loaded_before_mlx_by_default():
    proc = probe()
    assert proc.stdout.strip() == MKL and proc.stderr == ""
    assert "libmkl_rt" in open("/proc/self/maps").read(), "the test process itself runs on MKL"


@pytest.mark.skipif(OPENBLAS is None, reason="no OpenBLAS installed (apt-get install libopenblas0-pthread)")
def test_the_system_openblas_serves_when_asked_or_without_mkl():
    proc = probe(**{_blas.ENV_VAR: "openblas"})
    assert proc.stdout.strip() == OPENBLAS and proc.stderr == ""
    if MKL is None:
        assert probe().stdout.strip() == OPENBLAS


def test_auto_tries_the_mkl_wheel_first_then_the_system_openblas():
    auto = _blas.candidates("auto")
    assert auto == _blas.mkl_candidates() + list(_blas.OPENBLAS)
    assert all(p.startswith((sys.prefix, sys.base_prefix)) or ".local" in p for p in _blas.mkl_candidates())
    assert _blas.candidates("OpenBLAS") == list(_blas.OPENBLAS) and _blas.candidates("mkl") == _blas.mkl_candidates()
    assert _blas.candidates("/opt/blis/libblis.so") == ["/opt/blis/libblis.so"]


def test_can_be_told_not_to():
    proc = probe(**{_blas.ENV_VAR: "off"})
    assert proc.stdout.strip() == "None" and proc.stderr == ""


def test_says_once_when_the_library_is_missing():
    proc = probe(**{_blas.ENV_VAR: "/nonexistent/libopenblas.so.0"})
    assert proc.stdout.strip() == "None"
    assert proc.stderr.count("[treeflash-mlx]") == 1 and "does not exist" in proc.stderr
