"""Qwen3-MoE (Qwen3-Coder-30B-A3B, ...): sparse MoE blocks, dense ones in ``mlp_only_layers``; each tree node is
routed to its own experts, since the router sees one row per token."""

from mlx_lm.models import qwen3_moe

from .common import Family


class Qwen3Moe(Family):
    name = "qwen3_moe"
    dense_mlp = qwen3_moe.MLP
