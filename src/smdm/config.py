"""Typed configurations: the model shape, the size family and validation.

Sizes are named by their non-embedding parameter count in millions, as in
"Scaling up Masked Diffusion Models on Text" (Nie et al., arXiv 2410.18514,
table of model configurations). The count is always computed from the shape.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

ModelKind = Literal["mdm", "arm"]
MODEL_KINDS: tuple[str, ...] = ("mdm", "arm")
ROPE_TABLE_DTYPES: tuple[str, ...] = ("float32", "bfloat16")

# name -> (n_layer, n_head, n_embd, intermediate_size). The paper's 30 sizes.
PAPER_SIZES: dict[str, tuple[int, int, int, int]] = {
    "6M": (6, 4, 256, 1024),
    "19M": (8, 6, 384, 1536),
    "34M": (8, 8, 512, 2048),
    "48M": (9, 9, 576, 2304),
    "66M": (10, 10, 640, 2560),
    "75M": (16, 8, 640, 1600),
    "85M": (13, 10, 640, 2560),
    "113M": (12, 12, 768, 3072),
    "142M": (15, 12, 768, 3072),
    "170M": (18, 12, 768, 3072),
    "180M": (14, 14, 896, 3584),
    "206M": (16, 14, 896, 3584),
    "231M": (18, 14, 896, 3584),
    "268M": (16, 16, 1024, 4096),
    "302M": (18, 16, 1024, 4096),
    "336M": (20, 16, 1024, 4096),
    "472M": (18, 10, 1280, 5120),
    "551M": (21, 10, 1280, 5120),
    "571M": (18, 11, 1408, 5632),
    "629M": (24, 10, 1280, 5120),
    "666M": (21, 11, 1408, 5632),
    "717M": (19, 12, 1536, 6144),
    "761M": (24, 11, 1408, 5632),
    "831M": (22, 12, 1536, 6144),
    "944M": (25, 12, 1536, 6144),
    "1028M": (20, 14, 1792, 7168),
    "1233M": (24, 14, 1792, 7168),
    "1476M": (22, 16, 2048, 8192),
    "1678M": (25, 16, 2048, 8192),
    "2121M": (28, 17, 2176, 8704),
}

# Small shapes that train in minutes on a laptop CPU. Same family rules (f = 4 d).
TINY_SIZES: dict[str, tuple[int, int, int, int]] = {
    # A ladder that doubles the non-embedding count (2K .. 1M) for CPU scaling sweeps.
    "tiny-2K": (1, 2, 12, 48),
    "tiny-4K": (1, 2, 16, 64),
    "tiny-8K": (2, 2, 16, 64),
    "tiny-16K": (1, 2, 32, 128),
    "tiny-33K": (2, 2, 32, 128),
    "tiny-66K": (1, 2, 64, 256),
    "tiny-0.1M": (2, 2, 64, 256),
    "tiny-262K": (4, 2, 64, 256),
    "tiny-0.4M": (2, 4, 128, 512),
    "tiny-0.8M": (4, 4, 128, 512),
    "tiny-1.2M": (6, 4, 128, 512),
    "tiny-1.8M": (4, 4, 192, 768),
    "tiny-3.2M": (4, 4, 256, 1024),
    "tiny-4.7M": (6, 4, 256, 1024),
}

# The paper uses a LLaMA-2 tokenizer of 32,000 ids and a context of 2048 tokens.
PAPER_VOCAB_SIZE = 32000
PAPER_BLOCK_SIZE = 2048


def non_embedding_params(n_layer: int, n_embd: int, intermediate_size: int) -> int:
    """Count the non-embedding parameters of one backbone.

    Per layer: q, k, v and output projections (4 d^2), the SwiGLU MLP (3 d f)
    and two RMSNorm weights (2 d). The final RMSNorm adds d. The token
    embedding and the output head are excluded.
    """
    d, f = n_embd, intermediate_size
    return n_layer * (4 * d * d + 3 * d * f + 2 * d) + d


@dataclass
class ModelConfig:
    """Shape of one backbone; `kind` picks bidirectional (MDM) or causal (ARM) attention."""

    kind: str = "mdm"
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    intermediate_size: int = 256
    vocab_size: int = 256
    """Number of real token ids. For an MDM the mask id is `vocab_size`."""
    block_size: int = 256
    """Maximum sequence length (RoPE tables are built for it)."""
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    rope_table_dtype: str = "float32"
    """Precision of the RoPE cos/sin tables: "float32", or "bfloat16" to round them as the reference
    code of arXiv 2410.18514 does even in float32 runs. The buffers are float32 either way."""
    name: str = ""
    """Family name such as "19M"; informational."""

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in MODEL_KINDS:
            problems.append(f"kind={self.kind!r} is invalid; use one of {MODEL_KINDS}")
        if self.rope_table_dtype not in ROPE_TABLE_DTYPES:
            problems.append(f"rope_table_dtype={self.rope_table_dtype!r} is invalid; use one of {ROPE_TABLE_DTYPES}")
        for key in ("n_layer", "n_head", "n_embd", "intermediate_size", "vocab_size", "block_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                problems.append(f"{key}={value!r} must be a positive integer")
        if not problems and self.n_embd % self.n_head != 0:
            problems.append(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not problems and self.head_size % 2 != 0:
            problems.append(f"head size {self.head_size} must be even for rotary embeddings")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def is_mdm(self) -> bool:
        return self.kind == "mdm"

    @property
    def mask_id(self) -> int | None:
        """Id of the mask token (one past the last real id), or None for an ARM."""
        return self.vocab_size if self.is_mdm else None

    @property
    def embedding_rows(self) -> int:
        """Rows of the input embedding: one more than the vocabulary for an MDM."""
        return self.vocab_size + (1 if self.is_mdm else 0)

    @property
    def n_non_embedding(self) -> int:
        return non_embedding_params(self.n_layer, self.n_embd, self.intermediate_size)

    @property
    def n_params(self) -> int:
        """All parameters: non-embedding, input embedding and output head."""
        return self.n_non_embedding + self.embedding_rows * self.n_embd + self.vocab_size * self.n_embd

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 x every matmul weight (head included) plus attention.

        The attention term counts QK^T and AV: 2 matmuls of 2 * T * d FLOPs per
        token forward, so 12 * n_layer * d * T for forward and backward.
        """
        t = seq_len or self.block_size
        matmul_weights = self.n_layer * (4 * self.n_embd**2 + 3 * self.n_embd * self.intermediate_size)
        matmul_weights += self.vocab_size * self.n_embd
        return 6 * matmul_weights + 12 * self.n_layer * self.n_embd * t

    @classmethod
    def from_name(cls, name: str, kind: str = "mdm", **overrides: Any) -> "ModelConfig":
        """Build the config of a named size ("19M", "tiny-0.8M"), with optional field overrides."""
        sizes = {**PAPER_SIZES, **TINY_SIZES}
        if name not in sizes:
            raise ValueError(f"unknown model size {name!r}; choose one of: {', '.join(sizes)}")
        n_layer, n_head, n_embd, f = sizes[name]
        values: dict[str, Any] = dict(
            kind=kind, n_layer=n_layer, n_head=n_head, n_embd=n_embd, intermediate_size=f, name=name
        )
        if name in PAPER_SIZES:
            values.update(vocab_size=PAPER_VOCAB_SIZE, block_size=PAPER_BLOCK_SIZE)
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)


