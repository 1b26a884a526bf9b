"""Log-likelihood of a continuation given a context, for MDMs and ARMs, over batches of requests.

Shape legend: R requests, N rows (one canvas per Monte Carlo draw or per
chain-rule step), L canvas length, V vocabulary, M selected positions.

A request is a pair (context ids, continuation ids). Every estimator here
scores many requests at once. Their rows are sorted by length, padded on the
right and run in batches of `batch_size` canvases. The result equals scoring
each request alone with the same seed, because the random draws of a request
are keyed by its tokens, not by its place in the batch.

MDM estimators follow "Scaling up Masked Diffusion Models on Text" (Nie et
al., arXiv 2410.18514) with the linear schedule alpha_t = 1 - t:

- Monte Carlo ELBO: only the continuation y (length n) is masked, and
  log p(y | c) >= E_t [ (1 / t) sum_{i masked} log p(y_i | c, y_t) ] with each
  token masked independently with probability t. Summed over mask subsets S
  this is sum_S B(|S|, n - |S| + 1) sum_{i in S} log p(y_i | c, y_{not S}),
  B the beta function.
- Chain rule: n forwards, forward i masks positions i..n-1 of y and reads
  position i; exact for the left-to-right factorisation.
- Greedy check: start fully masked, fill the single most confident masked
  position with its argmax at each step, compare the result with y.

An ARM's log-likelihood is exact: the sum of next-token log-probabilities.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from smdm.guidance import cfg_logits, unconditional_canvas
from smdm.model import Transformer
from smdm.runtime import derived_seed

Request = tuple[Sequence[int], Sequence[int]]

# "reference": per mini-batch of b draws, t_i = (u + i / b) mod 1 with a fresh
# u, independent Bernoulli(t_i) masks and weight 1 / t_i, as in the paper's
# evaluation code. "stratified": the number of masked tokens m is stratified
# over all K draws, m_k = 1 + floor(n ((u + k / K) mod 1)), the m positions are
# a uniform random subset and the weight is n / m. Both have the same
# expectation (the ELBO above); the second never weighs a draw by more than n.
# "balanced": stratified counts, and the masked positions of successive draws are
# consecutive windows of one random permutation of the n positions, wrapping
# around, so every position is masked about equally often. Each window of a
# uniform permutation is a uniform subset, so the expectation is unchanged.
MC_SCHEMES = ("balanced", "stratified", "reference")


def _fingerprint(*parts: Sequence[int] | int | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, (int, str)):
            digest.update(f"{part}|".encode())
        else:
            digest.update(torch.tensor(list(part), dtype=torch.int64).numpy().tobytes())
            digest.update(b"/")
    return digest.hexdigest()


def truncate_request(context: Sequence[int], continuation: Sequence[int], max_len: int) -> tuple[list[int], list[int]]:
    """Cut the context from the left so that context + continuation fits in max_len tokens."""
    context, continuation = list(context), list(continuation)
    if not continuation:
        raise ValueError("a request has an empty continuation; there is nothing to score")
    if len(continuation) > max_len:
        raise ValueError(
            f"a continuation of {len(continuation)} tokens does not fit the model's context of {max_len} tokens; "
            "score it with loglikelihood_rolling (corpus mode) instead"
        )
    keep = max_len - len(continuation)
    return context[len(context) - keep :] if len(context) > keep else context, continuation


def _key_padding_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Boolean attention mask (N, 1, 1, width): True where a key lies inside its row."""
    positions = torch.arange(width, device=lengths.device)
    return (positions[None, :] < lengths[:, None])[:, None, None, :]


def _selected_logprobs(
    model: Transformer,
    canvas: torch.Tensor,
    lengths: torch.Tensor,
    prompt_mask: torch.Tensor,
    select: torch.Tensor,
    targets: torch.Tensor,
    cfg: float,
) -> torch.Tensor:
    """Log-probabilities (M,) of targets (N, L) at the selected positions (N, L) of MDM canvases (N, L).

    The output head runs only at the selected positions. With cfg != 0 the
    unconditional canvases (prompt positions masked) run in the same batch and
    the logits are combined before the softmax.
    """
    width = canvas.size(1)
    uniform = bool((lengths == width).all())
    attn_mask = None if uniform else _key_padding_mask(lengths, width)
    if cfg == 0:
        hidden = model(canvas, attn_mask=attn_mask, return_hidden=True)  # (N, L, D)
        logits = model.lm_head(hidden[select]).float()  # (M, V)
    else:
        uncond = unconditional_canvas(canvas, prompt_mask, model.config.mask_id)
        both_mask = None if attn_mask is None else torch.cat([attn_mask, attn_mask])
        hidden = model(torch.cat([canvas, uncond]), attn_mask=both_mask, return_hidden=True)  # (2N, L, D)
        cond_hidden, uncond_hidden = hidden.chunk(2)
        logits = cfg_logits(
            model.lm_head(cond_hidden[select]).float(), model.lm_head(uncond_hidden[select]).float(), cfg
        )  # (M, V)
    return -F.cross_entropy(logits, targets[select], reduction="none")  # (M,)


