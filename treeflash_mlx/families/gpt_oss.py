"""gpt-oss: attention with learned sinks (one logit per head that takes softmax mass and gives no value), q/k/v/o
biases, 128-token sliding layers alternating with full ones, YaRN RoPE, and a sparse MoE of SwiGLU experts with
clamped activations (the model's own ``MLPBlock``, which routes each tree node on its own)."""

from __future__ import annotations

from .common import Family, attend, rotate
from .llama import checked_window


class GptOss(Family):
    name = "gpt_oss"

    def windows(self):
        sliding = [kind == "sliding_attention" for kind in self.text.layer_types]
        return checked_window(self.name, sliding, self.args.sliding_window)

    def attention(self, attn, x, lp):
        B, L, _ = x.shape
        D = attn.head_dim
        q = attn.q_proj(x).reshape(B, L, -1, D)
        k = attn.k_proj(x).reshape(B, L, -1, D)
        v = attn.v_proj(x).reshape(B, L, -1, D).transpose(0, 2, 1, 3)
        q, k = rotate(attn.rope, q, lp), rotate(attn.rope, k, lp)
        return attn.o_proj(attend(q, k, v, lp, attn.sm_scale, sinks=attn.sinks))
