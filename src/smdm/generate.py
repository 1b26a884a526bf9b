"""Sampling: MDM reverse-process samplers and KV-cached ARM decoding, for batches of prompts.

Shape legend: B batch, P longest prompt, G new tokens, S longest infill suffix,
L = P + G + S canvas length, W block length, V vocabulary, D width.

MDM samplers follow "Scaling up Masked Diffusion Models on Text" (Nie et al.,
arXiv 2410.18514) with the linear schedule alpha_t = 1 - t: the canvas starts
as the prompt followed by G mask tokens, and the forward passes walk the time
grid from t = 1 down to 0. The later extensions are semi-autoregressive blocks
and low-confidence remasking (LLaDA, Nie et al., arXiv 2502.09992), confidence
threshold parallel decoding and approximate prefix and dual KV caches
(Fast-dLLM, Wu et al., arXiv 2505.22618).

Batch layout: prompts are left-padded so that every row's masked region starts
at the same column; infill suffixes follow the masked region and are
right-padded. Each row gets its own RoPE positions (0 at its first real token)
and an attention mask that hides pad columns, so a row computes what it would
compute alone. Pad columns hold a real token id, never the mask id. Every row
draws its noise from its own generator. With the same row seed, a row therefore
gets the same tokens alone or in any batch, up to float rounding of the batched
matmuls: the tokens differ only where two logits tie to within that rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from smdm.guidance import cfg_logits
from smdm.model import KVCache, Transformer
from smdm.runtime import derived_seed

SAMPLERS = ("random", "low_confidence", "threshold")
CACHE_MODES = ("auto", "none", "prefix", "dual")
# An ARM checks stop strings every this many tokens, because decoding the rows costs more than a step.
STOP_STRING_CHECK_INTERVAL = 8


@dataclass
class SampleConfig:
    """Settings shared by the MDM samplers and ARM decoding."""

    max_new_tokens: int = 64
    steps: int = 64
    """MDM forward passes (an upper bound for "threshold"); ignored by an ARM, which takes one per token."""
    temperature: float = 1.0
    """Softmax temperature; 0 picks the argmax (greedy)."""
    sampler: str = "random"
    """MDM remasking rule: "random" (the true reverse process), "low_confidence" or "threshold"."""
    block_length: int = 0
    """Semi-autoregressive block length in tokens (MDM); 0 decodes all new tokens as one block."""
    threshold: float = 0.9
    """"threshold" sampler: reveal every masked token whose confidence exceeds this, at least one per step."""
    cfg: float = 0.0
    """Unsupervised classifier-free guidance scale w (MDM); 0 is no guidance."""
    cache: str = "auto"
    """KV cache: "auto" (ARM: cached, MDM: none), "none", or for an MDM "prefix" or "dual" (approximate)."""
    stop_at_eos: bool = True
    """Cut each row at its first EOS and stop once every row has one."""
    min_new_tokens: int = 0
    """EOS cannot be chosen before this many new tokens."""
    stop_strings: tuple[str, ...] = field(default_factory=tuple)
    """Text that ends a row (cut before it); needs a decoder, see `generate`."""
    seed: int = 0

    def __post_init__(self) -> None:
        self.stop_strings = tuple(self.stop_strings)
        problems = []
        if self.max_new_tokens <= 0:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be positive")
        if self.steps <= 0:
            problems.append(f"steps={self.steps} must be positive")
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} must be >= 0")
        if self.sampler not in SAMPLERS:
            problems.append(f"sampler={self.sampler!r} is invalid; choose one of {SAMPLERS}")
        if self.cache not in CACHE_MODES:
            problems.append(f"cache={self.cache!r} is invalid; choose one of {CACHE_MODES}")
        if self.block_length < 0:
            problems.append(f"block_length={self.block_length} must be >= 0 (0: one block)")
        elif self.block_length and self.max_new_tokens % self.block_length:
            problems.append(
                f"max_new_tokens={self.max_new_tokens} is not a multiple of block_length={self.block_length}; "
                "change --block-length or --max-new-tokens"
            )
        elif self.steps < self.num_blocks:
            problems.append(f"steps={self.steps} is fewer than the {self.num_blocks} blocks; raise --steps")
        if not 0.0 <= self.threshold <= 1.0:
            problems.append(f"threshold={self.threshold} must lie in [0, 1]")
        if self.cfg < 0:
            problems.append(f"cfg={self.cfg} must be >= 0")
        if self.min_new_tokens < 0:
            problems.append(f"min_new_tokens={self.min_new_tokens} must be >= 0")
        if any(not s for s in self.stop_strings):
            problems.append("stop_strings must not contain an empty string")
        if problems:
            raise ValueError("invalid sampling config: " + "; ".join(problems))

    @property
    def num_blocks(self) -> int:
        return self.max_new_tokens // (self.block_length or self.max_new_tokens)

    def steps_per_block(self) -> list[int]:
        """Split `steps` over the blocks; the first blocks take one more when it does not divide."""
        base, extra = divmod(self.steps, self.num_blocks)
        return [base + (1 if b < extra else 0) for b in range(self.num_blocks)]


def gumbel_max(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """Sample argmax(l / tau + Gumbel) in float64, i.e. a draw from softmax(l / tau); tau = 0 is greedy.

    Float64 matters: with float32 or lower, Gumbel noise of rare tokens is
    rounded and sampling measurably deviates from softmax(l / tau) (Zheng et
    al., arXiv 2409.02908, on truncation in masked diffusion sampling).
    The noise is drawn on the generator's device.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=generator.device)
    return _gumbel_argmax(logits, temperature, uniform.to(logits.device))


