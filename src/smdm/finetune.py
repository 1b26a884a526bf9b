"""Supervised fine-tuning (SFT) of an MDM or an ARM on prompt/response pairs.

Shape legend: B batch, L sequence length.

MDM loss (Nie et al., arXiv 2410.18514, conditional generation): per row draw
t ~ U(0, 1), p = (1 - eps) t + eps, mask each response token (and each EOS
padding token) with probability p and never the prompt, then

    loss = sum_b sum_{l scored and masked} CE(f(x_t)_l, x_l) / p_b  /  (number of scorable tokens),

whose expectation bounds the negative log-likelihood per scorable token. For
standard classifier-free guidance a row's whole prompt is replaced by mask
tokens with probability `prompt_dropout` (0 keeps the unsupervised-CFG model).
With train_on_prompt the prompt is noised and scored like the rest of the row,
as for facts learned without a question/answer split (the reversal curse).

ARM loss: mean next-token cross-entropy over the scored targets only.

A step's rows are drawn, noised and normalised over the whole batch (the
denominator counts the scorable tokens of every row), then split into one
block per process (torchrun, DDP or FSDP2 as in smdm.distributed) and into
micro-batches within a process, so the loss and the update of a step do not
depend on the number of processes or on the micro-batch size.

Checkpoints are written with smdm.checkpoint.save_checkpoint into
`OUT/checkpoints/step-N`, with `OUT/checkpoints/latest` naming the newest, so
`smdm sample`, `smdm evaluate` and load_model read a fine-tuned run folder
like a pretraining one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from smdm.checkpoint import (
    CHECKPOINTS_DIR,
    LATEST_FILE,
    load_model,
    read_checkpoint,
    save_checkpoint,
    write_text_atomically,
)
from smdm.config import ModelConfig, TrainConfig
from smdm.data.sft import PromptResponse, SFTBatch, build_batch, encode_pairs
from smdm.data.tokenizer import Tokenizer
from smdm.diffusion import masked_cross_entropy_sum, masking_probability
from smdm.distributed import (
    DistributedContext,
    clip_gradients,
    gather_full_state,
    load_full_state,
    local_micro_batch,
    no_gradient_sync,
    rows_of_rank,
    wrap_model,
)
from smdm.model import Transformer
from smdm.runtime import autocast, generator, resolve_precision
from smdm.train import StopRequest, build_optimizer, format_duration, lr_at

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PROMPT_SLOT = "{prompt}"


def apply_prompt_template(template: str, prompt: str) -> str:
    """Put prompt into the template's {prompt} slot; other braces in either text are kept as they are."""
    return template.replace(PROMPT_SLOT, prompt, 1)


def checkpoint_prompt_template(train_config: dict) -> str:
    """Return the prompt template a checkpoint was fine-tuned with ("{prompt}" for any other checkpoint)."""
    return (train_config.get("finetune") or {}).get("prompt_template", PROMPT_SLOT)


