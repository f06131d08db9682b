"""Make MLX's Linux CPU backend use a fast BLAS (SPEC §8).

The Linux `mlx[cpu]` wheel links the reference BLAS (~3 GFLOP/s): a 16-token tree verification then costs
as much as 16 single steps and speculative decoding can only lose. Loading a fast BLAS with RTLD_GLOBAL
*before* `mlx.core` is imported makes MLX's `cblas_*` calls resolve to it instead.

Where from: on Linux x86_64 the package depends on Intel's `mkl` wheel from the package index, so a plain
`pip install` brings one (its `libmkl_rt` lands in the environment's `lib/`); elsewhere, or without it, the
system OpenBLAS (`apt-get install libopenblas0-pthread`) serves. README "Linux CPU: fast BLAS" has the
measurements behind the order.

This module must run before the first `import mlx.core`, so `treeflash_mlx/__init__.py` imports it first.
Control it with the environment variable ``TREEFLASH_MLX_BLAS``: ``auto`` (default: MKL from the environment,
then the usual OpenBLAS locations), ``mkl`` or ``openblas`` (only that kind), ``off`` (leave MLX alone), or a
path to a BLAS library.
"""

from __future__ import annotations

import ctypes
import os
import site
import sys

ENV_VAR = "TREEFLASH_MLX_BLAS"
OPENBLAS = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

MKL_NAMES = ("libmkl_rt.so.3", "libmkl_rt.so.2")


def mkl_candidates() -> list[str]:
    """Where pip puts the `mkl` wheel's runtime: the environment's (or the user base's) ``lib/``."""
    roots = dict.fromkeys([sys.prefix, sys.base_prefix, getattr(site, "USER_BASE", None) or site.getuserbase()])
    return [os.path.join(root, "lib", name) for root in roots for name in MKL_NAMES]


def candidates(choice: str = "auto") -> list[str]:
    """The libraries to try, in order, for a ``TREEFLASH_MLX_BLAS`` value."""
    kinds = {"auto": mkl_candidates() + list(OPENBLAS), "mkl": mkl_candidates(), "openblas": list(OPENBLAS)}
    return kinds.get(choice.lower(), [choice])


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
    for path in candidates(choice):
        if not os.path.exists(path):
            continue
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as err:
            _say(f"could not load BLAS {path}: {err}")
            continue
        active_blas = path
        return path
    if choice.lower() not in ("auto", "mkl", "openblas"):
        _say(f"{ENV_VAR}={choice} does not exist; MLX keeps its slow reference BLAS.")
    else:
        _say(
            f"no fast BLAS found ({ENV_VAR}={choice}): MLX's CPU backend runs ~25x slower and speculative decoding "
            "cannot pay. Install one (pip install mkl, or on Debian/Ubuntu apt-get install libopenblas0-pthread); "
            f"{ENV_VAR}=off silences this."
        )
    return None