def _gumbel_argmax(logits: torch.Tensor, temperature: float, uniform: torch.Tensor) -> torch.Tensor:
    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-300)))
    return (logits.double() / temperature + gumbel).argmax(dim=-1)


def gumbel_max_rows(
    logits: torch.Tensor, per_row: Sequence[int], temperature: float, gens: Sequence[torch.Generator]
) -> torch.Tensor:
    """Run gumbel_max on consecutive chunks of logits (N, V), chunk i of per_row[i] rows with generator i.

    The result equals one gumbel_max call per chunk; only the uniform draws are
    made per chunk, and the float64 arithmetic runs once over all rows.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    V = logits.size(-1)
    draws = [torch.rand((n, V), generator=gen, dtype=torch.float64, device=gen.device)
             for n, gen in zip(per_row, gens) if n]
    if not draws:
        return logits.argmax(dim=-1)
    return _gumbel_argmax(logits, temperature, torch.cat(draws).to(logits.device))


# Batch layout.
@dataclass
class Canvas:
    """A left-padded batch: tokens, per-row RoPE positions and which columns are real."""

    tokens: torch.Tensor  # (B, L) token ids; pad columns hold pad_id
    positions: torch.Tensor  # (B, L) RoPE position of each column; 0 on pads
    real: torch.Tensor  # (B, L) bool, False on pad columns
    condition: torch.Tensor  # (B, L) bool, True on prompt and suffix tokens
    start: int  # first column of the new tokens, the same for every row

    @property
    def padded(self) -> bool:
        return not bool(self.real.all())


def as_rows(prompts: torch.Tensor | Sequence[Sequence[int]]) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"prompt tensor must be (batch, length), got shape {tuple(prompts.shape)}")
        return prompts.tolist()
    return [list(map(int, row)) for row in prompts]


def build_canvas(
    prompts: list[list[int]],
    new_tokens: int,
    fill_id: int,
    pad_id: int,
    device: torch.device,
    suffixes: list[list[int]] | None = None,
) -> Canvas:
    """Lay out [pads, prompt, new_tokens x fill_id, suffix, pads] per row; positions count from the prompt."""
    B = len(prompts)
    suffixes = suffixes or [[] for _ in range(B)]
    P = max(len(p) for p in prompts)
    S = max(len(s) for s in suffixes)
    L = P + new_tokens + S
    tokens = torch.full((B, L), pad_id, dtype=torch.long)
    real = torch.zeros(B, L, dtype=torch.bool)
    condition = torch.zeros(B, L, dtype=torch.bool)
    positions = torch.zeros(B, L, dtype=torch.long)
    for i, (prompt, suffix) in enumerate(zip(prompts, suffixes)):
        offset = P - len(prompt)
        end = P + new_tokens + len(suffix)
        tokens[i, offset:P] = torch.tensor(prompt, dtype=torch.long)
        tokens[i, P : P + new_tokens] = fill_id
        tokens[i, P + new_tokens : end] = torch.tensor(suffix, dtype=torch.long)
        real[i, offset:end] = True
        condition[i, offset:P] = True
        condition[i, P + new_tokens : end] = True
        positions[i, offset:end] = torch.arange(end - offset)
    return Canvas(tokens.to(device), positions.to(device), real.to(device), condition.to(device), P)


def check_lengths(model: Transformer, prompts: list[list[int]], suffixes: list[list[int]] | None, new: int) -> None:
    limit = model.config.block_size
    suffixes = suffixes or [[] for _ in prompts]
    if len(suffixes) != len(prompts):
        raise ValueError(f"got {len(suffixes)} suffixes for {len(prompts)} prompts; give one suffix per prompt")
    for index, (prompt, suffix) in enumerate(zip(prompts, suffixes)):
        total = len(prompt) + new + len(suffix)
        if total > limit:
            room = limit - len(prompt) - len(suffix)
            fix = (
                f"lower --max-new-tokens to {room} or shorten the prompt"
                if room > 0
                else f"shorten the prompt and suffix to at most {limit - 1} tokens together"
            )
            raise ValueError(
                f"prompt {index} has {len(prompt)} tokens; with a suffix of {len(suffix)} and max_new_tokens={new} "
                f"that makes {total}, more than the model's context of {limit}; {fix}"
            )


def default_pad_id(pad_id: int | None, eos_id: int | None) -> int:
    """Pick the pad id: the one given, else EOS, else 0 (any real id works, because pads are never attended)."""
    if pad_id is not None:
        return pad_id
    if eos_id is not None:
        return eos_id
    return 0


def row_generators(seeds: Sequence[int], base_seed: int, device: torch.device) -> list[torch.Generator]:
    """One generator per row, keyed by (seed, row seed), so a row's noise does not depend on its neighbours."""
    gens = []
    for row_seed in seeds:
        gen = torch.Generator(device=device)
        gen.manual_seed(derived_seed("sample", base_seed, row_seed))
        gens.append(gen)
    return gens


