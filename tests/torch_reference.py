"""A PyTorch reference of the drafter, the AR head, the tables and the tree, written from docs/algorithm.md (Drafter, AR head, Tree).

Its state dict uses the published TreeFlash key layout, so it also writes the checkpoints the converter reads.
"""

from __future__ import annotations

import heapq

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate(x, positions, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    freqs = positions.double()[:, None] * inv[None]
    emb = torch.cat([freqs, freqs], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return (x * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin()).to(x.dtype)


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, hd, b = c["hidden_size"], c["head_dim"], c.get("attention_bias", False)
        self.nh, self.nkv, self.hd, self.theta = c["num_attention_heads"], c["num_key_value_heads"], hd, c["rope_theta"]
        eps = c["rms_norm_eps"]
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(h, self.nh * hd, bias=b)
        self.self_attn.k_proj = nn.Linear(h, self.nkv * hd, bias=b)
        self.self_attn.v_proj = nn.Linear(h, self.nkv * hd, bias=b)
        self.self_attn.o_proj = nn.Linear(self.nh * hd, h, bias=b)
        self.self_attn.q_norm, self.self_attn.k_norm = RMSNorm(hd, eps), RMSNorm(hd, eps)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(h, c["intermediate_size"], bias=False)
        self.mlp.up_proj = nn.Linear(h, c["intermediate_size"], bias=False)
        self.mlp.down_proj = nn.Linear(c["intermediate_size"], h, bias=False)
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(h, eps), RMSNorm(h, eps)

    def forward(self, x, ctx, start):
        a = self.self_attn
        B, n = x.shape[0], ctx.shape[0]
        xn = self.input_layernorm(x)
        q = a.q_norm(a.q_proj(xn).view(B, self.nh, self.hd)).transpose(0, 1)
        kv_in = torch.cat([ctx, xn])  # context K/V use the same projections, no input norm
        k = a.k_norm(a.k_proj(kv_in).view(-1, self.nkv, self.hd)).transpose(0, 1)
        v = a.v_proj(kv_in).view(-1, self.nkv, self.hd).transpose(0, 1)
        pos = torch.arange(n + B)  # context at 0..n-1, the block at start.. (start == n)
        q, k = rotate(q, start + torch.arange(B), self.theta), rotate(k, pos, self.theta)
        rep = self.nh // self.nkv
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        att = F.scaled_dot_product_attention(q, k, v)  # non-causal
        x = x + a.o_proj(att.transpose(0, 1).reshape(B, -1))
        m = self.mlp
        return x + m.down_proj(F.silu(m.gate_proj(self.post_attention_layernorm(x))) * m.up_proj(self.post_attention_layernorm(x)))


class Head(nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.ug, self.d, self.norm = nn.Linear(2 * h, 2 * i), nn.Linear(i, h, bias=False), RMSNorm(h, 1e-6)

    def forward(self, prev_emb, normed_h):
        u, g = self.ug(torch.cat([self.norm(prev_emb), normed_h], -1)).chunk(2, -1)
        return self.d(F.silu(g) * u)


class TorchDrafter(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        h = c["hidden_size"]
        self.c = c
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([Layer(c) for _ in range(c["num_hidden_layers"])])
        self.model.norm = RMSNorm(h, c["rms_norm_eps"])
        self.model.fc = nn.Linear(len(c["dflash_config"]["target_layer_ids"]) * h, h, bias=False)
        self.model.hidden_norm = RMSNorm(h, c["rms_norm_eps"])
        if c.get("treeflash_config", {}).get("ar_approximation") == "swiglu":
            self.ar_approximation = Head(h, c["intermediate_size"])

    def block(self, features, block_emb):
        """Pre-norm block hidden states; context = features of positions 0..n-1, root at n."""
        ctx = self.model.hidden_norm(self.model.fc(features))
        x = block_emb
        for layer in self.model.layers:
            x = layer(x, ctx, features.shape[0])
        return x

    def tables(self, h, root_emb, embed, lm_head, m, k, temp=1.0):
        """docs/algorithm.md, "AR head": (tokens, logp, next_row), each (B-1, rows, k)."""
        norm = self.model.norm
        B = h.shape[0]
        if not hasattr(self, "ar_approximation"):
            lp = F.log_softmax(lm_head(norm(h[1:])) / temp, -1).topk(k, -1)
            return lp.indices[:, None], lp.values[:, None], torch.zeros_like(lp.indices[:, None])
        cand = lm_head(norm(h[:-1])).topk(m, -1).indices  # cand[j]: top-m at block position j
        prev = embed(cand)
        prev[0] = root_emb
        hd = h[1:, None].expand(-1, m, -1)
        corrected = hd + self.ar_approximation(prev, norm(hd))
        lp = F.log_softmax(lm_head(norm(corrected)) / temp, -1).topk(k, -1)
        tokens, logp = lp.indices, lp.values
        next_row = torch.full_like(tokens, -1)
        for d in range(1, B - 1):
            match = tokens[d - 1][..., None] == cand[d][None, None]
            next_row[d - 1] = torch.where(match.any(-1), match.float().argmax(-1), -1)
        return tokens, logp, next_row


def build_tree(root, tokens, logp, next_row, size):
    """docs/algorithm.md, "Tree": best-first over cumulative log-probability; returns (tokens, parents, depths) lists."""
    depths_n, _, k = tokens.shape
    out_t, out_p, out_d = [root], [-1], [0]
    heap = [(-float(logp[0, 0, 0]), (0,), 0, 1, 0, 0, float(logp[0, 0, 0]))] if size > 1 else []
    while heap and len(out_t) < size:
        _, ranks, parent, depth, row, rank, score = heapq.heappop(heap)
        node = len(out_t)
        out_t.append(int(tokens[depth - 1, row, rank]))
        out_p.append(parent)
        out_d.append(depth)
        if rank + 1 < k:
            s = score - float(logp[depth - 1, row, rank]) + float(logp[depth - 1, row, rank + 1])
            heapq.heappush(heap, (-s, ranks[:-1] + (rank + 1,), parent, depth, row, rank + 1, s))
        nxt = int(next_row[depth - 1, row, rank])
        if depth < depths_n and nxt != -1:
            s = score + float(logp[depth, nxt, 0])
            heapq.heappush(heap, (-s, ranks + (0,), node, depth + 1, nxt, 0, s))
    return out_t, out_p, out_d
