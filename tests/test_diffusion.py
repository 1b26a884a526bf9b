"""The MDM and ARM objectives against direct transcriptions of their formulas."""

from __future__ import annotations

import math

import torch

from conftest import tiny_model
from smdm.diffusion import apply_mask, arm_loss, masking_probability, mdm_loss, stratified_times


def test_mdm_loss_matches_formula_on_fixed_mask():
    model = tiny_model("mdm", vocab_size=31)
    rng = torch.Generator().manual_seed(3)
    x = torch.randint(0, 31, (3, 10), generator=rng)
    t = torch.tensor([0.2, 0.55, 0.9])
    noise = torch.rand(3, 10, generator=rng)
    eps = 1e-3
    with torch.no_grad():
        loss = mdm_loss(model, x, t, noise, model.config.mask_id, eps).item()

        # Direct computation: mask where noise < p, full logits, log-softmax by hand, weight 1 / p.
        expected = 0.0
        for b in range(3):
            p = (1 - eps) * t[b].item() + eps
            noisy = x[b].clone()
            masked = [l for l in range(10) if noise[b, l].item() < p]
            noisy[masked] = model.config.mask_id
            logits = model(noisy[None])[0].double()
            for l in masked:
                log_z = math.log(sum(math.exp(v) for v in logits[l].tolist()))
                expected += (log_z - logits[l, x[b, l]].item()) / p
        expected /= 3 * 10
    assert abs(loss - expected) < 1e-5


def test_apply_mask_below_noise_threshold():
    x = torch.arange(8)[None]
    noise = torch.tensor([[0.1, 0.9, 0.3, 0.7, 0.5, 0.05, 0.95, 0.45]])
    noisy, mask = apply_mask(x, torch.tensor([[0.5]]), 99, noise)
    assert mask.tolist() == [[True, False, True, False, False, True, False, True]]
    assert noisy.tolist() == [[99, 1, 99, 3, 4, 99, 6, 99]]


def test_masking_probability_bounds():
    p = masking_probability(torch.tensor([0.0, 1.0], dtype=torch.float64), 1e-3)
    assert p.tolist() == [1e-3, 1.0]


def test_arm_loss_is_mean_next_token_cross_entropy():
    model = tiny_model("arm", vocab_size=23)
    x = torch.randint(0, 23, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        loss = arm_loss(model, x).item()
        logits = model(x[:, :-1]).double()
        log_probs = logits.log_softmax(-1).gather(-1, x[:, 1:, None]).squeeze(-1)
    assert abs(loss + log_probs.mean().item()) < 1e-6


def test_stratified_times_cover_unit_interval():
    t = stratified_times(8, torch.Generator().manual_seed(0))
    gaps = torch.diff(torch.sort(t).values)
    assert torch.allclose(gaps, torch.full_like(gaps, 1 / 8), atol=1e-12)
    assert ((t > 0) & (t < 1)).all()