# MDM sampling.
class _Denoiser:
    """Network passes over a canvas for one block: hidden states, then guided logits, with optional KV caching.

    Caching (approximate, as in Fast-dLLM): the first step of each block runs the
    whole canvas and stores keys and values. "prefix" then reruns only the block
    and everything after it against the stored prefix. "dual" reruns only the
    block against the stored prefix and suffix. For "dual" the canvas columns are
    reordered to [prefix, suffix, block]. Attention is bidirectional and positions
    are explicit, so column order does not change the result, and the block then
    lands at the end of the cache, where the model's KVCache appends.
    """

    def __init__(self, model: Transformer, canvas: Canvas, config: SampleConfig) -> None:
        self.model = model
        self.config = config
        self.mode = "none" if config.cache == "auto" else config.cache
        self.guided = config.cfg > 0
        self.mask_id = model.config.mask_id
        self.real = canvas.real
        self.positions = canvas.positions
        self.condition = canvas.condition
        if self.guided:  # the unconditional half: same canvas, the condition replaced by the mask
            self.real = torch.cat([self.real, self.real])
            self.positions = torch.cat([self.positions, self.positions])
        self.cache: KVCache | None = None
        if self.mode != "none":
            self.cache = model.new_cache(self.real.size(0), self.real.size(1))

    def _expand(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.guided:
            return tokens
        return torch.cat([tokens, tokens.masked_fill(self.condition, self.mask_id)])  # (2B, L)

    def logits_at(self, hidden: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
        """Return float32 logits (N, V) at the N selected block positions (B, W), in row-major order.

        Only positions that can be revealed go through the output head, because it
        is as wide as the vocabulary and takes a large share of a small model's step.
        """
        if not self.guided:
            return self.model.lm_head(hidden[select]).float()
        B = select.size(0)
        conditional = self.model.lm_head(hidden[:B][select]).float()
        unconditional = self.model.lm_head(hidden[B:][select]).float()
        return cfg_logits(conditional, unconditional, self.config.cfg)

    def __call__(self, tokens: torch.Tensor, lo: int, hi: int, first: bool) -> torch.Tensor:
        """Return the final hidden states (B or 2B, W, D) of block columns [lo, hi) for the canvas tokens (B, L)."""
        x = self._expand(tokens)
        padded = not bool(self.real.all())
        L = x.size(1)
        if self.mode == "none":
            mask = self.real[:, None, None, :] if padded else None
            hidden = self.model(x, positions=self.positions, attn_mask=mask, return_hidden=True)
            return hidden[:, lo:hi]
        order = torch.arange(L, device=x.device)
        if self.mode == "dual":
            order = torch.cat([order[:lo], order[hi:], order[lo:hi]])
        mask = self.real[:, order][:, None, None, :] if padded else None  # (B, 1, 1, L) over cache keys
        cache = self.cache
        if first:  # refresh the whole cache at the start of a block
            cache.length = 0
            hidden = self.model(x[:, order], positions=self.positions[:, order], attn_mask=mask, cache=cache,
                                return_hidden=True)
            return hidden[:, L - (hi - lo) :] if self.mode == "dual" else hidden[:, lo:hi]
        cache.length = L - (hi - lo) if self.mode == "dual" else lo
        columns = order[cache.length :]
        hidden = self.model(x[:, columns], positions=self.positions[:, columns], attn_mask=mask, cache=cache,
                            return_hidden=True)
        return hidden[:, : hi - lo]


def reveal_counts(masked_at_start: torch.Tensor, masked_now: torch.Tensor, step: int, steps: int) -> torch.Tensor:
    """Per-row number of tokens to reveal at `step` of `steps` so the masked count follows the linear schedule.

    With M masked tokens at the start of the block, at most floor(M s) may stay
    masked after the step that ends at time s = 1 - (step + 1) / steps (alpha_s = 1 - s).
    """
    allowed = (masked_at_start * (steps - step - 1)) // steps  # (B,) integer floor(M s)
    return (masked_now - allowed).clamp_min(0)


def _scatter(select: torch.Tensor, values: torch.Tensor, fill: float | int) -> torch.Tensor:
    """Place values (N,) at the selected positions of a (B, W) tensor filled with `fill`."""
    out = torch.full(select.shape, fill, dtype=values.dtype, device=values.device)
    out[select] = values
    return out


def _top_per_row(score: torch.Tensor, masked: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mark the `counts[i]` highest-scoring masked positions of each row; ties go to the leftmost column."""
    score = score.masked_fill(~masked, float("-inf"))
    order = torch.sort(score, dim=1, descending=True, stable=True).indices  # (B, W)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(score.size(1), device=score.device).expand_as(order))
    return masked & (ranks < counts[:, None])


def _denoise_step(
    denoise: _Denoiser,
    tokens: torch.Tensor,
    block: tuple[int, int, int],
    masked: torch.Tensor,
    masked_at_start: torch.Tensor,
    step: int,
    steps: int,
    config: SampleConfig,
    gens: list[torch.Generator],
    eos_id: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one step on block (index, lo, hi); return which positions (B, W) to reveal and their tokens (B, W)."""
    index, lo, hi = block
    hidden = denoise(tokens, lo, hi, first=step == 0)  # (B or 2B, W, D)

    if config.sampler == "random":
        # Reverse process of the linear schedule: from t to s a masked token is revealed with
        # probability (t - s) / t = 1 / (steps - step). Only revealed positions need a token.
        # A row without masked tokens draws nothing, as it would not run this step on its own.
        prob = 1.0 / (steps - step)
        draws = torch.ones(masked.shape, dtype=torch.float64, device=masked.device)  # (B, W)
        for i, gen in enumerate(gens):
            if masked[i].any():
                draws[i] = torch.rand(masked.size(1), generator=gen, dtype=torch.float64, device=gen.device)
        select = masked & (draws < prob)
    else:
        select = masked

    logits = denoise.logits_at(hidden, select)  # (N, V)
    W = hi - lo
    if eos_id is not None and config.min_new_tokens > index * W:
        column = select.nonzero()[:, 1] + index * W  # (N,) index of each position among the new tokens
        logits[column < config.min_new_tokens, eos_id] = float("-inf")
    sampled = gumbel_max_rows(logits, select.sum(dim=1).tolist(), config.temperature, gens)  # (N,)
    proposal = _scatter(select, sampled, 0)  # (B, W)
    if config.sampler == "random":
        return select, proposal

    # Confidence is the chosen token's probability under softmax(l), as in LLaDA's low-confidence rule.
    confidence = torch.exp(logits.gather(-1, sampled[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1))
    confidence = _scatter(select, confidence, float("-inf"))  # (B, W)
    counts = reveal_counts(masked_at_start, masked.sum(dim=1), step, steps)  # (B,)
    if config.sampler == "threshold":
        confident = (masked & (confidence > config.threshold)).sum(dim=1)
        counts = torch.maximum(counts, confident).clamp_min(1)
    return _top_per_row(confidence, masked, counts), proposal


@torch.no_grad()
def mdm_sample(
    model: Transformer,
    prompts: torch.Tensor | Sequence[Sequence[int]],
    config: SampleConfig,
    *,
    eos_id: int | None = None,
    pad_id: int = 0,
    suffixes: Sequence[Sequence[int]] | None = None,
    row_seeds: Sequence[int] | None = None,
    should_stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
    trace: list[torch.Tensor] | None = None,
    return_canvas: bool = False,
) -> torch.Tensor:
    """Generate G = max_new_tokens tokens for each prompt; return the new tokens (B, G), without mask ids.

    Random remasking: a step from time t to s < t reveals each masked token with
    probability (t - s) / t, to a draw from softmax(l / tau): the exact reverse
    process of the linear schedule (Nie et al., arXiv 2410.18514). Low-confidence
    remasking reveals each row's most confident predictions, as many as keep that
    row's masked count on the schedule floor(M s). Every row has its own budget.
    "threshold" reveals every prediction above `config.threshold` and at least
    the schedule's count (so at least one per step), ending a block early once it
    is full. With block_length set, blocks are decoded left to right, each with
    its share of the steps.

    suffixes: per-row tokens that follow the masked region (infilling).
    row_seeds: per-row noise keys (default 0..B-1); equal keys give equal noise.
    should_stop: called with the new tokens (B, G) after each block; rows where it returns True are done.
    trace: if given, receives each step's per-row reveal count (B,).
    return_canvas: return the whole left-padded canvas (B, L) instead: pads, prompt, new tokens, suffix, pads.
    """
    mask_id = model.config.mask_id
    if mask_id is None:
        raise ValueError("mdm_sample needs an MDM checkpoint; use arm_sample for an ARM")
    if pad_id == mask_id:
        raise ValueError(f"pad_id={pad_id} equals the mask id; pad with a real token id such as EOS")
    rows = as_rows(prompts)
    suffix_rows = [list(map(int, s)) for s in suffixes] if suffixes is not None else None
    G = config.max_new_tokens
    check_lengths(model, rows, suffix_rows, G)
    device = model.lm_head.weight.device
    canvas = build_canvas(rows, G, mask_id, pad_id, device, suffix_rows)
    gens = row_generators(row_seeds if row_seeds is not None else range(len(rows)), config.seed, device)
    denoise = _Denoiser(model, canvas, config)
    tokens = canvas.tokens.clone()  # (B, L)
    W = G // config.num_blocks

    for block, steps in enumerate(config.steps_per_block()):
        lo, hi = canvas.start + block * W, canvas.start + (block + 1) * W
        masked_at_start = (tokens[:, lo:hi] == mask_id).sum(dim=1)  # (B,)
        for step in range(steps):
            masked = tokens[:, lo:hi] == mask_id  # (B, W) True where still masked
            if not masked.any():
                break
            reveal, proposal = _denoise_step(denoise, tokens, (block, lo, hi), masked, masked_at_start, step, steps,
                                             config, gens, eos_id)
            tokens[:, lo:hi] = torch.where(reveal, proposal, tokens[:, lo:hi])
            if trace is not None:
                trace.append(reveal.sum(dim=1).cpu())
        if block < config.num_blocks - 1 and should_stop is not None:
            if bool(should_stop(tokens[:, canvas.start : canvas.start + G]).all()):
                break

    # Blocks skipped after every row stopped stay masked: fill them so no mask id leaves the sampler.
    tokens = tokens.masked_fill(tokens == mask_id, eos_id if eos_id is not None else pad_id)
    return tokens if return_canvas else tokens[:, canvas.start : canvas.start + G]


# ARM decoding.
def _causal_mask(real: torch.Tensor) -> torch.Tensor:
    """Build the attention mask (B, 1, T, T): causal, with pad keys hidden.

    Each query also attends to itself, so pad rows have a key and stay finite.
    """
    T = real.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=real.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=real.device)
    return ((causal & real[:, None, :]) | eye)[:, None]


@torch.no_grad()
def arm_sample(
    model: Transformer,
    prompts: torch.Tensor | Sequence[Sequence[int]],
    config: SampleConfig,
    eos_id: int | None = None,
    *,
    pad_id: int | None = None,
    row_seeds: Sequence[int] | None = None,
    should_stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Decode max_new_tokens tokens after each prompt; return (B, G') with G' <= G when every row stopped early.

    With config.cache "auto" (or anything but "none") keys and values live in a
    preallocated KVCache and each step runs one token. With "none" each step
    reruns the whole sequence. Both give the same tokens. With config.stop_at_eos,
    rows that emitted EOS keep emitting EOS so the batch stays rectangular, and
    decoding ends once every row has finished.
    """
    if model.config.is_mdm:
        raise ValueError("arm_sample needs an ARM checkpoint; use mdm_sample for an MDM")
    rows = as_rows(prompts)
    if min(len(r) for r in rows) == 0:
        raise ValueError("an ARM needs a prompt of at least one token; start from the EOS token")
    G = config.max_new_tokens
    check_lengths(model, rows, None, G)
    device = model.lm_head.weight.device
    pad = default_pad_id(pad_id, eos_id)
    canvas = build_canvas(rows, G, pad, pad, device)
    gens = row_generators(row_seeds if row_seeds is not None else range(len(rows)), config.seed, device)
    B, P = len(rows), canvas.start
    real = canvas.real.clone()
    real[:, P:] = True  # (B, P + G) the new tokens are real once written
    padded = canvas.padded
    tokens = canvas.tokens.clone()
    use_cache = config.cache != "none"
    # A finished row emits EOS from then on, which keeps the batch rectangular.
    stop_at_eos = config.stop_at_eos and eos_id is not None
    finished = torch.zeros(B, dtype=torch.bool, device=device)

    cache = model.new_cache(B, P + G) if use_cache else None
    mask = _causal_mask(real[:, :P]) if padded else None
    logits = model(tokens[:, :P], positions=canvas.positions[:, :P], attn_mask=mask, cache=cache)[:, -1]  # (B, V)
    if cache is not None:
        cache.length = P
    for i in range(G):
        logits = logits.float()
        if eos_id is not None and i < config.min_new_tokens:
            logits[:, eos_id] = float("-inf")
        token = gumbel_max_rows(logits, [1] * B, config.temperature, gens)  # (B,)
        if stop_at_eos:
            token = torch.where(finished, torch.full_like(token, eos_id), token)
            finished |= token == eos_id
        tokens[:, P + i] = token
        if should_stop is not None and (i + 1) % STOP_STRING_CHECK_INTERVAL == 0:
            finished |= should_stop(tokens[:, P : P + i + 1]).to(device)
        done = (stop_at_eos or should_stop is not None) and bool(finished.all())
        if done or i == G - 1:
            return tokens[:, P : P + i + 1]
        T = P + i + 1
        positions = canvas.positions[:, P - 1 : P] + i + 1  # (B, 1) the next position of each row
        if cache is not None:
            mask = real[:, None, None, :T] if padded else None  # (B, 1, 1, T)
            logits = model(token[:, None], positions=positions, attn_mask=mask, cache=cache)[:, -1]
            cache.length += 1
        else:
            all_positions = torch.cat([canvas.positions[:, :P], canvas.positions[:, P - 1 : P]
                                       + torch.arange(1, i + 2, device=device)], dim=1)  # (B, T)
            mask = _causal_mask(real[:, :T]) if padded else None
            logits = model(tokens[:, :T], positions=all_positions, attn_mask=mask)[:, -1]
    return tokens[:, P:]


def truncate_at_eos(tokens: list[int], eos_id: int) -> list[int]:
    """Cut a row of generated ids at its first EOS (excluded)."""
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


def _stop_checker(config: SampleConfig, eos_id: int | None, decode: Callable[[list[int]], str] | None):
    """Build should_stop(new tokens (B, T)) -> (B,) bool from EOS and stop strings, or None when neither applies."""
    use_eos = config.stop_at_eos and eos_id is not None
    use_strings = bool(config.stop_strings) and decode is not None
    if not (use_eos or use_strings):
        return None

    def should_stop(new: torch.Tensor) -> torch.Tensor:
        done = []
        for row in new.tolist():
            stop = use_eos and eos_id in row
            if not stop and use_strings:
                text = decode(truncate_at_eos(row, eos_id) if use_eos else row)
                stop = any(s in text for s in config.stop_strings)
            done.append(stop)
        return torch.tensor(done, dtype=torch.bool)

    return should_stop


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: torch.Tensor | Sequence[Sequence[int]],
    config: SampleConfig,
    eos_id: int | None = None,
    *,
    pad_id: int | None = None,
    suffixes: Sequence[Sequence[int]] | None = None,
    row_seeds: Sequence[int] | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> list[list[int]]:
    """Generate with the sampler that fits the model kind; return each row's new ids, cut at EOS when asked.

    prompts: a (B, P) tensor or a list of token-id lists of any lengths.
    suffixes: per-row token ids after the gap, for MDM infilling.
    decode: turns ids into text; needed for config.stop_strings, which end a row
    early (the caller cuts the text at the stop string).
    """
    should_stop = _stop_checker(config, eos_id, decode)
    if model.config.is_mdm:
        pad = default_pad_id(pad_id, eos_id)
        new = mdm_sample(model, prompts, config, eos_id=eos_id, pad_id=pad, suffixes=suffixes, row_seeds=row_seeds,
                         should_stop=should_stop)
    else:
        if suffixes is not None:
            raise ValueError("infilling (suffixes) needs an MDM; an ARM only continues a prompt")
        if config.cfg > 0:
            raise ValueError(f"cfg={config.cfg} needs an MDM; set cfg to 0 for an ARM")
        new = arm_sample(model, prompts, config, eos_id, pad_id=pad_id, row_seeds=row_seeds, should_stop=should_stop)
    rows = new.tolist()
    if config.stop_at_eos and eos_id is not None:
        rows = [truncate_at_eos(row, eos_id) for row in rows]
    return rows
