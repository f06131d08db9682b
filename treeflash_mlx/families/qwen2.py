"""Qwen2 / Qwen2.5: the standard block (q/k/v biases live in the projections). mlx-lm reads no window keys of
Qwen2 configs (``use_sliding_window`` is ignored), so neither does this."""

from mlx_lm.models import qwen2

from .common import Family


class Qwen2(Family):
    name = "qwen2"
    dense_mlp = qwen2.MLP
