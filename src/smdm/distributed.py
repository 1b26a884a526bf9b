"""Data-parallel training on torch.distributed: process groups, DDP and FSDP2 wrapping, full state dicts.

A run is launched once per process, by torchrun (which sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT) or as a single process. Every process
builds the same model from the same seed. Each one then takes its own
contiguous block of rows of every global batch, so the data and the noise of a
step do not depend on the number of processes.

Checkpoints stay in the single-process format of smdm.checkpoint. The full
(unsharded) weights and AdamW state are gathered to rank 0, which writes them.
On resume rank 0 reads them and broadcasts them, so a run saved with one world
size resumes with any other.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from smdm.data.shards import eval_windows
from smdm.diffusion import arm_loss
from smdm.evaluate.validation import mdm_nelbo
from smdm.model import Transformer
from smdm.runtime import autocast, resolve_device

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "ddp", "fsdp")
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# A collective that waits longer than this raises instead of hanging a job that lost a rank.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)

T = TypeVar("T")


@dataclass
class DistributedContext:
    """This process's place in the run: its rank, the world size, its device and the wrapping strategy."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: str = "none"
    """"none" (a plain module), "ddp" or "fsdp"."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when a process group is in use, even with a single process."""
        return self.strategy != "none"

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few floats over all processes (float64, so sums of losses keep their precision)."""
        if not self.active:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def run_on_main(self, function: Callable[[], T]) -> T:
        """Run function on rank 0 only and hand its result, or the exception it raised, to every rank.

        Used for file system work (reading a checkpoint, checking a run folder),
        so the ranks on other nodes need not see the same disk and all ranks
        raise the same error together instead of some of them hanging.
        """
        if not self.active:
            return function()
        payload: list[Any] = [None]
        if self.is_main:
            try:
                payload[0] = (True, function())
            except Exception as error:  # noqa: BLE001 (re-raised below on every rank)
                payload[0] = (False, error)
        dist.broadcast_object_list(payload, src=0, device=self._collective_device())
        ok, value = payload[0]
        if not ok:
            raise value
        return value

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def _collective_device(self) -> torch.device:
        # NCCL moves only CUDA tensors; gloo only CPU ones.
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in LAUNCHER_VARIABLES)


def _process_device(requested: str, local_rank: int, world_size: int, launched: bool) -> torch.device:
    """Pick this process's device: cuda:LOCAL_RANK under a launcher, else what resolve_device returns."""
    device = resolve_device(requested)
    if device.type != "cuda" or not launched:
        return device
    if world_size > 1 and requested not in ("auto", "cuda"):
        raise ValueError(
            f"--device {requested} names one GPU but {world_size} processes run; "
            "pass --device cuda so that each process takes cuda:LOCAL_RANK"
        )
    if requested in ("auto", "cuda"):
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                "lower --nproc-per-node to the GPU count"
            )
        device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def resolve_strategy(strategy: str, world_size: int, device: torch.device, launched: bool) -> str:
    """Map --strategy to "none", "ddp" or "fsdp".

    "auto" is "none" for a single process started without torchrun, FSDP on
    CUDA (it shards weights, gradients and AdamW state, so large models fit)
    and DDP on CPU (fewer collectives, and CPU memory is rarely the limit).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    if strategy == "auto":
        if world_size == 1 and not launched:
            return "none"
        return "fsdp" if device.type == "cuda" else "ddp"
    return strategy


def setup_distributed(device: str = "auto", strategy: str = "auto") -> DistributedContext:
    """Join (or create) the process group of this run and return this process's context.

    Under torchrun the group is initialised from the environment (NCCL on
    CUDA, gloo on CPU). A single process asked for "ddp" or "fsdp" gets a
    one-process group on an in-memory store, so the same code path runs
    without a launcher. A group that already exists (a second Trainer in the
    same job, or a test that set one up) is reused.
    """
    launched = launched_by_torchrun()
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    elif launched:
        rank, world_size, local_rank = (int(os.environ[name]) for name in LAUNCHER_VARIABLES)
    else:
        rank, world_size, local_rank = 0, 1, 0
    resolved_device = _process_device(device, local_rank, world_size, launched or dist.is_initialized())
    resolved = resolve_strategy(strategy, world_size, resolved_device, launched or dist.is_initialized())
    if resolved == "none":
        return DistributedContext(device=resolved_device)

    if not dist.is_initialized():
        backend = "nccl" if resolved_device.type == "cuda" else "gloo"
        if launched:
            dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT,
                                    device_id=resolved_device if backend == "nccl" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=COLLECTIVE_TIMEOUT)
    return DistributedContext(rank, world_size, local_rank, resolved_device, resolved)


def rows_of_rank(global_batch: int, rank: int, world_size: int) -> slice:
    """Return the contiguous block of rows of a global batch that `rank` trains on."""
    if global_batch % world_size:
        raise ValueError(
            f"--global-batch {global_batch} cannot be split evenly over {world_size} processes; "
            f"choose a multiple of {world_size}"
        )
    per_rank = global_batch // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def local_micro_batch(global_batch: int, micro_batch: int, world_size: int) -> tuple[int, int]:
    """Return (sequences per forward pass, accumulation steps) of one process.

    micro_batch is the per-process forward size (0: the process's whole share).
    It is capped at that share, which must be a multiple of it.
    """
    per_rank = global_batch // world_size
    micro = min(micro_batch or per_rank, per_rank)
    if per_rank % micro:
        raise ValueError(
            f"--global-batch {global_batch} over {world_size} processes gives {per_rank} sequences per process, "
            f"which is not a multiple of --micro-batch {micro_batch}; choose a --micro-batch that divides {per_rank}"
        )
    return micro, per_rank // micro


# Wrapping.
def enable_activation_checkpointing(model: Transformer) -> None:
    """Recompute each transformer block's activations in backward instead of storing them.

    The block's forward is replaced on the instance, so parameter names and
    the state dict do not change.
    """
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        inner = block.forward

        def forward(*args: Any, _inner: Callable = inner) -> torch.Tensor:
            return checkpoint(_inner, *args, use_reentrant=False)

        block.forward = forward


class DataParallelForward:
    """Calls a DDP wrapper for forward passes but reads every other attribute from the inner model.

    The MDM loss calls `model.lm_head` on the masked positions only, after the
    forward pass, and DDP does not expose the inner module's submodules.
    """

    def __init__(self, wrapper: nn.Module, inner: Transformer) -> None:
        self.wrapper = wrapper
        self.inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.wrapper(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def wrap_model(model: Transformer, context: DistributedContext, precision: str) -> Any:
    """Apply DDP or FSDP2 in place where needed and return the callable that training runs forward passes on.

    FSDP2 shards every transformer block, the output head and then the root
    (embedding and final norm), so one block's parameters are gathered at a
    time. With bf16-mixed precision the gathered parameters are bfloat16 and
    gradients are reduced in float32.
    """
    if context.strategy == "none":
        return model
    if context.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [context.device.index] if context.device.type == "cuda" else None
        # The RoPE tables are the only buffers and are identical constants, so no forward pass needs to sync them.
        wrapper = DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
        return DataParallelForward(wrapper, model)

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # NOTE: only gloo on CPU has been run. FSDP2 on CUDA with NCCL, with bf16 gathering and with the
    # fused AdamW that build_optimizer picks on CUDA, is written to the torch 2.13 API but untested.

    if precision == "bf16-mixed":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    # The MDM loss calls the head outside the root's forward; as its own unit it gathers itself when called.
    fully_shard(model.lm_head, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def no_gradient_sync(train_model: Any, context: DistributedContext, sync: bool) -> Any:
    """Return a context in which backward reduces gradients across ranks only when sync is True."""
    import contextlib

    if context.strategy == "ddp" and not sync:
        return train_model.wrapper.no_sync()
    if context.strategy == "fsdp":
        train_model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def clip_gradients(model: nn.Module, max_norm: float, context: DistributedContext) -> float:
    """Clip the global gradient norm to max_norm and return the norm before clipping.

    Under FSDP each rank has a shard of every gradient, so the norm is a
    DTensor that is reduced across ranks before the clipping factor is applied.
    """
    if context.strategy != "fsdp":
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
    parameters = [p for p in model.parameters() if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total.item()


# Full state dicts for checkpoints.
def _state_options(**overrides: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **overrides)


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Name every optimiser parameter in the order of optimizer.state_dict()'s integer ids."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def gather_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, context: DistributedContext
) -> tuple[dict[str, torch.Tensor], dict]:
    """Gather the unsharded weights and optimiser state on rank 0, in CPU memory.

    Every rank must call this. Rank 0 gets the weights by parameter name and
    the optimiser state keyed by integer ids, exactly as a single-process
    model.state_dict() and optimizer.state_dict() return them. The other
    ranks get empty dicts.
    """
    if not context.active:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = _state_options(cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    named = get_optimizer_state_dict(model, optimizer, options=options)
    if not context.is_main:
        return {}, {}
    order = _parameter_names(model, optimizer)
    index = {name: i for i, name in enumerate(order)}
    state = {index[name]: values for name, values in named["state"].items()}
    groups = [dict(group, params=[index[name] for name in group["params"]]) for group in named["param_groups"]]
    return weights, {"state": state, "param_groups": groups}


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    weights: dict[str, torch.Tensor] | None,
    optimizer_state: dict | None,
    context: DistributedContext,
) -> None:
    """Load full weights and optimiser state (given on rank 0 only) into every rank's model and optimiser.

    Rank 0 broadcasts each tensor and every rank keeps its own shard, so the
    other ranks need not read the checkpoint from disk.
    """
    if not context.active:
        model.load_state_dict(weights)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    options = _state_options(broadcast_from_rank0=True)
    named: dict = {}
    if context.is_main:
        order = _parameter_names(model, optimizer)
        named = {
            "state": {order[int(i)]: values for i, values in optimizer_state["state"].items()},
            "param_groups": [dict(g, params=[order[int(i)] for i in g["params"]])
                             for g in optimizer_state["param_groups"]],
        }
    set_model_state_dict(model, weights if context.is_main else {}, options=options)
    set_optimizer_state_dict(model, optimizer, named, options=options)


# Validation.
@torch.no_grad()
def sharded_validation_loss(
    model: Transformer,
    tokens: np.ndarray,
    seq_len: int,
    context: DistributedContext,
    *,
    max_sequences: int,
    batch_size: int,
    mc_samples: int,
    seed: int,
    precision: str,
) -> dict:
    """Return smdm.evaluate.validation.validation_loss's result, with its batches spread over the ranks.

    Batch k (of the same windows, with the same seed + offset) goes to rank
    k mod world_size, and the weighted sums are added across ranks, so the
    result equals the single-process one up to float rounding. Under FSDP each
    forward pass is a collective, so a rank with no batch left in a round
    scores the last batch again and drops the value.
    """
    was_training = model.training
    model.eval()
    device = context.device
    windows = eval_windows(tokens, seq_len + 1, max_sequences)  # (N, L + 1)
    offsets = list(range(0, len(windows), batch_size))
    rounds = math.ceil(len(offsets) / context.world_size)
    weighted, count = 0.0, 0
    for round_index in range(rounds):
        position = round_index * context.world_size + context.rank
        offset = offsets[min(position, len(offsets) - 1)]
        x = torch.from_numpy(windows[offset : offset + batch_size]).to(device)
        if model.config.is_mdm:
            value = mdm_nelbo(model, x[:, :seq_len], mc_samples, seed + offset, precision)
        else:
            with autocast(device, precision):
                value = arm_loss(model, x).item()
        if position < len(offsets):
            weighted += value * x.size(0)
            count += x.size(0)
    model.train(was_training)
    weighted, count = context.all_reduce_sum([weighted, float(count)])
    loss = weighted / count
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "sequences": int(count),
        "tokens": int(count) * seq_len,
        "kind": model.config.kind,
        "bound": model.config.is_mdm,
    }
