"""Validation loss on a prepared split: the MDM's NELBO bound and the ARM's exact cross-entropy.

Both are in nats per token. The MDM's value is a Monte Carlo estimate of an
upper bound on the negative log-likelihood per token. A fixed seed and draw
count make it the same number every time, so runs can be compared.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from smdm.data.shards import eval_windows
from smdm.diffusion import apply_mask, arm_loss, masked_cross_entropy_sum, stratified_times
from smdm.model import Transformer
from smdm.runtime import autocast, generator


@torch.no_grad()
def mdm_nelbo(
    model: Transformer,
    x: torch.Tensor,
    mc_samples: int,
    seed: int,
    precision: str = "fp32",
) -> float:
    """Return the NELBO per token of sequences x (B, L), averaged over mc_samples stratified draws of t.

    NELBO = E_t [ (1 / t) sum_{l masked} CE(f(x_t)_l, x_l) ] / L with t ~ U(0, 1)
    and masking probability t (no eps), the continuous-time bound of masked
    diffusion with the linear schedule (Nie et al., arXiv 2410.18514).
    """
    config = model.config
    device = next(model.parameters()).device
    rng = generator(seed, "nelbo")
    total = 0.0
    times = torch.stack([stratified_times(mc_samples, rng) for _ in range(x.size(0))], dim=1)  # (K, B)
    for k in range(mc_samples):
        t = times[k].to(device=device, dtype=torch.float32)[:, None]  # (B, 1)
        noise = torch.rand(x.shape, generator=rng).to(device)
        noisy, mask = apply_mask(x, t, config.mask_id, noise)
        with autocast(device, precision):
            total += masked_cross_entropy_sum(model, noisy, x, mask, 1.0 / t).item()
    return total / (mc_samples * x.numel())


@torch.no_grad()
def validation_loss(
    model: Transformer,
    tokens: np.ndarray,
    seq_len: int,
    *,
    max_sequences: int = 64,
    batch_size: int = 16,
    mc_samples: int = 4,
    seed: int = 1234,
    precision: str = "fp32",
) -> dict:
    """Evaluate a model on evenly spread windows of a split.

    Returns {"loss", "perplexity", "sequences", "tokens", "kind", "bound"}; for
    an MDM "bound" is True and the perplexity is an upper bound.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    is_mdm = model.config.is_mdm
    windows = eval_windows(tokens, seq_len + 1, max_sequences)  # (N, L + 1)
    weighted, count = 0.0, 0
    for index in range(0, len(windows), batch_size):
        x = torch.from_numpy(windows[index : index + batch_size]).to(device)
        if is_mdm:
            value = mdm_nelbo(model, x[:, :seq_len], mc_samples, seed + index, precision)
        else:
            with autocast(device, precision):
                value = arm_loss(model, x).item()
        weighted += value * x.size(0)
        count += x.size(0)
    model.train(was_training)
    loss = weighted / count
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "sequences": count,
        "tokens": count * seq_len,
        "kind": model.config.kind,
        "bound": is_mdm,
    }
