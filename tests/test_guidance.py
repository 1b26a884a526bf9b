"""Unsupervised classifier-free guidance: the formula, the unconditional canvas and guided scoring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from smdm.evaluate.likelihood import mdm_chain_rule_loglikelihood, mdm_mc_loglikelihood
from smdm.guidance import cfg_logits, guided_logits, unconditional_canvas

DEVICE = torch.device("cpu")


def test_cfg_formula_on_logits_and_logprobs():
    generator = torch.Generator().manual_seed(0)
    cond = torch.randn(3, 5, 11, generator=generator)
    uncond = torch.randn(3, 5, 11, generator=generator)
    for w in (0.5, 1.0, -0.3, 2.0):
        expected = uncond + (w + 1) * (cond - uncond)
        assert torch.allclose(cfg_logits(cond, uncond, w), expected)
        from_logprobs = cfg_logits(F.log_softmax(cond, -1), F.log_softmax(uncond, -1), w)
        assert torch.allclose(F.log_softmax(from_logprobs, -1), F.log_softmax(expected, -1), atol=1e-5)


def test_zero_scale_is_identity():
    cond = torch.randn(2, 4, 7)
    uncond = torch.randn(2, 4, 7)
    assert cfg_logits(cond, uncond, 0.0) is cond


def test_unconditional_canvas_masks_prompt_only():
    canvas = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]])
    prompt = torch.tensor([[True, True, False, False, False], [True, False, False, False, False]])
    out = unconditional_canvas(canvas, prompt, mask_id=99)
    assert out.tolist() == [[99, 99, 7, 8, 9], [99, 2, 3, 4, 0]]
    assert canvas.tolist()[0] == [5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="shape"):
        unconditional_canvas(canvas, prompt[:, :3], mask_id=99)


def test_guided_logits_two_passes():
    model = tiny_model("mdm", vocab_size=19, block_size=16, seed=1).to(DEVICE)
    canvas = torch.tensor([[3, 4, 5, 19, 19, 19]])
    prompt = torch.tensor([[True, True, True, False, False, False]])
    with torch.no_grad():
        plain = model(canvas)
        assert torch.equal(guided_logits(model, canvas, prompt, 0.0), plain)
        uncond = model(torch.tensor([[19, 19, 19, 19, 19, 19]]))
        got = guided_logits(model, canvas, prompt, 1.5)
    assert torch.allclose(got, uncond + 2.5 * (plain - uncond), atol=1e-5)
    arm = tiny_model("arm", vocab_size=19, block_size=16).to(DEVICE)
    with pytest.raises(ValueError, match="needs an MDM"):
        guided_logits(arm, canvas.clamp(max=18), prompt, 1.0)


def test_guided_chain_rule_matches_manual():
    model = tiny_model("mdm", vocab_size=19, block_size=16, seed=2).to(DEVICE)
    context, continuation, w = [1, 2, 3], [4, 5], 0.8
    mask = model.config.mask_id
    expected = 0.0
    for i in range(len(continuation)):
        canvas = torch.tensor([context + continuation[:i] + [mask] * (len(continuation) - i)])
        uncond = torch.tensor([[mask] * len(context) + continuation[:i] + [mask] * (len(continuation) - i)])
        with torch.no_grad():
            logits = model(uncond)[0, 3 + i] + (w + 1) * (model(canvas)[0, 3 + i] - model(uncond)[0, 3 + i])
        expected += F.log_softmax(logits.double(), -1)[continuation[i]].item()
    got = mdm_chain_rule_loglikelihood(model, [(context, continuation)], cfg=w)[0]
    assert got == pytest.approx(expected, abs=1e-4)
    assert got != pytest.approx(mdm_chain_rule_loglikelihood(model, [(context, continuation)])[0], abs=1e-4)


def test_zero_scale_scoring_bit_identical():
    model = tiny_model("mdm", vocab_size=19, block_size=16, seed=2).to(DEVICE)
    requests = [([1, 2, 3], [4, 5, 6]), ([7], [8])]
    plain = mdm_mc_loglikelihood(model, requests, mc_samples=8, seed=3)
    assert mdm_mc_loglikelihood(model, requests, mc_samples=8, seed=3, cfg=0.0) == plain
    assert mdm_mc_loglikelihood(model, requests, mc_samples=8, seed=3, cfg=0.5) != plain


def test_guided_greedy_check_matches_manual():
    from smdm.evaluate.likelihood import mdm_greedy_check

    model = tiny_model("mdm", vocab_size=19, block_size=16, seed=4).to(DEVICE)
    context, n, w = [1, 2, 3], 3, 1.2
    mask = model.config.mask_id
    canvas = torch.tensor(context + [mask] * n)
    for _ in range(n):
        uncond = canvas.clone()
        uncond[: len(context)] = mask
        with torch.no_grad():
            logits = cfg_logits(model(canvas[None])[0], model(uncond[None])[0], w)
        confidence, proposal = logits.softmax(-1).max(-1)
        position = torch.where(canvas == mask, confidence, torch.tensor(-1.0)).argmax()
        canvas[position] = proposal[position]
    guided = canvas[len(context) :].tolist()
    assert mdm_greedy_check(model, [(context, guided)], cfg=w) == [True]
    wrong = [(guided[0] + 1) % 19] + guided[1:]
    assert mdm_greedy_check(model, [(context, wrong)], cfg=w) == [False]
