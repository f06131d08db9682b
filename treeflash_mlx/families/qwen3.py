"""Qwen3: the standard block with per-head q/k norms (``common.Family.attention`` applies them)."""

from mlx_lm.models import qwen3

from .common import Family


class Qwen3(Family):
    name = "qwen3"
    dense_mlp = qwen3.MLP
