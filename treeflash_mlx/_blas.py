"""Make MLX's Linux CPU backend use a fast BLAS (docs/algorithm.md, "Linux CPU"; docs/linux-cpu.md, "Fast BLAS").

The Linux `mlx[cpu]` wheel links the reference BLAS (~3 GFLOP/s): a 16-token tree verification then costs
as much as 16 single steps and speculative decoding can only lose. Loading a fast BLAS with RTLD_GLOBAL
*before* `mlx.core` is imported makes MLX's `cblas_*` calls resolve to it instead.

Where it comes from, in this order:
1. the system OpenBLAS (`apt-get install libopenblas0-pthread`) where there is one;
2. else the OpenBLAS wheel that the package depends on on Linux (`scipy-openblas32`, 8 MB, self-contained).
   Its symbols carry a ``scipy_`` prefix, so MLX cannot find them by themselves: a three-function shim
   (``cblas_sgemm``/``dgemm``/``cgemm`` forwarding to the prefixed ones, the only BLAS calls MLX's matmuls
   make) is compiled once with the system C compiler (MLX's CPU backend needs one anyway for its kernels)
   and cached under ``~/.cache/treeflash-mlx``.

This module must run before the first `import mlx.core`, so `treeflash_mlx/__init__.py` imports it first.
Control it with the environment variable ``TREEFLASH_MLX_BLAS``: ``auto`` (default: as above), ``system``
or ``wheel`` (only that one), ``off`` (leave MLX alone), or a path to a BLAS library.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

ENV_VAR = "TREEFLASH_MLX_BLAS"
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
WHEEL = "scipy_openblas32"
SHIM = """
typedef int I;
extern void scipy_cblas_sgemm(I, I, I, I, I, I, float, const float *, I, const float *, I, float, float *, I);
extern void scipy_cblas_dgemm(I, I, I, I, I, I, double, const double *, I, const double *, I, double, double *, I);
extern void scipy_cblas_cgemm(I, I, I, I, I, I, const void *, const void *, I, const void *, I, const void *,
                              void *, I);
void cblas_sgemm(I o, I ta, I tb, I m, I n, I k, float al, const float *a, I lda, const float *b, I ldb, float be,
                 float *c, I ldc) { scipy_cblas_sgemm(o, ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc); }
void cblas_dgemm(I o, I ta, I tb, I m, I n, I k, double al, const double *a, I lda, const double *b, I ldb,
                 double be, double *c, I ldc) { scipy_cblas_dgemm(o, ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc); }
void cblas_cgemm(I o, I ta, I tb, I m, I n, I k, const void *al, const void *a, I lda, const void *b, I ldb,
                 const void *be, void *c, I ldc) { scipy_cblas_cgemm(o, ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc); }
"""

#: The library that serves MLX's BLAS calls, or None when MLX uses its bundled reference BLAS.
active_blas: str | None = None


def _already_loaded() -> str | None:
    """A fast BLAS already mapped into this process (e.g. through LD_PRELOAD)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                if "libopenblas" in line or "libmkl_rt" in line or "libblis" in line or "treeflash-cblas" in line:
                    return line.split()[-1]
    except OSError:
        pass
    return None


def _say(message: str) -> None:
    print(f"[treeflash-mlx] {message}", file=sys.stderr)


def wheel_library() -> str | None:
    """The pip OpenBLAS (found without importing it), or None."""
    spec = importlib.util.find_spec(WHEEL)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "lib", "libscipy_openblas.so")
    return path if os.path.exists(path) else None


def cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "treeflash-mlx")


def build_shim(library: str) -> str:
    """The shim for ``library``, compiled once per library file (its path, size and time name the build)."""
    stat = os.stat(library)
    key = hashlib.sha256(f"{library}:{stat.st_size}:{stat.st_mtime_ns}:{SHIM}".encode()).hexdigest()[:16]
    out = os.path.join(cache_dir(), f"treeflash-cblas-{key}.so")
    if os.path.exists(out):
        return out
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc) to build the BLAS shim; install one (apt-get install gcc)")
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        source, built = os.path.join(tmp, "shim.c"), os.path.join(tmp, "shim.so")
        with open(source, "w") as f:
            f.write(SHIM)
        libdir = os.path.dirname(library)
        proc = subprocess.run([compiler, "-O2", "-shared", "-fPIC", source, "-o", built, library,
                               f"-Wl,-rpath,{libdir}"], capture_output=True, text=True, timeout=120)
        if proc.returncode:
            said = (proc.stderr or proc.stdout).strip().splitlines()
            raise OSError(f"building the BLAS shim with {compiler} failed: {said[-1] if said else proc.returncode}")
        os.replace(built, out)  # atomic: a concurrent process sees the whole file or none
    return out


def candidates(choice: str = "auto") -> list[str]:
    """The libraries to try, in order, for a ``TREEFLASH_MLX_BLAS`` value ("wheel" stands for the shim)."""
    kinds = {"auto": [*CANDIDATES, "wheel"], "system": list(CANDIDATES), "wheel": ["wheel"]}
    return kinds.get(choice.lower(), [choice])


def _load(path: str) -> str | None:
    """Load one candidate globally; the path that serves, or None (saying why when it was there)."""
    if path == "wheel":
        library = wheel_library()
        if library is None:
            return None
        try:
            path = build_shim(library)
        except (OSError, subprocess.SubprocessError) as err:
            _say(f"cannot use the OpenBLAS wheel: {err}")
            return None
    if not os.path.exists(path):
        return None
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as err:
        _say(f"could not load BLAS {path}: {err}")
        return None
    return path


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
        active_blas = _load(path)
        if active_blas:
            return active_blas
    if choice.lower() not in ("auto", "system", "wheel"):
        _say(f"{ENV_VAR}={choice} does not exist; MLX keeps its slow reference BLAS.")
    else:
        _say(
            f"no fast BLAS found ({ENV_VAR}={choice}): MLX's CPU backend runs ~25x slower and speculative decoding "
            "cannot pay. Install one (pip install scipy-openblas32, or apt-get install libopenblas0-pthread); "
            f"{ENV_VAR}=off silences this."
        )
    return None
