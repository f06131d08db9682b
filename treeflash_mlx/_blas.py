"""Make MLX's Linux CPU backend use a fast BLAS (docs/algorithm.md, "Linux CPU").

The Linux `mlx[cpu]` wheel links the reference BLAS (~3 GFLOP/s): a 16-token tree verification then costs
as much as 16 single steps and speculative decoding can only lose. Loading OpenBLAS with RTLD_GLOBAL
*before* `mlx.core` is imported makes MLX's `cblas_*` calls resolve to it instead.

This module must run before the first `import mlx.core`, so `treeflash_mlx/__init__.py` imports it first.
Control it with the environment variable ``TREEFLASH_MLX_BLAS``:
``auto`` (default: try the usual OpenBLAS locations), ``off`` (leave MLX alone), or a path to a BLAS library.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV_VAR = "TREEFLASH_MLX_BLAS"
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

#: The library that serves MLX's BLAS calls, or None when MLX uses its bundled reference BLAS.
active_blas: str | None = None


def _already_loaded() -> str | None:
    """A fast BLAS already mapped into this process (e.g. through LD_PRELOAD)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                if "libopenblas" in line or "libmkl_rt" in line or "libblis" in line:
                    return line.split()[-1]
    except OSError:
        pass
    return None


def _say(message: str) -> None:
    print(f"[treeflash-mlx] {message}", file=sys.stderr)


def setup() -> str | None:
    """Load a fast BLAS for MLX on Linux; return its path, or None. Says once why when it cannot."""
    global active_blas
    if not sys.platform.startswith("linux"):
        return None
    choice = os.environ.get(ENV_VAR, "auto").strip()
    if choice.lower() in ("off", "0", "no", "none", "false"):
        return None
    active_blas = _already_loaded()
    if active_blas:
        return active_blas
    if "mlx.core" in sys.modules:
        _say(
            "mlx was imported before treeflash_mlx, so MLX keeps its slow reference BLAS; "
            f"import treeflash_mlx first or set LD_PRELOAD to an OpenBLAS ({ENV_VAR}=off silences this)."
        )
        return None
    paths = (choice,) if choice.lower() != "auto" else CANDIDATES
    for path in paths:
        if not os.path.exists(path):
            continue
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as err:
            _say(f"could not load BLAS {path}: {err}")
            continue
        active_blas = path
        return path
    if choice.lower() != "auto":
        _say(f"{ENV_VAR}={choice} does not exist; MLX keeps its slow reference BLAS.")
    else:
        _say(
            "no fast BLAS found: MLX's CPU backend runs ~25x slower and speculative decoding cannot pay. "
            f"Install one (Debian/Ubuntu: apt-get install libopenblas0-pthread); {ENV_VAR}=off silences this."
        )
    return None