def size_names() -> list[str]:
    return [*PAPER_SIZES, *TINY_SIZES]


@dataclass
class TrainConfig:
    """One training run: batch, optimiser, schedule, budget, evaluation and checkpoints."""

    seq_len: int = 256
    """Training sequence length in tokens (at most the model's block_size)."""
    global_batch: int = 32
    """Sequences per optimiser step, across all processes and micro-batches."""
    micro_batch: int = 0
    """Sequences per forward pass; 0 means the whole global batch at once."""
    lr: float = 2e-4
    min_lr: float = 2e-5
    warmup_fraction: float = 0.01
    min_warmup_steps: int = 100
    """Warmup lasts max(warmup_fraction * steps, min_warmup_steps), capped at the run length."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_steps: int = 0
    max_tokens: int = 0
    flops: float = 0.0
    """Compute budget C = 6 N D; exactly one of max_steps, max_tokens and flops is set."""
    ssl_ratio: float = 0.01
    """Probability that a micro-batch is cut to a random length (stochastic sequence length)."""
    mask_eps: float = 1e-3
    """Minimum masking probability: p = (1 - eps) t + eps."""
    eval_interval: int = 100
    eval_batches: int = 8
    eval_mc_samples: int = 4
    """Monte Carlo draws per validation sequence for the MDM's bound."""
    eval_seed: int = 1234
    log_interval: int = 10
    checkpoint_interval: int = 200
    seed: int = 0
    precision: str = "auto"
    """"fp32", "bf16-mixed" or "auto" (bf16-mixed on a GPU that supports it, else fp32)."""
    device: str = "auto"
    """"cpu", "cuda", "cuda:1" or "auto" (CUDA when available)."""

    def __post_init__(self) -> None:
        problems = []
        budget_set = [k for k in ("max_steps", "max_tokens", "flops") if getattr(self, k) > 0]
        if len(budget_set) > 1:
            problems.append(f"set only one of --max-steps, --max-tokens and --flops (got {', '.join(budget_set)})")
        if self.seq_len <= 0 or self.global_batch <= 0:
            problems.append(f"seq_len={self.seq_len} and global_batch={self.global_batch} must be positive")
        if self.micro_batch < 0 or (self.micro_batch and self.global_batch % self.micro_batch):
            problems.append(
                f"global_batch={self.global_batch} is not a multiple of micro_batch={self.micro_batch}; "
                "change --micro-batch"
            )
        if not 0 <= self.ssl_ratio <= 1:
            problems.append(f"ssl_ratio={self.ssl_ratio} must lie in [0, 1]")
        if not 0 <= self.mask_eps < 1:
            problems.append(f"mask_eps={self.mask_eps} must lie in [0, 1)")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            problems.append(f"need 0 <= min_lr <= lr and lr > 0 (got lr={self.lr}, min_lr={self.min_lr})")
        if self.precision not in ("auto", "fp32", "bf16-mixed"):
            problems.append(f"precision={self.precision!r} is invalid; use auto, fp32 or bf16-mixed")
        for key in ("eval_interval", "eval_batches", "eval_mc_samples", "log_interval", "checkpoint_interval"):
            if getattr(self, key) <= 0:
                problems.append(f"{key}={getattr(self, key)} must be positive")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    @property
    def micro_batch_size(self) -> int:
        return self.micro_batch or self.global_batch

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch // self.micro_batch_size

    def expected_tokens_per_step(self) -> float:
        """Tokens per step, counting the expected cut of stochastic sequence length."""
        mean_len = (1 - self.ssl_ratio) * self.seq_len + self.ssl_ratio * (self.seq_len + 1) / 2
        return self.global_batch * mean_len

    def resolve_steps(self, n_non_embedding: int, kind: str) -> int:
        """Number of optimiser steps from the budget (steps, tokens, or FLOPs with C = 6 N D)."""
        per_step = self.expected_tokens_per_step() if kind == "mdm" else self.global_batch * self.seq_len
        if self.max_steps > 0:
            return self.max_steps
        if self.max_tokens > 0:
            return max(1, round(self.max_tokens / per_step))
        if self.flops > 0:
            tokens = self.flops / (6 * n_non_embedding)
            return max(1, round(tokens / per_step))
        raise ValueError("no training budget: set --max-steps, --max-tokens or --flops")

    def warmup_steps(self, total_steps: int) -> int:
        return min(total_steps, max(round(self.warmup_fraction * total_steps), self.min_warmup_steps))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)