@dataclass
class FinetuneConfig:
    """One fine-tuning run."""

    seq_len: int = 256
    """Row length in tokens; longer pairs are skipped and counted."""
    batch_size: int = 16
    """Rows per optimiser step, over all processes."""
    micro_batch: int = 0
    """Rows per forward pass on one process (0: its whole share). Gradients accumulate over the passes."""
    steps: int = 100
    lr: float = 2e-5
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mask_eps: float = 1e-3
    prompt_dropout: float = 0.0
    """Per-row probability of replacing the whole prompt by mask tokens (MDM, standard CFG)."""
    score_padding: bool = True
    """Score the EOS padding after the response's closing EOS (the closing EOS is always scored)."""
    train_on_prompt: bool = False
    """Noise (MDM) and score the prompt as well, so the whole row is training text."""
    prompt_template: str = PROMPT_SLOT
    """Text that wraps every prompt, with {prompt} where the prompt goes (a chat format such as
    "User: {prompt}\nAssistant:"). It is saved with the checkpoints, and `smdm task mt-bench-answer` applies it."""
    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    log_interval: int = 10
    checkpoint_interval: int = 200
    """Steps between checkpoints; 0 writes only the final one."""

    def __post_init__(self) -> None:
        problems = []
        for key in ("seq_len", "batch_size", "steps"):
            if getattr(self, key) <= 0:
                problems.append(f"{key}={getattr(self, key)} must be positive")
        if self.micro_batch < 0:
            problems.append(f"micro_batch={self.micro_batch} must be 0 (a process's whole share) or positive")
        if not 0 <= self.prompt_dropout <= 1:
            problems.append(f"prompt_dropout={self.prompt_dropout} must lie in [0, 1]")
        if self.prompt_template.count(PROMPT_SLOT) != 1:
            problems.append(f"prompt_template={self.prompt_template!r} must contain {PROMPT_SLOT} exactly once")
        if self.prompt_dropout and self.train_on_prompt:
            problems.append("prompt_dropout needs a protected prompt; drop --train-on-prompt or set it to 0")
        if self.lr <= 0 or not 0 <= self.min_lr <= self.lr:
            problems.append(f"need 0 <= min_lr <= lr and lr > 0 (got lr={self.lr}, min_lr={self.min_lr})")
        if problems:
            raise ValueError("invalid fine-tuning config: " + "; ".join(problems))


def scorable_positions(batch: SFTBatch, score_padding: bool, train_on_prompt: bool) -> torch.Tensor:
    """Return the boolean mask (B, L) of positions that the loss may score."""
    scorable = batch.response.clone()
    if score_padding:
        scorable |= batch.padding
    if train_on_prompt:
        scorable |= batch.prompt
    return scorable


def sft_mdm_loss(
    model: Transformer,
    batch: SFTBatch,
    t: torch.Tensor,
    noise: torch.Tensor,
    drop_prompt: torch.Tensor,
    *,
    eps: float,
    score_padding: bool,
    train_on_prompt: bool,
    denominator: int | None = None,
) -> torch.Tensor:
    """MDM fine-tuning loss of a batch at times t (B,) with uniform noise (B, L) and dropout flags (B,).

    The sum is divided by `denominator`, by default the batch's number of
    scorable tokens. A micro-batch passes its whole batch's count. Unscored
    padding is still noised, so the model trains on the canvas the sampler
    builds (masks after the prompt) but gets no gradient from the padding.
    """
    mask_id = model.config.mask_id
    if mask_id is None:
        raise ValueError("sft_mdm_loss needs an MDM; use sft_arm_loss for an ARM")
    tokens = batch.tokens
    p = masking_probability(t, eps)[:, None]  # (B, 1)
    noisable = batch.response | batch.padding
    if train_on_prompt:
        noisable = noisable | batch.prompt
    masked = (noise < p) & noisable  # (B, L)
    dropped = drop_prompt[:, None] & batch.prompt  # (B, L) prompts removed for standard CFG
    noisy = torch.where(masked | dropped, torch.full_like(tokens, mask_id), tokens)
    scorable = scorable_positions(batch, score_padding, train_on_prompt)
    total = masked_cross_entropy_sum(model, noisy, tokens, masked & scorable, 1.0 / p)
    return total / (scorable.sum().clamp_min(1) if denominator is None else denominator)


def sft_arm_loss(
    model: Transformer, batch: SFTBatch, *, score_padding: bool, train_on_prompt: bool, denominator: int | None = None
) -> torch.Tensor:
    """Next-token cross-entropy summed over the scored targets of ARM rows (B, L + 1), divided by `denominator`.

    The default denominator is the number of scored targets, which gives their mean.
    """
    scored = scorable_positions(batch, score_padding, train_on_prompt)[:, 1:]  # (B, L) targets
    logits = model(batch.tokens[:, :-1])  # (B, L, V)
    targets = batch.tokens[:, 1:]
    total = F.cross_entropy(logits[scored].float(), targets[scored], reduction="sum")
    return total / (scored.sum().clamp_min(1) if denominator is None else denominator)


