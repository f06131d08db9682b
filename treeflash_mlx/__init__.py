"""treeflash-mlx: lossless TreeFlash speculative decoding for MLX."""

from . import _blas, _cli

_cli.install_import_guard()  # a command line's Ctrl-C during the imports below ends in one line
_blas.setup()  # must precede the first `import mlx.core` (SPEC §8)

from .drafter import Drafter, DrafterConfig  # noqa: E402
from .speculative import GenerationResponse, generate, load, stream_generate  # noqa: E402

__all__ = ["Drafter", "DrafterConfig", "GenerationResponse", "generate", "load", "stream_generate"]
__version__ = "0.1.0"
