"""Likelihood estimators against exact enumeration and explicit single-request loops."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from smdm.evaluate.likelihood import (
    arm_loglikelihood,
    mdm_chain_rule_loglikelihood,
    mdm_greedy_check,
    mdm_mc_loglikelihood,
)

DEVICE = torch.device("cpu")


def exact_elbo(model, context: list[int], continuation: list[int]) -> float:
    """Enumerate every non-empty mask subset S of the continuation with its weight B(|S|, n - |S| + 1).

    With t ~ U(0, 1), mask probability t and weight 1 / t, a subset S has
    weight integral t^(|S| - 1) (1 - t)^(n - |S|) dt = (|S| - 1)! (n - |S|)! / n!.
    """
    n, c = len(continuation), len(context)
    total = 0.0
    for size in range(1, n + 1):
        weight = math.factorial(size - 1) * math.factorial(n - size) / math.factorial(n)
        for subset in itertools.combinations(range(n), size):
            canvas = torch.tensor(context + continuation)
            positions = torch.tensor([c + i for i in subset])
            canvas[positions] = model.config.mask_id
            with torch.no_grad():
                logp = F.log_softmax(model(canvas[None])[0].double(), dim=-1)  # (L, V)
            total += weight * logp[positions, torch.tensor(continuation)[list(subset)]].sum().item()
    return total


@pytest.fixture(scope="module")
def mdm():
    return tiny_model("mdm", vocab_size=23, block_size=32, seed=3).to(DEVICE)


@pytest.fixture(scope="module")
def arm():
    return tiny_model("arm", vocab_size=23, block_size=32, seed=4).to(DEVICE)


REQUESTS = [([1, 5, 7], [2, 9, 4]), ([3], [8, 8, 1, 6]), ([4, 4, 2, 11, 0], [13]), ([6, 2], [5, 1])]


@pytest.mark.parametrize("scheme", ["stratified", "reference", "balanced"])
def test_mc_elbo_converges_to_enumeration(mdm, scheme):
    for context, continuation in REQUESTS[:2]:
        exact = exact_elbo(mdm, context, continuation)
        estimates = [
            mdm_mc_loglikelihood(mdm, [(context, continuation)], mc_samples=256, scheme=scheme, seed=seed)[0]
            for seed in range(8)
        ]
        mean = sum(estimates) / len(estimates)
        spread = (sum((e - mean) ** 2 for e in estimates) / (len(estimates) - 1)) ** 0.5
        # The mean of 8 estimates lies within 4 standard errors of the exact expectation.
        assert abs(mean - exact) < 4 * spread / len(estimates) ** 0.5 + 1e-9, (scheme, exact, estimates)
        assert spread > 0


def test_stratified_scheme_exact_for_single_token(mdm):
    # With n = 1 every draw masks the only token with weight 1: the estimate is exact.
    context, continuation = REQUESTS[2]
    exact = exact_elbo(mdm, context, continuation)
    estimate = mdm_mc_loglikelihood(mdm, [(context, continuation)], mc_samples=3, scheme="stratified")[0]
    assert estimate == pytest.approx(exact, abs=1e-5)


def test_stratified_scheme_lowers_variance(mdm):
    context, continuation = REQUESTS[1]
    spreads = {}
    for scheme in ("stratified", "reference"):
        estimates = torch.tensor([
            mdm_mc_loglikelihood(mdm, [(context, continuation)], mc_samples=16, scheme=scheme, seed=seed)[0]
            for seed in range(24)
        ])
        spreads[scheme] = estimates.std().item()
    assert spreads["stratified"] < spreads["reference"]


def test_chain_rule_matches_explicit_loop(mdm):
    requests = REQUESTS
    got = mdm_chain_rule_loglikelihood(mdm, requests, batch_size=5)
    for (context, continuation), value in zip(requests, got):
        expected = 0.0
        c = len(context)
        for i in range(len(continuation)):
            canvas = torch.tensor(context + continuation)
            canvas[c + i :] = mdm.config.mask_id
            with torch.no_grad():
                logp = F.log_softmax(mdm(canvas[None])[0, c + i].double(), dim=-1)
            expected += logp[continuation[i]].item()
        assert value == pytest.approx(expected, abs=1e-4)


def greedy_unmask(model, context: list[int], n: int) -> list[int]:
    canvas = torch.tensor(context + [model.config.mask_id] * n)
    for _ in range(n):
        with torch.no_grad():
            probs = model(canvas[None])[0].softmax(dim=-1)
        confidence, proposal = probs.max(dim=-1)
        still = canvas == model.config.mask_id
        position = torch.where(still, confidence, torch.tensor(-1.0)).argmax()
        canvas[position] = proposal[position]
    return canvas[len(context) :].tolist()


def test_greedy_check_matches_explicit_unmasking(mdm):
    context = [1, 5, 7]
    greedy = greedy_unmask(mdm, context, 3)
    wrong = list(greedy)
    wrong[1] = (wrong[1] + 1) % mdm.config.vocab_size
    flags = mdm_greedy_check(mdm, [(context, greedy), (context, wrong), ([3, 3], greedy_unmask(mdm, [3, 3], 2))])
    assert flags == [True, False, True]


def test_batched_equals_one_at_a_time(mdm, arm):
    batched_arm = arm_loglikelihood(arm, REQUESTS, batch_size=3)
    single_arm = [arm_loglikelihood(arm, [r])[0] for r in REQUESTS]
    assert [score for score, _ in batched_arm] == pytest.approx([score for score, _ in single_arm], abs=1e-4)
    assert [greedy for _, greedy in batched_arm] == [greedy for _, greedy in single_arm]
    batched = mdm_mc_loglikelihood(mdm, REQUESTS, mc_samples=12, batch_size=7, seed=5)
    single = [mdm_mc_loglikelihood(mdm, [r], mc_samples=12, batch_size=3, seed=5)[0] for r in REQUESTS]
    assert batched == pytest.approx(single, abs=1e-4)
    batched_chain = mdm_chain_rule_loglikelihood(mdm, REQUESTS, batch_size=64)
    single_chain = [mdm_chain_rule_loglikelihood(mdm, [r])[0] for r in REQUESTS]
    assert batched_chain == pytest.approx(single_chain, abs=1e-4)
    assert mdm_greedy_check(mdm, REQUESTS) == [mdm_greedy_check(mdm, [r])[0] for r in REQUESTS]


def test_shared_draws_are_common_across_choices(mdm):
    context = [1, 5, 7]
    a, b = [2, 9, 4], [2, 9, 5]
    shared = mdm_mc_loglikelihood(mdm, [(context, a), (context, b)], mc_samples=4, seed=1)
    # Reversing the order gives the same numbers: draws depend on the request, not its index.
    assert mdm_mc_loglikelihood(mdm, [(context, b), (context, a)], mc_samples=4, seed=1) == shared[::-1]
    independent = mdm_mc_loglikelihood(mdm, [(context, a)], mc_samples=4, seed=1, share_draws=False)
    assert independent[0] != shared[0]


def test_arm_loglikelihood_exact_and_greedy(arm):
    requests = REQUESTS
    got = arm_loglikelihood(arm, requests, batch_size=3)
    for (context, continuation), (score, greedy) in zip(requests, got):
        tokens = torch.tensor(context + continuation)
        with torch.no_grad():
            logp = F.log_softmax(arm(tokens[None, :-1])[0].double(), dim=-1)
        c = len(context)
        rows = torch.arange(c - 1, len(tokens) - 1)
        expected = logp[rows, tokens[c:]].sum().item()
        assert score == pytest.approx(expected, abs=1e-4)
        assert greedy == bool((logp[rows].argmax(-1) == tokens[c:]).all())
    # A continuation built from the argmax chain is greedy.
    context = [1, 2]
    tokens = list(context)
    for _ in range(3):
        with torch.no_grad():
            tokens.append(int(arm(torch.tensor([tokens]))[0, -1].argmax()))
    assert arm_loglikelihood(arm, [(context, tokens[2:])])[0][1] is True


def test_bad_requests_raise(mdm, arm):
    with pytest.raises(ValueError, match="empty continuation"):
        mdm_mc_loglikelihood(mdm, [([1], [])])
    with pytest.raises(ValueError, match="does not fit"):
        mdm_chain_rule_loglikelihood(mdm, [([1], [2] * 40)])
    with pytest.raises(ValueError, match="unknown Monte Carlo scheme"):
        mdm_mc_loglikelihood(mdm, [([1], [2])], scheme="antithetic")
    with pytest.raises(ValueError, match="needs an MDM"):
        mdm_mc_loglikelihood(arm, [([1], [2])])
    with pytest.raises(ValueError, match="needs an ARM"):
        arm_loglikelihood(mdm, [([1], [2])])
    with pytest.raises(ValueError, match="at least one token"):
        arm_loglikelihood(arm, [([], [2])])


def test_long_context_truncated_from_left(mdm):
    long_context = list(range(1, 20)) * 2  # 38 tokens, block_size 32
    continuation = [3, 4]
    kept = long_context[-30:]
    assert mdm_chain_rule_loglikelihood(mdm, [(long_context, continuation)]) == pytest.approx(
        mdm_chain_rule_loglikelihood(mdm, [(kept, continuation)]), abs=1e-6
    )


def test_balanced_draws_cover_positions_evenly():
    from smdm.evaluate.likelihood import _mask_draws

    draws = list(_mask_draws("balanced", 4, 40, 32, torch.Generator().manual_seed(0)))
    sizes = [len(positions) for positions, _ in draws]
    # Stratified counts: each m in 1..4 appears K / n = 10 times, with weight n / m.
    assert sorted(sizes) == sorted([1, 2, 3, 4] * 10)
    assert all(weight == pytest.approx(4 / len(positions)) for positions, weight in draws)
    counts = torch.zeros(4)
    for positions, _ in draws:
        counts[positions] += 1
    # 100 masked slots tile the permuted positions 25 times over.
    assert counts.tolist() == [25.0] * 4
