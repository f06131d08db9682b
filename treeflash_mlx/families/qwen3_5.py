"""Qwen3.5 and Qwen3.6 (``qwen3_5``, ``qwen3_5_moe``), the text part: Qwen3-Next's layers (``qwen3_next``) with
separate input projections in the linear layers, inside a multimodal wrapper (``model.language_model``)."""

from __future__ import annotations

from mlx_lm.models.base import gather_last_axis

from .qwen3_next import Qwen3Next


class Qwen3_5(Qwen3Next):
    name = "qwen3_5"

    def __init__(self, model):
        super().__init__(model)
        self.text_model = model.language_model  # lm_head, the text config
        self.args = model.language_model.args

    def head(self):
        lm = self.text_model
        return lm.lm_head if "lm_head" in lm else self.text.embed_tokens

    def logits(self, normed):
        out = super().logits(normed)
        if (group := getattr(self.text_model, "sharding_group", None)) is not None:  # tensor parallel: each rank
            out = gather_last_axis(out, group)  # holds a slice of the vocabulary, as mlx-lm's model gathers it
        return out

    @staticmethod
    def projections(la, x):
        B, S, _ = x.shape
        return (la.in_proj_qkv(x), la.in_proj_z(x).reshape(B, S, la.num_v_heads, la.head_v_dim),
                la.in_proj_b(x), la.in_proj_a(x))


class Qwen3_5Moe(Qwen3_5):
    name = "qwen3_5_moe"
