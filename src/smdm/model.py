"""The LLaMA-style backbone shared by masked diffusion models (MDMs) and autoregressive models (ARMs).

Shape legend: B batch, T query length, S key length (cache included), D width,
H heads, K head size, V vocabulary, L layers.

The two kinds differ only in attention: an MDM attends bidirectionally and has
one extra input-embedding row for the mask id (`vocab_size`). Its output head
keeps `vocab_size` columns, so the mask can never be predicted. An ARM attends
causally and decodes with a preallocated key/value cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from smdm.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned scale, computed in float32 for stability."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(dtype)


def rope_tables(
    block_size: int, head_size: int, base: float, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the cos and sin tables (block_size, head_size) of rotate-half RoPE (Su et al., arXiv 2104.09864)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, device=device, dtype=torch.float32) / head_size))
    positions = torch.arange(block_size, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)  # (T, K/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, K)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, K) by the tables cos, sin (B or 1, 1, T, K) in the rotate-half form."""
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Preallocated keys and values of every layer for incremental decoding.

    `length` is the number of positions already written. A forward pass with a
    cache writes its T new positions at [length, length + T) of every layer and
    the caller advances `length` afterwards.
    """

    def __init__(
        self, config: ModelConfig, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        if max_len > config.block_size:
            raise ValueError(
                f"cache length {max_len} exceeds the model's block_size {config.block_size}; "
                "shorten the prompt or max_new_tokens"
            )
        shape = (batch_size, config.n_head, max_len, config.head_size)  # (B, H, S, K)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len = max_len
        self.length = 0

    def reset(self) -> None:
        self.length = 0


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_size = config.head_size
        self.causal = not config.is_mdm
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)  # 3 x (B, T, D)
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, H, T, K)
        k = k.view(B, T, self.n_head, self.head_size).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_size).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)

        is_causal = False
        if cache is not None:
            start = cache.length
            cache.keys[layer][:, :, start : start + T] = k
            cache.values[layer][:, :, start : start + T] = v
            k = cache.keys[layer][:, :, : start + T]  # (B, H, S, K)
            v = cache.values[layer][:, :, : start + T]
            is_causal = self.causal and start == 0 and attn_mask is None and T > 1
        elif self.causal and attn_mask is None:
            is_causal = True

        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)  # (B, H, T, K)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.proj(y)


class MLP(nn.Module):
    """SwiGLU feed-forward block: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config)
        self.norm_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, attn_mask, cache, layer):
        x = x + self.attn(self.norm_1(x), cos, sin, attn_mask, cache, layer)
        return x + self.mlp(self.norm_2(x))


class Transformer(nn.Module):
    """Pre-norm decoder stack; bidirectional for an MDM, causal for an ARM."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.embedding_rows, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        cos, sin = rope_tables(
            config.block_size, config.head_size, config.rope_base, dtype=getattr(torch, config.rope_table_dtype)
        )
        cos, sin = cos.float(), sin.float()  # a bfloat16 table keeps its rounded values in a float32 buffer
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as in the paper's reference code: N(0, 2 / (5 D)), output projections 1 / sqrt(D) / L."""
        d, n_layer = self.config.n_embd, self.config.n_layer
        std = math.sqrt(2.0 / (5 * d))
        for name, param in self.named_parameters():
            if name.endswith("norm_1.weight") or name.endswith("norm_2.weight") or name == "norm_f.weight":
                nn.init.ones_(param)
            elif name.endswith("attn.proj.weight") or name.endswith("mlp.down.weight"):
                nn.init.normal_(param, std=1.0 / math.sqrt(d) / n_layer)
            else:
                nn.init.normal_(param, std=std)

    def forward(
        self,
        idx: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Return logits (B, T, V), or the final hidden states (B, T, D) when return_hidden is set.

        positions: (B, T) or (T,) position ids; by default 0..T-1, shifted by the cache length.
        attn_mask: boolean (B, 1, T, S), True where a query may attend to a key.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            if start + T > self.config.block_size:
                raise ValueError(
                    f"sequence of {start + T} tokens exceeds the model's block_size {self.config.block_size}; "
                    "shorten the input"
                )
            cos = self.rope_cos[start : start + T][None, None]  # (1, 1, T, K)
            sin = self.rope_sin[start : start + T][None, None]
        else:
            positions = positions if positions.dim() == 2 else positions[None]
            cos = self.rope_cos[positions][:, None]  # (B, 1, T, K)
            sin = self.rope_sin[positions][:, None]

        x = self.wte(idx)  # (B, T, D)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, attn_mask, cache, layer)
        x = self.norm_f(x)
        return x if return_hidden else self.lm_head(x)

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        param = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len, param.device, dtype or param.dtype)