def scored_count(batch: SFTBatch, kind: str, score_padding: bool, train_on_prompt: bool) -> int:
    """Return the number of tokens a batch's loss is divided by (at least 1).

    For an MDM these are its scorable positions, for an ARM its scored targets.
    """
    scorable = scorable_positions(batch, score_padding, train_on_prompt)
    if kind == "arm":
        scorable = scorable[:, 1:]
    return max(int(scorable.sum()), 1)


def draw_sft_noise(seed: int, step: int, rows: int, length: int, prompt_dropout: float):
    """Draw a step's times t (rows,), uniform noise (rows, length) and prompt-dropout flags (rows,) on the CPU.

    The generator is keyed by (seed, step), so a step's noise does not depend on the steps before it.
    """
    rng = generator(seed, "sft-noise", step)
    t = torch.rand(rows, generator=rng)
    noise = torch.rand(rows, length, generator=rng)
    drop = torch.rand(rows, generator=rng) < prompt_dropout
    return t, noise, drop


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Return the example indices of a step: epochs are permutations keyed by (seed, epoch), read in order."""
    start = step * batch_size
    indices = []
    while len(indices) < batch_size:
        epoch, offset = divmod(start + len(indices), n)
        order = torch.randperm(n, generator=generator(seed, "sft-epoch", epoch)).tolist()
        indices.extend(order[offset : offset + batch_size - len(indices)])
    return indices


@dataclass
class FinetuneResult:
    run_dir: Path
    steps: int
    examples: int
    skipped: int
    final_loss: float
    losses: list[float] = field(default_factory=list)


def initial_model(
    checkpoint: str | Path | None,
    device: torch.device,
    *,
    tokenizer: Tokenizer | None = None,
    size: str = "tiny-0.8M",
    kind: str = "mdm",
    block_size: int = 256,
    seed: int = 0,
) -> tuple[Transformer, Tokenizer, str]:
    """Load a checkpoint, or build a fresh model of `size` for `tokenizer` when checkpoint is None."""
    if checkpoint is not None:
        model, loaded_tokenizer, loaded = load_model(checkpoint, device)
        return model, loaded_tokenizer, str(loaded.folder)
    if tokenizer is None:
        raise ValueError("a model trained from scratch needs a tokenizer; pass --tokenizer or --checkpoint")
    config = ModelConfig.from_name(size, kind=kind, vocab_size=tokenizer.vocab_size, block_size=block_size)
    torch.manual_seed(seed)
    return Transformer(config).to(device), tokenizer, f"scratch:{size}"


def finetune(
    model: Transformer,
    tokenizer: Tokenizer,
    pairs: list[PromptResponse],
    out: str | Path,
    config: FinetuneConfig,
    *,
    base: str = "",
    resume: bool = False,
    context: DistributedContext | None = None,
) -> FinetuneResult:
    """Fine-tune `model` in place on pairs and write checkpoints and metrics under `out`.

    With resume, a run folder that already has a checkpoint continues from it:
    batches and noise are keyed by (seed, step), so the resumed losses equal
    those of an uninterrupted run. Under torch.distributed every process calls
    this with the same arguments and its own `context` (from
    smdm.distributed.setup_distributed), and rank 0 alone writes files. SIGINT
    or SIGTERM saves a checkpoint at the end of the current step, then raises
    KeyboardInterrupt.
    """
    device = next(model.parameters()).device
    context = context or DistributedContext(device=device)
    kind = model.config.kind
    if kind == "arm" and config.prompt_dropout:
        raise ValueError("prompt dropout trains a model for classifier-free guidance, which needs an MDM; set it to 0")
    if config.seq_len > model.config.block_size:
        raise ValueError(
            f"seq_len={config.seq_len} exceeds the model's context of {model.config.block_size}; lower --seq-len"
        )
    rows = rows_of_rank(config.batch_size, context.rank, context.world_size)
    micro, accumulation = local_micro_batch(config.batch_size, config.micro_batch, context.world_size)
    if config.prompt_template != PROMPT_SLOT:
        pairs = [PromptResponse(apply_prompt_template(config.prompt_template, pair.prompt), pair.response)
                 for pair in pairs]
    encoded = encode_pairs(tokenizer, pairs, config.seq_len, kind)
    if encoded.skipped and context.is_main:
        log.warning("skipped %d of %d pairs longer than seq_len=%d", encoded.skipped, len(pairs), config.seq_len)
    run_dir = Path(out)
    precision = resolve_precision(config.precision, device)
    forward_model = wrap_model(model, context, precision)
    schedule = TrainConfig(lr=config.lr, min_lr=config.min_lr, weight_decay=config.weight_decay,
                           grad_clip=config.grad_clip)
    optimizer = build_optimizer(model, schedule, device)
    start_step = _resume_or_start(run_dir, model, optimizer, resume, context)
    train_config = {"seq_len": config.seq_len, "finetune": asdict(config), "base": base,
                    "examples": len(encoded.prompts), "skipped": encoded.skipped,
                    "world_size": context.world_size, "strategy": context.strategy}
    if context.is_main:
        log.info("fine-tuning %s for %d steps of %d rows x %d tokens (%d process(es), %d x %d rows each per step)",
                 kind.upper(), config.steps, config.batch_size, config.seq_len, context.world_size,
                 accumulation, micro)
    model.train()
    losses: list[float] = []
    started = time.perf_counter()
    interval_started, interval_tokens = started, 0

    def save(step: int) -> None:
        name = f"step-{step:07d}"
        weights, optimizer_state = gather_full_state(model, optimizer, context)
        if context.is_main:
            save_checkpoint(run_dir / CHECKPOINTS_DIR / name, model, tokenizer, optimizer=optimizer_state,
                            weights=weights, trainer_state={"step": step, "total_steps": config.steps},
                            train_config=train_config)
            write_text_atomically(run_dir / CHECKPOINTS_DIR / LATEST_FILE, name)
        # Every rank returns only once the checkpoint is complete.
        context.barrier()

    with StopRequest() as stop:
        for step in range(start_step, config.steps):
            # Every rank builds and noises the whole batch, then keeps its own block of rows.
            indices = batch_indices(len(encoded.prompts), config.batch_size, step, config.seed)
            batch = build_batch([encoded.prompts[i] for i in indices], [encoded.responses[i] for i in indices],
                                config.seq_len, tokenizer.eos_id, kind)
            denominator = scored_count(batch, kind, config.score_padding, config.train_on_prompt)
            if kind == "mdm":
                t, noise, drop = draw_sft_noise(config.seed, step, len(batch), batch.tokens.size(1),
                                                config.prompt_dropout)
                t, noise, drop = t[rows], noise[rows], drop[rows]
            local = batch[rows]
            lr = lr_at(step, config.steps, config.warmup_steps, config.lr, config.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            value = 0.0
            for index, first in enumerate(range(0, len(local), micro)):
                part = slice(first, first + micro)
                # Reduce gradients across ranks only in the backward of the last micro-batch.
                with no_gradient_sync(forward_model, context, sync=index == accumulation - 1):
                    piece = local[part].to(device)
                    with autocast(device, precision):
                        if kind == "mdm":
                            loss = sft_mdm_loss(forward_model, piece, t[part].to(device), noise[part].to(device),
                                                drop[part].to(device), eps=config.mask_eps,
                                                score_padding=config.score_padding,
                                                train_on_prompt=config.train_on_prompt, denominator=denominator)
                        else:
                            loss = sft_arm_loss(forward_model, piece, score_padding=config.score_padding,
                                                train_on_prompt=config.train_on_prompt, denominator=denominator)
                    # Data parallelism averages gradients over ranks, and the losses are parts of one sum.
                    (loss * context.world_size).backward()
                value += loss.item()
            if context.active:
                value = context.all_reduce_sum([value])[0]
            grad_norm = clip_gradients(model, config.grad_clip, context)
            if not math.isfinite(value) or not math.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                raise ValueError(
                    f"fine-tuning loss is {value} (grad norm {grad_norm}) at step {step + 1} with lr {lr:.3g}; "
                    f"the last checkpoint in {run_dir / CHECKPOINTS_DIR} is intact. Lower --lr or use "
                    "--precision fp32, then --resume"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(value)
            done = step + 1
            interval_tokens += config.batch_size * config.seq_len
            stopping = stop.requested
            if context.active:
                # A signal may reach the ranks in different steps; stop all of them at the same one.
                stopping = context.all_reduce_sum([float(stopping)])[0] > 0
            if (done % config.log_interval == 0 or done == config.steps) and context.is_main:
                now = time.perf_counter()
                rate = interval_tokens / max(now - interval_started, 1e-9)
                eta = (config.steps - done) * (now - started) / (done - start_step)
                row = {"step": done, "loss": value, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": round(rate, 1),
                       "elapsed_s": round(now - started, 2)}
                with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(row) + "\n")
                log.info("step %d/%d | loss %.4f | lr %.2e | grad norm %.3f | %s tok/s | ETA %s", done,
                         config.steps, value, lr, grad_norm, f"{rate:,.0f}", format_duration(eta))
                interval_started, interval_tokens = now, 0
            interval_due = config.checkpoint_interval and done % config.checkpoint_interval == 0
            if interval_due or done == config.steps or stopping:
                save(done)
            if stopping:
                if context.is_main:
                    log.warning("stopped at step %d; continue with --resume", done)
                raise KeyboardInterrupt
    model.eval()
    final_loss = losses[-1] if losses else float("nan")
    return FinetuneResult(run_dir, config.steps, len(encoded.prompts), encoded.skipped, final_loss, losses)


def _resume_or_start(
    run_dir: Path, model: Transformer, optimizer: torch.optim.Optimizer, resume: bool, context: DistributedContext
) -> int:
    """Load the latest checkpoint of run_dir into model and optimizer when resuming; return the first step.

    Rank 0 reads the folder and the checkpoint, and the other ranks receive the tensors from it.
    """
    metrics = run_dir / METRICS_FILE

    def inspect() -> bool:
        if not (run_dir / CHECKPOINTS_DIR / LATEST_FILE).is_file():
            run_dir.mkdir(parents=True, exist_ok=True)
            metrics.write_text("", encoding="utf-8")
            return False
        if not resume:
            raise FileExistsError(
                f"{run_dir} already contains a fine-tuning run; pass --resume to continue it or choose another --out"
            )
        return True

    if not context.run_on_main(inspect):
        return 0
    loaded: dict = {"weights": None, "optimizer": None}

    def read() -> tuple[str, int]:
        checkpoint = read_checkpoint(run_dir)
        if checkpoint.model_config != model.config:
            raise ValueError(
                f"cannot resume {checkpoint.folder}: its model config {checkpoint.model_config.to_dict()} differs "
                "from the model being fine-tuned; resume with the same starting point"
            )
        loaded["weights"], loaded["optimizer"] = checkpoint.weights(), checkpoint.optimizer_state()
        step = checkpoint.trainer_state["step"]
        # Rows written after the checkpoint are written again by the resumed steps.
        if metrics.is_file():
            kept = [line for line in metrics.read_text(encoding="utf-8").splitlines()
                    if line and json.loads(line)["step"] <= step]
            write_text_atomically(metrics, "".join(line + "\n" for line in kept))
        return str(checkpoint.folder), step

    folder, step = context.run_on_main(read)
    load_full_state(model, optimizer, loaded["weights"], loaded["optimizer"], context)
    if context.is_main:
        log.info("resumed fine-tuning from %s at step %d", folder, step)
    return step
