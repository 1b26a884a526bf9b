"""Unsupervised classifier-free guidance for masked diffusion models.

Source: "Scaling up Masked Diffusion Models on Text" (Nie et al., arXiv
2410.18514), unsupervised classifier-free guidance. The conditional pass runs
on the canvas with the real prompt. The unconditional pass runs on the same
canvas (same length, same positions) with every prompt position replaced by
the mask id. A pretrained MDM already models fully masked prompts, so no fine-tuning
with prompt dropout is needed. The guided logits are

    l = l_u + (w + 1) (l_c - l_u),

combined on raw logits before any softmax or sampling noise; w = 0 is no
guidance. The same functions serve sampling and likelihood estimation.
"""

from __future__ import annotations

import torch

from smdm.model import Transformer


def cfg_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Combine conditional and unconditional logits: l_u + (w + 1)(l_c - l_u), with w = `scale`.

    With scale == 0 the conditional tensor itself is returned, so turning
    guidance off is bit-identical to never computing it. The formula is
    invariant to a per-row constant, so log-probabilities give the same
    normalised result as raw logits.
    """
    if scale == 0:
        return cond
    return uncond + (scale + 1.0) * (cond - uncond)


def unconditional_canvas(canvas: torch.Tensor, prompt_mask: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Return the canvas (B, L) with every position where prompt_mask (B, L) is True set to mask_id."""
    if prompt_mask.shape != canvas.shape:
        raise ValueError(f"prompt_mask has shape {tuple(prompt_mask.shape)}, expected the canvas shape {tuple(canvas.shape)}")
    return canvas.masked_fill(prompt_mask, mask_id)


def guided_logits(
    model: Transformer,
    canvas: torch.Tensor,
    prompt_mask: torch.Tensor,
    scale: float,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the MDM on a canvas (B, L) and return guided logits (B, L, V) for the guidance scale w = `scale`.

    prompt_mask (B, L) is True at prompt positions. With scale == 0 this is a
    single plain forward pass. Otherwise the conditional and unconditional
    canvases run as one batch of 2 B rows.
    """
    mask_id = model.config.mask_id
    if scale != 0 and mask_id is None:
        raise ValueError(f"classifier-free guidance (scale={scale}) needs an MDM; an ARM has no mask token, use scale 0")
    if scale == 0:
        return model(canvas, attn_mask=attn_mask)
    both = torch.cat([canvas, unconditional_canvas(canvas, prompt_mask, mask_id)], dim=0)  # (2B, L)
    both_mask = None if attn_mask is None else torch.cat([attn_mask, attn_mask], dim=0)
    cond, uncond = model(both, attn_mask=both_mask).chunk(2, dim=0)  # 2 x (B, L, V)
    return cfg_logits(cond, uncond, scale)