class _Rows:
    """Canvases of one kind of estimator, built per request and run in length-sorted batches."""

    def __init__(self) -> None:
        self.request: list[int] = []
        self.tokens: list[list[int]] = []
        self.prompt_len: list[int] = []
        self.select: list[list[int]] = []  # positions to score
        self.masked: list[list[int]] = []  # positions replaced by the mask id
        self.weight: list[float] = []

    def add(self, request: int, tokens: list[int], prompt_len: int, masked: list[int], select: list[int],
            weight: float) -> None:
        self.request.append(request)
        self.tokens.append(tokens)
        self.prompt_len.append(prompt_len)
        self.masked.append(masked)
        self.select.append(select)
        self.weight.append(weight)

    def batches(self, batch_size: int) -> Iterator[list[int]]:
        order = sorted(range(len(self.tokens)), key=lambda i: -len(self.tokens[i]))
        for start in range(0, len(order), batch_size):
            yield order[start : start + batch_size]


@torch.no_grad()
def _run_mdm_rows(model: Transformer, rows: _Rows, n_requests: int, batch_size: int, cfg: float) -> torch.Tensor:
    """Return per-request sums (R,) of weight * log p(target) over each row's selected positions, in float64."""
    device = model.lm_head.weight.device
    mask_id = model.config.mask_id
    totals = torch.zeros(n_requests, dtype=torch.float64)
    for batch in rows.batches(batch_size):
        width = max(len(rows.tokens[i]) for i in batch)
        targets = torch.zeros(len(batch), width, dtype=torch.long)
        masked = torch.zeros(len(batch), width, dtype=torch.bool)
        select = torch.zeros(len(batch), width, dtype=torch.bool)
        prompt = torch.zeros(len(batch), width, dtype=torch.bool)
        for j, i in enumerate(batch):
            targets[j, : len(rows.tokens[i])] = torch.tensor(rows.tokens[i])
            masked[j, rows.masked[i]] = True
            select[j, rows.select[i]] = True
            prompt[j, : rows.prompt_len[i]] = True
        lengths = torch.tensor([len(rows.tokens[i]) for i in batch])
        canvas = targets.masked_fill(masked, mask_id)
        logp = _selected_logprobs(
            model, canvas.to(device), lengths.to(device), prompt.to(device), select.to(device), targets.to(device), cfg
        ).double().cpu()  # (M,) row-major over the selected positions
        row_of = torch.arange(len(batch))[:, None].expand(-1, width)[select]  # (M,)
        weights = torch.tensor([rows.weight[i] for i in batch], dtype=torch.float64)
        per_row = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, row_of, logp) * weights
        totals.index_add_(0, torch.tensor([rows.request[i] for i in batch]), per_row)
    return totals


def _check_mdm(model: Transformer, what: str) -> None:
    if model.config.mask_id is None:
        raise ValueError(f"{what} needs an MDM checkpoint; score an ARM with arm_loglikelihood")


def _mask_draws(
    scheme: str, n: int, mc_samples: int, mc_batch: int, generator: torch.Generator
) -> Iterator[tuple[list[int], float]]:
    """Yield mc_samples (masked positions, weight) draws over a continuation of n tokens."""
    if scheme == "reference":
        for start in range(0, mc_samples, mc_batch):
            b = min(mc_batch, mc_samples - start)
            u = torch.rand((), generator=generator, dtype=torch.float64)
            times = (u + torch.arange(b, dtype=torch.float64) / b) % 1.0  # (b,) stratified within the mini-batch
            noise = torch.rand(b, n, generator=generator, dtype=torch.float64)
            for t, row in zip(times.tolist(), noise):
                positions = torch.nonzero(row < t).flatten().tolist()
                # A draw that masks nothing adds 0 to the sum; t = 0 masks nothing, so 1 / t never meets a token.
                yield positions, (1.0 / t if positions else 0.0)
    elif scheme in ("stratified", "balanced"):
        u = torch.rand((), generator=generator, dtype=torch.float64)
        levels = (u + torch.arange(mc_samples, dtype=torch.float64) / mc_samples) % 1.0  # (K,)
        counts = (levels * n).floor().long().clamp(max=n - 1) + 1  # (K,) each m in 1..n about K / n times
        circle = torch.randperm(n, generator=generator).tolist() * 2  # windows of length <= n never run off
        offset = 0
        for m in counts.tolist():
            if scheme == "balanced":
                positions = sorted(circle[offset : offset + m])
                offset = (offset + m) % n
            else:
                positions = torch.randperm(n, generator=generator)[:m].sort().values.tolist()
            yield positions, n / m
    else:
        raise ValueError(f"unknown Monte Carlo scheme {scheme!r}; choose one of {MC_SCHEMES}")


