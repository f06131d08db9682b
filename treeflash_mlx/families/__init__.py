"""Target families: one module per mlx-lm model family, each a ``common.Family`` that says how that family's
block runs over a pass with per-token positions, an ancestor mask and (for recurrent layers) a tree.

Adding a family is adding a module here and a line to ``FAMILIES``."""

from __future__ import annotations

import mlx.nn as nn

from .common import Family, LayerPass, is_recurrent
from .gemma3_text import Gemma3Text
from .gpt_oss import GptOss
from .llama import Llama
from .qwen2 import Qwen2
from .qwen3 import Qwen3
from .qwen3_5 import Qwen3_5, Qwen3_5Moe
from .qwen3_moe import Qwen3Moe
from .qwen3_next import Qwen3Next

FAMILIES: dict[str, type[Family]] = {f.name: f for f in (
    Qwen3, Qwen3Moe, Qwen2, Llama, Gemma3Text, Qwen3_5, Qwen3_5Moe, Qwen3Next, GptOss)}
SUPPORTED_FAMILIES = tuple(FAMILIES)

__all__ = ["FAMILIES", "SUPPORTED_FAMILIES", "Family", "LayerPass", "family_of", "is_recurrent"]


def family_of(model: nn.Module) -> Family:
    """The family running ``model``; the mlx-lm module decides, not model_type (mistral is served by llama.py)."""
    name = type(model).__module__.rsplit(".", 1)[-1]
    if name not in FAMILIES:
        model_type = getattr(model, "model_type", None) or type(model).__name__
        raise ValueError(f"target model type {model_type!r} is not supported; use a model of the "
                         f"{', '.join(SUPPORTED_FAMILIES)} families")
    return FAMILIES[name](model)
