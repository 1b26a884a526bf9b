"""Sampling: MDM reverse-process samplers and KV-cached ARM decoding.

Shape legend: B batch, P prompt length, G new tokens, L = P + G canvas length, V vocabulary.

MDM samplers follow "Scaling up Masked Diffusion Models on Text" (Nie et al.,
arXiv 2410.18514) with the linear schedule alpha_t = 1 - t: the canvas starts
as the prompt followed by G mask tokens, and `steps` forward passes walk the
time grid from t = 1 down to 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smdm.model import Transformer

SAMPLERS = ("random", "low_confidence")


@dataclass
class SampleConfig:
    """Settings shared by the samplers."""

    max_new_tokens: int = 64
    steps: int = 64
    """MDM forward passes; ignored by an ARM, which takes one per token."""
    temperature: float = 1.0
    """Softmax temperature; 0 picks the argmax (greedy)."""
    sampler: str = "random"
    """MDM remasking rule: "random" (the true reverse process) or "low_confidence"."""
    stop_at_eos: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens <= 0:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be positive")
        if self.steps <= 0:
            problems.append(f"steps={self.steps} must be positive")
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} must be >= 0")
        if self.sampler not in SAMPLERS:
            problems.append(f"sampler={self.sampler!r} is invalid; choose one of {SAMPLERS}")
        if problems:
            raise ValueError("invalid sampling config: " + "; ".join(problems))


def gumbel_max(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """Sample argmax(l / tau + Gumbel) in float64, i.e. a draw from softmax(l / tau); tau = 0 is greedy.

    Float64 matters: with float32 or lower, Gumbel noise of rare tokens is
    rounded and sampling measurably deviates from softmax(l / tau) (Zheng et
    al., arXiv 2409.02908, on truncation in masked diffusion sampling).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float64).to(logits.device)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-300)))
    return (logits.double() / temperature + gumbel).argmax(dim=-1)


def _check_length(model: Transformer, prompt_len: int, max_new_tokens: int) -> None:
    limit = model.config.block_size
    if prompt_len + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {prompt_len} tokens plus max_new_tokens={max_new_tokens} exceeds the model's context of "
            f"{limit} tokens; shorten the prompt or lower --max-new-tokens to {max(0, limit - prompt_len)}"
        )


@torch.no_grad()
def mdm_sample(model: Transformer, prompt: torch.Tensor, config: SampleConfig) -> torch.Tensor:
    """Generate G = max_new_tokens tokens after each prompt row (B, P); return the new tokens (B, G).

    Random remasking: at a step from time t to s < t, each masked token is
    revealed with probability (t - s) / t to a draw from softmax(l / tau), the
    exact reverse process of the linear schedule. Low-confidence remasking
    reveals, per row, the most confident predictions in the number that keeps
    the expected masked count of the same schedule (G s / t), so every row
    follows its own budget.
    """
    mask_id = model.config.mask_id
    if mask_id is None:
        raise ValueError("mdm_sample needs an MDM checkpoint; use arm_sample for an ARM")
    B, P = prompt.shape
    G = config.max_new_tokens
    _check_length(model, P, G)
    device = prompt.device
    rng = torch.Generator().manual_seed(config.seed)
    canvas = torch.cat([prompt, torch.full((B, G), mask_id, dtype=prompt.dtype, device=device)], dim=1)  # (B, L)
    times = torch.linspace(1.0, 0.0, config.steps + 1, dtype=torch.float64)

    for i in range(config.steps):
        t, s = times[i].item(), times[i + 1].item()
        masked = canvas == mask_id  # (B, L) True where still masked
        if not masked.any():
            break
        logits = model(canvas).float()  # (B, L, V)
        proposal = gumbel_max(logits, config.temperature, rng)  # (B, L)
        if config.sampler == "random":
            reveal_prob = 1.0 if i == config.steps - 1 else (t - s) / t
            draw = torch.rand(canvas.shape, generator=rng, dtype=torch.float64).to(device)
            reveal = masked & (draw < reveal_prob)
        else:
            confidence = torch.softmax(logits.double(), dim=-1).gather(-1, proposal[..., None]).squeeze(-1)
            confidence = confidence.masked_fill(~masked, -1.0)  # (B, L) only masked positions compete
            n_masked = masked.sum(dim=1)  # (B,)
            keep_masked = torch.floor(n_masked.double() * (s / t)).long() if i < config.steps - 1 else 0 * n_masked
            n_reveal = (n_masked - keep_masked).clamp_min(0)  # (B,) per-row budget
            order = confidence.argsort(dim=1, descending=True)  # (B, L)
            ranks = torch.empty_like(order)
            ranks.scatter_(1, order, torch.arange(canvas.size(1), device=device).expand_as(order))
            reveal = masked & (ranks < n_reveal[:, None])
        canvas = torch.where(reveal, proposal, canvas)
    return canvas[:, P:]


@torch.no_grad()
def arm_sample(model: Transformer, prompt: torch.Tensor, config: SampleConfig, eos_id: int | None = None) -> torch.Tensor:
    """Decode max_new_tokens tokens after each prompt row (B, P) with a preallocated KV cache; return (B, G).

    Rows that emitted EOS keep emitting EOS so the batch stays rectangular.
    """
    B, P = prompt.shape
    G = config.max_new_tokens
    _check_length(model, P, G)
    if P == 0:
        raise ValueError("an ARM needs a prompt of at least one token; start from the EOS token")
    rng = torch.Generator().manual_seed(config.seed)
    cache = model.new_cache(B, P + G)
    out = torch.empty(B, G, dtype=prompt.dtype, device=prompt.device)
    finished = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    logits = model(prompt, cache=cache)[:, -1]  # (B, V)
    cache.length = P
    for i in range(G):
        token = gumbel_max(logits.float(), config.temperature, rng)  # (B,)
        if eos_id is not None:
            token = torch.where(finished, torch.full_like(token, eos_id), token)
            finished |= token == eos_id
        out[:, i] = token
        if (config.stop_at_eos and eos_id is not None and finished.all()) or i == G - 1:
            return out[:, : i + 1]
        logits = model(token[:, None], cache=cache)[:, -1]
        cache.length += 1
    return out


def truncate_at_eos(tokens: list[int], eos_id: int) -> list[int]:
    """Cut a row of generated ids at its first EOS (excluded)."""
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


@torch.no_grad()
def generate(
    model: Transformer, prompt: torch.Tensor, config: SampleConfig, eos_id: int | None = None
) -> list[list[int]]:
    """Generate with the sampler that fits the model kind; return each row's ids, cut at EOS when asked."""
    if model.config.is_mdm:
        new = mdm_sample(model, prompt, config)
    else:
        new = arm_sample(model, prompt, config, eos_id)
    rows = new.tolist()
    if config.stop_at_eos and eos_id is not None:
        rows = [truncate_at_eos(row, eos_id) for row in rows]
    return rows