def mdm_mc_loglikelihood(
    model: Transformer,
    requests: Sequence[Request],
    *,
    mc_samples: int = 128,
    batch_size: int = 64,
    mc_batch: int = 32,
    scheme: str = "balanced",
    share_draws: bool = True,
    cfg: float = 0.0,
    seed: int = 0,
) -> list[float]:
    """Estimate a lower bound on log p(continuation | context) for each request with mc_samples draws.

    Implements the Monte Carlo ELBO of the module docstring (Nie et al.,
    arXiv 2410.18514, likelihood evaluation of masked diffusion models).
    Only the continuation is masked, never the prompt. The result is the
    average over draws of the weighted sum of the log-probabilities of the
    masked continuation tokens, so it is summed over tokens, not averaged.

    scheme: "balanced" (default, the lowest variance measured), "stratified" or "reference".
    mc_batch: draws per stratified mini-batch of the "reference" scheme (the
    paper's b); the "stratified" scheme stratifies over all draws.
    batch_size: canvases per forward pass, across requests.
    share_draws: key the draws by (seed, context) only, so the answer choices
    of one question share their random numbers: the same stratification
    offset (hence the same masked fraction per draw) and, for answers of
    equal length, the same masked positions. Their differences, which decide
    the accuracy, then have less noise. Otherwise keyed by the whole request.
    cfg: guidance scale w (0 = none); each draw then costs two forward rows.
    """
    _check_mdm(model, "the Monte Carlo ELBO")
    if mc_samples <= 0 or batch_size <= 0 or mc_batch <= 0:
        raise ValueError(f"mc_samples={mc_samples}, batch_size={batch_size} and mc_batch={mc_batch} must be positive")
    block = model.config.block_size
    rows = _Rows()
    for index, (context, continuation) in enumerate(requests):
        context, continuation = truncate_request(context, continuation, block)
        c, n = len(context), len(continuation)
        key = (context,) if share_draws else (context, continuation)
        rng = torch.Generator().manual_seed(derived_seed(seed, scheme, mc_batch, _fingerprint(*key)))
        tokens = context + continuation
        for positions, weight in _mask_draws(scheme, n, mc_samples, mc_batch, rng):
            if positions:
                shifted = [c + p for p in positions]
                rows.add(index, tokens, c, shifted, shifted, weight)
    return (_run_mdm_rows(model, rows, len(requests), batch_size, cfg) / mc_samples).tolist()


def mdm_chain_rule_loglikelihood(
    model: Transformer, requests: Sequence[Request], *, batch_size: int = 64, cfg: float = 0.0
) -> list[float]:
    """Return log p(continuation | context) of the left-to-right factorisation, one forward per token.

    Forward i masks continuation positions i..n-1 and reads the distribution
    at position i: log p(y | c) = sum_i log p(y_i | c, y_{<i}), exact for that
    order (Nie et al., arXiv 2410.18514, chain-rule likelihood).
    """
    _check_mdm(model, "the chain-rule likelihood")
    rows = _Rows()
    for index, (context, continuation) in enumerate(requests):
        context, continuation = truncate_request(context, continuation, model.config.block_size)
        c, n = len(context), len(continuation)
        for i in range(n):
            rows.add(index, context + continuation, c, list(range(c + i, c + n)), [c + i], 1.0)
    return _run_mdm_rows(model, rows, len(requests), batch_size, cfg).tolist()


