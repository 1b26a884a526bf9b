"""Training loop for MDMs and ARMs: budget, schedule, accumulation, validation and checkpoints.

Randomness is keyed by (seed, step). The batch windows, the diffusion times,
the masking noise and the stochastic-length cut of step s are the same whether
or not the run was resumed, so a resumed run reproduces the uninterrupted loss
curve exactly on CPU.

Under torch.distributed every process draws the same global batch and noise
and trains on its own contiguous block of rows (see smdm.distributed), so the
data order and the masks of a run do not depend on the number of processes.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from smdm.checkpoint import (
    CHECKPOINTS_DIR,
    LATEST_FILE,
    read_checkpoint,
    save_checkpoint,
    write_text_atomically,
)
from smdm.config import ModelConfig, TrainConfig
from smdm.data.shards import TokenData, read_windows, window_starts
from smdm.diffusion import arm_loss, mdm_loss
from smdm.distributed import (
    clip_gradients,
    enable_activation_checkpointing,
    gather_full_state,
    load_full_state,
    local_micro_batch,
    no_gradient_sync,
    rows_of_rank,
    setup_distributed,
    sharded_validation_loss,
    wrap_model,
)
from smdm.errors import TrainingDiverged
from smdm.evaluate.validation import validation_loss
from smdm.model import Transformer
from smdm.runtime import autocast, generator, resolve_precision

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RUN_CONFIG_FILE = "config.json"


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: Transformer, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linear and embedding weights) and none on norm scales."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=device.type == "cuda"
    )


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


@dataclass
class StepNoise:
    """The randomness of one optimiser step: sequence length, diffusion times and masking noise."""

    length: int
    t: torch.Tensor  # (global_batch,)
    noise: torch.Tensor  # (global_batch, length)


def draw_step_noise(config: TrainConfig, step: int) -> StepNoise:
    """Draw the MDM noise of a step for the whole global batch from a generator keyed by (seed, step)."""
    rng = generator(config.seed, "noise", step)
    length = config.seq_len
    if torch.rand((), generator=rng).item() < config.ssl_ratio:
        length = int(torch.randint(1, config.seq_len + 1, (), generator=rng).item())
    t = torch.rand(config.global_batch, generator=rng)
    noise = torch.rand(config.global_batch, length, generator=rng)
    return StepNoise(length, t, noise)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int
    final_val: dict
    history: list[dict] = field(default_factory=list)


class StopRequest:
    """Turns SIGINT/SIGTERM into a request to checkpoint and stop at the end of the current step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # signals can only be caught on the main thread
            self._previous = {}
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal stops at once
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested (signal %d): saving a checkpoint at the end of this step", signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """One training run of an MDM or an ARM on a prepared data folder, writing into run_dir.

    Under torchrun every process constructs its own Trainer with the same
    arguments. Rank 0 alone writes files and logs, and the metrics it records
    are reduced over all processes.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        train_config: TrainConfig,
        data_dir: str | Path,
        run_dir: str | Path,
        *,
        resume: bool = False,
        keep_checkpoints: int = 2,
        strategy: str = "auto",
        activation_checkpointing: bool = False,
    ) -> None:
        self.model_config = model_config
        self.config = train_config
        self.run_dir = Path(run_dir)
        self.keep_checkpoints = keep_checkpoints
        self.activation_checkpointing = activation_checkpointing
        self.data = TokenData(data_dir)
        self._check_compatible()

        # Join the process group and find this process's rows of every global batch.
        self.dist = setup_distributed(train_config.device, strategy)
        self.device = self.dist.device
        self.precision = resolve_precision(train_config.precision, self.device)
        self.rows = rows_of_rank(train_config.global_batch, self.dist.rank, self.dist.world_size)
        self.micro_batch, self.accumulation_steps = local_micro_batch(
            train_config.global_batch, train_config.micro_batch, self.dist.world_size
        )

        # Every rank builds the same initial weights from the seed, then shards or replicates them.
        torch.manual_seed(train_config.seed)
        self.model = Transformer(model_config).to(self.device)
        if activation_checkpointing:
            enable_activation_checkpointing(self.model)
        self._forward_model = wrap_model(self.model, self.dist, self.precision)
        self.optimizer = build_optimizer(self.model, train_config, self.device)
        self.total_steps = train_config.resolve_steps(model_config.n_non_embedding, model_config.kind)
        self.warmup_steps = train_config.warmup_steps(self.total_steps)
        self.step = 0
        self.tokens_seen = 0
        self.train_tokens = self.data.split("train")
        self.val_tokens = self.data.split("val")
        self.history: list[dict] = []

        latest = self.run_dir / CHECKPOINTS_DIR / LATEST_FILE
        has_checkpoint = self.dist.run_on_main(latest.is_file)
        if resume and has_checkpoint:
            self._resume()
        elif has_checkpoint:
            raise FileExistsError(
                f"{self.run_dir} already contains a run; pass --resume to continue it or choose another --out"
            )
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomically(self.run_dir / RUN_CONFIG_FILE, json.dumps(self.resolved_config(), indent=2))

    def _check_compatible(self) -> None:
        problems = []
        if self.model_config.vocab_size != self.data.vocab_size:
            problems.append(
                f"the model's vocab_size is {self.model_config.vocab_size} but the data's tokenizer has "
                f"{self.data.vocab_size} ids; set the model's vocab_size to {self.data.vocab_size}"
            )
        window = self.config.seq_len + (0 if self.model_config.is_mdm else 1)
        if self.config.seq_len > self.model_config.block_size:
            problems.append(
                f"--seq-len {self.config.seq_len} exceeds the model's block_size {self.model_config.block_size}"
            )
        if problems:
            raise ValueError("; ".join(problems))
        del window

    def resolved_config(self) -> dict:
        return {
            "model": self.model_config.to_dict(),
            "train": self.config.to_dict(),
            "data": str(self.data.folder),
            "tokenizer": self.data.meta["tokenizer"]["identity"],
            "device": str(self.device),
            "precision": self.precision,
            "world_size": self.dist.world_size,
            "strategy": self.dist.strategy,
            "activation_checkpointing": self.activation_checkpointing,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "n_non_embedding": self.model_config.n_non_embedding,
            "n_params": self.model_config.n_params,
        }

    # Checkpoints.
    def _resume(self) -> None:
        # Rank 0 reads and checks the checkpoint, then broadcasts its tensors to the other ranks.
        loaded: dict = {"weights": None, "optimizer": None}

        def read() -> tuple[str, dict]:
            checkpoint = read_checkpoint(self.run_dir)
            problems = []
            if checkpoint.model_config != self.model_config:
                saved, given = checkpoint.model_config.to_dict(), self.model_config.to_dict()
                differences = ", ".join(f"{k}: checkpoint {saved[k]!r}, given {given[k]!r}" for k in saved if saved[k] != given[k])
                problems.append(
                    f"model config differs from the checkpoint's ({differences}); "
                    "resume with the same --model, --kind and --block-size"
                )
            if checkpoint.tokenizer.identity != self.data.tokenizer.identity:
                problems.append(f"the tokenizer of {self.data.folder} is not the one the checkpoint was trained with")
            if problems:
                raise ValueError(f"cannot resume {checkpoint.folder}: " + "; ".join(problems))
            loaded["weights"] = checkpoint.weights()
            loaded["optimizer"] = checkpoint.optimizer_state()
            return str(checkpoint.folder), checkpoint.trainer_state

        folder, trainer_state = self.dist.run_on_main(read)
        load_full_state(self.model, self.optimizer, loaded["weights"], loaded["optimizer"], self.dist)
        self.step = trainer_state["step"]
        self.tokens_seen = trainer_state["tokens_seen"]
        if self.dist.is_main:
            self._truncate_metrics(self.step)
            log.info("resumed from %s at step %d", folder, self.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric rows written after the checkpoint, which the resumed run will write again."""
        path = self.run_dir / METRICS_FILE
        if not path.is_file():
            return
        kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["step"] <= step]
        write_text_atomically(path, "".join(line + "\n" for line in kept))

    def save(self) -> Path:
        """Write a checkpoint of this step; under torch.distributed every rank must call it.

        The full state is gathered to rank 0, which alone writes. The folder is
        renamed into place before `latest` names it, so a rank that dies during
        the gather or the write leaves the previous checkpoint as the latest.
        """
        name = f"step-{self.step:07d}"
        root = self.run_dir / CHECKPOINTS_DIR
        folder = root / name
        trainer_state = {"step": self.step, "tokens_seen": self.tokens_seen, "total_steps": self.total_steps}
        if not self.dist.active:
            save_checkpoint(folder, self.model, self.data.tokenizer, optimizer=self.optimizer,
                            trainer_state=trainer_state, train_config=self.config.to_dict())
        else:
            weights, optimizer_state = gather_full_state(self.model, self.optimizer, self.dist)
            if self.dist.is_main:
                save_checkpoint(folder, self.model, self.data.tokenizer, optimizer=optimizer_state,
                                weights=weights, trainer_state=trainer_state, train_config=self.config.to_dict())
        if self.dist.is_main:
            write_text_atomically(root / LATEST_FILE, name)
            self._remove_stale_checkpoints(root, name)
        # Every rank returns only once the checkpoint is complete.
        self.dist.barrier()
        return folder

    def _remove_stale_checkpoints(self, root: Path, name: str) -> None:
        # Keep the newest checkpoints only; the one just written is never removed.
        old = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != name)
        for stale in old[: max(0, len(old) - (self.keep_checkpoints - 1))]:
            for file in stale.iterdir():
                file.unlink()
            stale.rmdir()

    # Metrics.
    def _record(self, row: dict) -> None:
        self.history.append(row)
        if not self.dist.is_main:
            return
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    def evaluate(self) -> dict:
        """Return the validation loss, on the same windows and seeds for any world size.

        Under torch.distributed every rank must call it.
        """
        settings = {
            "max_sequences": self.config.eval_batches * self.config.micro_batch_size,
            "batch_size": self.config.micro_batch_size,
            "mc_samples": self.config.eval_mc_samples,
            "seed": self.config.eval_seed,
            "precision": self.precision,
        }
        if not self.dist.active:
            return validation_loss(self.model, self.val_tokens, self.config.seq_len, **settings)
        return sharded_validation_loss(self.model, self.val_tokens, self.config.seq_len, self.dist, **settings)

    # One optimiser step.
    def train_step(self) -> tuple[float, float, int]:
        """Run forward and backward over this rank's micro-batches of one step.

        Returns (loss, grad norm, tokens) of the whole global batch: the loss is
        averaged over all ranks and the token count covers all of them.
        """
        config, is_mdm = self.config, self.model_config.is_mdm
        window = config.seq_len + (0 if is_mdm else 1)
        # Draw the global batch's windows and noise, keyed by (seed, step), and keep this rank's rows.
        starts = window_starts(len(self.train_tokens), window, config.global_batch, config.seed, self.step)
        starts = starts[self.rows]
        noise = draw_step_noise(config, self.step) if is_mdm else None
        length = noise.length if is_mdm else config.seq_len
        micro, accumulation = self.micro_batch, self.accumulation_steps
        total_loss = 0.0
        for index, first in enumerate(range(0, len(starts), micro)):
            rows = slice(first, first + micro)
            # Reduce gradients across ranks only in the backward of the last micro-batch.
            with no_gradient_sync(self._forward_model, self.dist, sync=index == accumulation - 1):
                x = torch.from_numpy(read_windows(self.train_tokens, starts[rows], window)).to(self.device)
                with autocast(self.device, self.precision):
                    if is_mdm:
                        x = x[:, :length]
                        t = noise.t[self.rows][rows].to(self.device)
                        u = noise.noise[self.rows][rows].to(self.device)
                        loss = mdm_loss(self._forward_model, x, t, u, self.model_config.mask_id, config.mask_eps)
                    else:
                        loss = arm_loss(self._forward_model, x)
                (loss / accumulation).backward()
            total_loss += loss.item() / accumulation
        grad_norm = clip_gradients(self.model, config.grad_clip, self.dist)
        if self.dist.active:
            total_loss = self.dist.all_reduce_sum([total_loss])[0] / self.dist.world_size
        return total_loss, grad_norm, config.global_batch * length

    def fit(self) -> TrainResult:
        config = self.config
        self.model.train()
        if self.dist.is_main:
            log.info(
                "training %s %s (%s non-embedding, %s total parameters) for %d steps of %d x %d tokens "
                "on %d x %s (%s, strategy %s, %d x %d sequences per process and step)",
                self.model_config.kind.upper(), self.model_config.name or "custom",
                f"{self.model_config.n_non_embedding:,}", f"{self.model_config.n_params:,}",
                self.total_steps, config.global_batch, config.seq_len, self.dist.world_size, self.device,
                self.precision, self.dist.strategy, self.accumulation_steps, self.micro_batch,
            )
        interval_start, interval_tokens, run_start = time.time(), 0, time.time()
        start_step = self.step
        final_val: dict = {}
        with StopRequest() as stop:
            while self.step < self.total_steps:
                # Set the learning rate of this step.
                lr = lr_at(self.step, self.total_steps, self.warmup_steps, config.lr, config.min_lr)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr

                # Forward and backward over micro-batches, then stop on a non-finite loss before stepping.
                loss, grad_norm, tokens = self.train_step()
                if not math.isfinite(loss) or not math.isfinite(grad_norm):
                    self.optimizer.zero_grad(set_to_none=True)
                    raise TrainingDiverged(
                        f"loss is {loss} (grad norm {grad_norm}) at step {self.step} with lr {lr:.3g}; "
                        f"the last good checkpoint in {self.run_dir / CHECKPOINTS_DIR} is intact. "
                        "Lower --lr, raise warmup, or use --precision fp32, then --resume"
                    )
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.tokens_seen += tokens
                interval_tokens += tokens
                # A signal may reach the ranks in different steps; stop all of them at the same one.
                stopping = stop.requested
                if self.dist.active:
                    stopping = self.dist.all_reduce_sum([float(stop.requested)])[0] > 0

                # Log one line per interval.
                if self.step % config.log_interval == 0 or self.step == self.total_steps:
                    now = time.time()
                    rate = interval_tokens / max(now - interval_start, 1e-9)
                    steps_per_s = (self.step - start_step) / max(now - run_start, 1e-9)
                    eta = (self.total_steps - self.step) / max(steps_per_s, 1e-9)
                    if self.dist.is_main:
                        log.info(
                            "step %d/%d | tokens %s | loss %.4f | lr %.2e | grad norm %.3f | %s tok/s | ETA %s",
                            self.step, self.total_steps, f"{self.tokens_seen:,}", loss, lr, grad_norm,
                            f"{rate:,.0f}", format_duration(eta),
                        )
                    self._record({"step": self.step, "tokens": self.tokens_seen, "loss": loss, "lr": lr,
                                  "grad_norm": grad_norm, "tokens_per_s": rate, "elapsed_s": now - run_start})
                    interval_start, interval_tokens = time.time(), 0

                # Validate on an interval and at the end.
                if self.step % config.eval_interval == 0 or self.step == self.total_steps:
                    final_val = self.evaluate()
                    label = "NELBO bound" if final_val["bound"] else "loss"
                    if self.dist.is_main:
                        log.info("step %d | validation %s %.4f nats/token", self.step, label, final_val["loss"])
                    self._record({"step": self.step, "tokens": self.tokens_seen, "val_loss": final_val["loss"]})

                # Checkpoint on an interval, at the end and when asked to stop.
                if self.step % config.checkpoint_interval == 0 or self.step == self.total_steps or stopping:
                    folder = self.save()
                    if self.dist.is_main:
                        log.info("saved checkpoint %s", folder)
                if stopping:
                    if self.dist.is_main:
                        log.warning("stopped at step %d; continue with --resume", self.step)
                    raise KeyboardInterrupt
        if not final_val:
            final_val = self.evaluate()
        return TrainResult(self.run_dir, self.step, self.tokens_seen, final_val, self.history)


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    data_dir: str | Path,
    run_dir: str | Path,
    *,
    resume: bool = False,
    strategy: str = "auto",
    activation_checkpointing: bool = False,
) -> TrainResult:
    """Train a model on a prepared data folder and return its final validation result."""
    trainer = Trainer(model_config, train_config, data_dir, run_dir, resume=resume, strategy=strategy,
                      activation_checkpointing=activation_checkpointing)
    return trainer.fit()
