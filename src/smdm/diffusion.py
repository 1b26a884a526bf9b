"""Masked diffusion: the forward (masking) process, the MDM loss and the ARM loss.

Shape legend: B batch, L sequence length, V vocabulary, N masked positions.
Boolean tensors named `*_mask` are True at masked (noised) positions.

Source: "Scaling up Masked Diffusion Models on Text" (Nie et al., arXiv
2410.18514), the linear schedule alpha_t = 1 - t and the loss of its training
objective; the weighting 1 / t is that of the continuous-time ELBO of masked
diffusion (Shi et al., arXiv 2406.04329; Sahoo et al., arXiv 2406.07524).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smdm.model import Transformer


def masking_probability(t: torch.Tensor, eps: float) -> torch.Tensor:
    """Map times t in [0, 1] to masking probabilities p = (1 - eps) t + eps, so p never reaches 0."""
    return (1.0 - eps) * t + eps


def apply_mask(
    x: torch.Tensor, p: torch.Tensor, mask_id: int, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each token of x (B, L) with mask_id where noise (B, L) < p (B, 1).

    Returns the noised tokens and the boolean mask (B, L) of replaced positions.
    The uniform noise is an argument so callers control its source (a seed per step).
    """
    mask = noise < p
    return torch.where(mask, torch.full_like(x, mask_id), x), mask


def masked_cross_entropy_sum(
    model: Transformer, noisy: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Return sum over masked positions of weight * CE(logits, target), computing the head only there.

    weights: (B, 1) per-sequence weight (1 / p for the loss). Running the output
    head on the masked positions alone skips about half of its FLOPs and of the
    logits' memory in training, because on average half the tokens are masked.
    """
    hidden = model(noisy, return_hidden=True)  # (B, L, D)
    logits = model.lm_head(hidden[mask]).float()  # (N, V)
    ce = F.cross_entropy(logits, targets[mask], reduction="none")  # (N,)
    token_weights = weights.expand_as(mask)[mask].to(ce.dtype)  # (N,)
    return (ce * token_weights).sum()


def mdm_loss(
    model: Transformer, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, mask_id: int, eps: float
) -> torch.Tensor:
    """MDM training loss of clean tokens x (B, L) at times t (B,) with uniform noise (B, L).

    loss = (1 / (B L)) sum_b sum_{l masked} CE(f(x_t)_l, x_l) / p_b,  p_b = (1 - eps) t_b + eps.
    Dividing by every token (B L), not by the masked count, makes its
    expectation over t an upper bound on the negative log-likelihood per token.
    """
    p = masking_probability(t, eps)[:, None]  # (B, 1)
    noisy, mask = apply_mask(x, p, mask_id, noise)
    total = masked_cross_entropy_sum(model, noisy, x, mask, 1.0 / p)
    return total / x.numel()


def arm_loss(model: Transformer, x: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of tokens x (B, L + 1): predict x[:, 1:] from x[:, :-1]."""
    logits = model(x[:, :-1])  # (B, L, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())


def stratified_times(n: int, generator: torch.Generator) -> torch.Tensor:
    """Return n times t_i = (u + i / n) mod 1 with one shared u ~ U(0, 1).

    Each t_i is uniform on [0, 1), and the n times cover the interval evenly,
    which lowers the variance of a Monte Carlo average over t.
    """
    u = torch.rand((), generator=generator, dtype=torch.float64)
    t = (u + torch.arange(n, dtype=torch.float64) / n) % 1.0
    # A time of exactly 0 would mask nothing and weigh it by 1 / 0; move it to the smallest positive float.
    return t.clamp_min(torch.finfo(torch.float64).tiny)