@torch.no_grad()
def mdm_greedy_check(
    model: Transformer, requests: Sequence[Request], *, batch_size: int = 64, cfg: float = 0.0
) -> list[bool]:
    """Return whether greedy unmasking of each continuation reproduces it exactly.

    The continuation starts fully masked; each step fills the single most
    confident masked position with its argmax, n steps for n tokens.
    """
    _check_mdm(model, "the greedy check")
    device = model.lm_head.weight.device
    mask_id = model.config.mask_id
    prepared = [truncate_request(c, y, model.config.block_size) for c, y in requests]
    order = sorted(range(len(prepared)), key=lambda i: -sum(map(len, prepared[i])))
    result = [False] * len(prepared)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(sum(map(len, prepared[i])) for i in batch)
        targets = torch.zeros(len(batch), width, dtype=torch.long)
        todo = torch.zeros(len(batch), width, dtype=torch.bool)  # continuation positions still masked
        prompt = torch.zeros(len(batch), width, dtype=torch.bool)
        for j, i in enumerate(batch):
            context, continuation = prepared[i]
            targets[j, : len(context) + len(continuation)] = torch.tensor(context + continuation)
            todo[j, len(context) : len(context) + len(continuation)] = True
            prompt[j, : len(context)] = True
        lengths = torch.tensor([sum(map(len, prepared[i])) for i in batch])
        targets, todo, prompt, lengths = targets.to(device), todo.to(device), prompt.to(device), lengths.to(device)
        attn_mask = None if bool((lengths == width).all()) else _key_padding_mask(lengths, width)
        canvas = targets.masked_fill(todo, mask_id)
        while todo.any():
            active = torch.nonzero(todo.any(dim=1)).flatten()  # (B',) rows with masked positions left
            row_mask = None if attn_mask is None else attn_mask[active]
            still = todo[active]  # (B', L)
            # The output head runs only at the masked positions, which keeps large vocabularies cheap.
            logits = model.lm_head(model(canvas[active], attn_mask=row_mask, return_hidden=True)[still]).float()
            if cfg != 0:
                uncond = unconditional_canvas(canvas[active], prompt[active], mask_id)
                uncond_hidden = model(uncond, attn_mask=row_mask, return_hidden=True)[still]
                logits = cfg_logits(logits, model.lm_head(uncond_hidden).float(), cfg)  # (M, V)
            top_prob, top_token = logits.softmax(dim=-1).max(dim=-1)  # (M,) each
            confidence = torch.full(still.shape, -1.0, device=device).masked_scatter(still, top_prob)  # (B', L)
            proposal = torch.zeros(still.shape, dtype=torch.long, device=device).masked_scatter(still, top_token)
            best = confidence.argmax(dim=1)  # (B',) one position per row
            picked = torch.arange(len(active), device=device)
            canvas[active, best] = proposal[picked, best]
            todo[active, best] = False
        for j, i in enumerate(batch):
            result[i] = bool((canvas[j] == targets[j]).all())
    return result


@torch.no_grad()
def arm_loglikelihood(
    model: Transformer, requests: Sequence[Request], *, batch_size: int = 64
) -> list[tuple[float, bool]]:
    """Return the exact log p(continuation | context) of an ARM and whether greedy decoding reproduces it.

    The context must hold at least one token (the ARM predicts token i from
    tokens before it); pass the EOS token for an empty context.
    """
    if model.config.is_mdm:
        raise ValueError("arm_loglikelihood needs an ARM checkpoint; score an MDM with mdm_mc_loglikelihood")
    device = model.lm_head.weight.device
    prepared = []
    for context, continuation in requests:
        if not context:
            raise ValueError("an ARM needs a context of at least one token; use the EOS token for an empty context")
        # The model reads block_size tokens and predicts the next one, so a row holds block_size + 1 tokens.
        context, continuation = truncate_request(context, continuation, model.config.block_size + 1)
        if not context:
            raise ValueError(f"a continuation of {len(continuation)} tokens leaves no context in block_size + 1 tokens")
        prepared.append(context + continuation)
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i]))
    result: list[tuple[float, bool]] = [(0.0, False)] * len(prepared)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(prepared[i]) for i in batch) - 1
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        for j, i in enumerate(batch):
            inputs[j, : len(prepared[i]) - 1] = torch.tensor(prepared[i][:-1])
        # Right padding needs no attention mask: causal attention never lets a real token see a pad.
        hidden = model(inputs.to(device), return_hidden=True)  # (B, L, D)
        for j, i in enumerate(batch):
            n = len(requests[i][1])
            end = len(prepared[i]) - 1
            target = torch.tensor(prepared[i][-n:])
            # The head runs only where the continuation is predicted: (n, V) log-probabilities.
            window = F.log_softmax(model.lm_head(hidden[j, end - n : end]).double(), dim=-1).cpu()
            score = window.gather(-1, target[:, None]).sum().item()
            result[i] = (score, bool((window.argmax(dim=-1) == target).all()))
    return result
