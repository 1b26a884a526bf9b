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

Checkpoints are written with smdm.checkpoint.save_checkpoint into
`OUT/checkpoints/step-N`, with `OUT/checkpoints/latest` naming the newest, so
`smdm sample`, `smdm evaluate` and load_model read a fine-tuned run folder
like a pretraining one.
"""

from __future__ import annotations

import json
import logging
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
from smdm.model import Transformer
from smdm.runtime import autocast, generator, resolve_device, resolve_precision
from smdm.train import build_optimizer, lr_at

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


@dataclass
class FinetuneConfig:
    """One fine-tuning run."""

    seq_len: int = 256
    """Row length in tokens; longer pairs are skipped and counted."""
    batch_size: int = 16
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
        if not 0 <= self.prompt_dropout <= 1:
            problems.append(f"prompt_dropout={self.prompt_dropout} must lie in [0, 1]")
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
) -> torch.Tensor:
    """MDM fine-tuning loss of a batch at times t (B,) with uniform noise (B, L) and dropout flags (B,).

    Unscored padding is still noised, so the model sees the canvas the sampler
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
    return total / scorable.sum().clamp_min(1)


def sft_arm_loss(model: Transformer, batch: SFTBatch, *, score_padding: bool, train_on_prompt: bool) -> torch.Tensor:
    """Mean next-token cross-entropy over the scored targets of ARM rows (B, L + 1)."""
    scored = scorable_positions(batch, score_padding, train_on_prompt)[:, 1:]  # (B, L) targets
    logits = model(batch.tokens[:, :-1])  # (B, L, V)
    targets = batch.tokens[:, 1:]
    return F.cross_entropy(logits[scored].float(), targets[scored], reduction="sum") / scored.sum().clamp_min(1)


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
) -> FinetuneResult:
    """Fine-tune `model` in place on pairs and write checkpoints and metrics under `out`.

    With resume, a run folder that already has a checkpoint continues from it:
    batches and noise are keyed by (seed, step), so the resumed losses equal
    those of an uninterrupted run.
    """
    device = next(model.parameters()).device
    kind = model.config.kind
    if kind == "arm" and config.prompt_dropout:
        raise ValueError("prompt dropout trains a model for classifier-free guidance, which needs an MDM; set it to 0")
    if config.seq_len > model.config.block_size:
        raise ValueError(
            f"seq_len={config.seq_len} exceeds the model's context of {model.config.block_size}; lower --seq-len"
        )
    encoded = encode_pairs(tokenizer, pairs, config.seq_len, kind)
    if encoded.skipped:
        log.warning("skipped %d of %d pairs longer than seq_len=%d", encoded.skipped, len(pairs), config.seq_len)
    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    precision = resolve_precision(config.precision, device)
    schedule = TrainConfig(lr=config.lr, min_lr=config.min_lr, weight_decay=config.weight_decay,
                           grad_clip=config.grad_clip)
    optimizer = build_optimizer(model, schedule, device)
    start_step = _resume_or_start(run_dir, model, optimizer, resume)
    train_config = {"seq_len": config.seq_len, "finetune": asdict(config), "base": base,
                    "examples": len(encoded.prompts), "skipped": encoded.skipped}
    model.train()
    losses: list[float] = []
    started = time.perf_counter()

    def save(step: int) -> None:
        name = f"step-{step:07d}"
        save_checkpoint(run_dir / CHECKPOINTS_DIR / name, model, tokenizer, optimizer=optimizer,
                        trainer_state={"step": step, "total_steps": config.steps}, train_config=train_config)
        write_text_atomically(run_dir / CHECKPOINTS_DIR / LATEST_FILE, name)

    for step in range(start_step, config.steps):
        rows = batch_indices(len(encoded.prompts), config.batch_size, step, config.seed)
        batch = build_batch([encoded.prompts[i] for i in rows], [encoded.responses[i] for i in rows],
                            config.seq_len, tokenizer.eos_id, kind).to(device)
        lr = lr_at(step, config.steps, config.warmup_steps, config.lr, config.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(device, precision):
            if kind == "mdm":
                t, noise, drop = draw_sft_noise(config.seed, step, len(batch), batch.tokens.size(1),
                                                config.prompt_dropout)
                loss = sft_mdm_loss(model, batch, t.to(device), noise.to(device), drop.to(device), eps=config.mask_eps,
                                    score_padding=config.score_padding, train_on_prompt=config.train_on_prompt)
            else:
                loss = sft_arm_loss(model, batch, score_padding=config.score_padding,
                                    train_on_prompt=config.train_on_prompt)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        value = loss.item()
        losses.append(value)
        if not torch.isfinite(loss):
            raise ValueError(f"fine-tuning loss became {value} at step {step}; lower --lr")
        if (step + 1) % config.log_interval == 0 or step + 1 == config.steps:
            row = {"step": step + 1, "loss": value, "lr": lr, "elapsed_s": round(time.perf_counter() - started, 2)}
            with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
            log.info("step %d/%d loss %.4f lr %.2e", step + 1, config.steps, value, lr)
        if config.checkpoint_interval and (step + 1) % config.checkpoint_interval == 0 and step + 1 < config.steps:
            save(step + 1)
    if start_step < config.steps:
        save(config.steps)
    model.eval()
    final_loss = losses[-1] if losses else float("nan")
    return FinetuneResult(run_dir, config.steps, len(encoded.prompts), encoded.skipped, final_loss, losses)


def _resume_or_start(run_dir: Path, model: Transformer, optimizer: torch.optim.Optimizer, resume: bool) -> int:
    """Load the latest checkpoint of run_dir into model and optimizer when resuming; return the first step."""
    metrics = run_dir / METRICS_FILE
    if not (run_dir / CHECKPOINTS_DIR / LATEST_FILE).is_file():
        metrics.write_text("", encoding="utf-8")
        return 0
    if not resume:
        raise FileExistsError(
            f"{run_dir} already contains a fine-tuning run; pass --resume to continue it or choose another --out"
        )
    checkpoint = read_checkpoint(run_dir)
    if checkpoint.model_config != model.config:
        raise ValueError(
            f"cannot resume {checkpoint.folder}: its model config {checkpoint.model_config.to_dict()} differs from "
            "the model being fine-tuned; resume with the same starting point"
        )
    model.load_state_dict(checkpoint.weights())
    optimizer.load_state_dict(checkpoint.optimizer_state())
    step = checkpoint.trainer_state["step"]
    # Rows written after the checkpoint are written again by the resumed steps.
    if metrics.is_file():
        kept = [line for line in metrics.read_text(encoding="utf-8").splitlines()
                if line and json.loads(line)["step"] <= step]
        write_text_atomically(metrics, "".join(line + "\n" for line in kept))
    log.info("resumed fine-tuning from %s at step %d", checkpoint.folder, step)
    return step
