"""treeflash-mlx: lossless TreeFlash speculative decoding for MLX."""

import sys
import types

from . import _blas, _cli

_cli.install_import_guard()  # a command line's Ctrl-C during the imports below ends in one line
_blas.setup()  # must precede the first `import mlx.core` (docs/linux-cpu.md, "Fast BLAS")

from .drafter import Drafter, DrafterConfig  # noqa: E402
from .loading import load  # noqa: E402
from .prompt_cache import load_prompt_cache, make_prompt_cache, save_prompt_cache  # noqa: E402
from .speculative import GenerationResponse, generate, stream_generate  # noqa: E402

__all__ = ["Drafter", "DrafterConfig", "GenerationResponse", "generate", "load", "load_prompt_cache",
           "make_prompt_cache", "save_prompt_cache", "stream_generate"]
__version__ = "0.1.0"


class _Package(types.ModuleType):
    """Importing the command-line module ``treeflash_mlx.generate`` would rebind the package's ``generate`` to
    that module; the package keeps the function (the module stays reachable through ``sys.modules``)."""

    def __setattr__(self, name, value):
        if name == "generate" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
