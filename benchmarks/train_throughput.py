"""Training throughput of one process: tokens/s, peak memory and MFU.

Each configuration runs in a fresh subprocess so that its peak resident memory
is its own. FLOPs per token are counted as 6 x (every matmul weight, output
head included) + 12 x n_layer x width x seq_len for attention scores and
values (ModelConfig.flops_per_token). MFU divides the achieved FLOP rate by a
matmul peak measured in the same subprocess (a square matmul of the model's
width scale in the same dtype).

"full-head" runs the MDM loss as the paper's reference code does: logits for
every position, then the masked cross-entropy. smdm's default runs the output
head on the masked positions only.

Usage:
  MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 \\
      python benchmarks/train_throughput.py --model 19M --vocab-size 32000 --batch 8 --seq-len 512
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from smdm.config import ModelConfig, TrainConfig
from smdm.diffusion import apply_mask, arm_loss, masking_probability, mdm_loss
from smdm.model import Transformer
from smdm.runtime import autocast
from smdm.train import build_optimizer, draw_step_noise


def full_head_mdm_loss(model, x, t, noise, mask_id, eps):
    """Compute the MDM loss as the reference code does: logits at every position, masked CE weighted by 1 / p."""
    p = masking_probability(t, eps)[:, None]
    noisy, mask = apply_mask(x, p, mask_id, noise)
    logits = model(noisy)  # (B, L, V)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), x.flatten(), reduction="none").view_as(x)
    return (ce * mask / p).sum() / x.numel()


def matmul_peak_tflops(size: int, dtype: torch.dtype, seconds: float = 2.0) -> float:
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e12


def run_one(args) -> dict:
    torch.manual_seed(0)
    config = ModelConfig.from_name(args.model, kind=args.kind, vocab_size=args.vocab_size, block_size=args.seq_len)
    train_config = TrainConfig(seq_len=args.seq_len, global_batch=args.batch, max_steps=args.steps, ssl_ratio=0.0,
                               precision=args.precision, device="cpu")
    device = torch.device(args.device)
    model = Transformer(config).to(device)
    optimizer = build_optimizer(model, train_config, device)
    data = torch.randint(0, args.vocab_size, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    data = data.to(device)
    loss_fn = full_head_mdm_loss if args.loss == "full-head" else mdm_loss

    def step(index: int) -> float:
        with autocast(device, args.precision):
            if args.kind == "mdm":
                noise = draw_step_noise(train_config, index)
                loss = loss_fn(model, data[:, : args.seq_len], noise.t.to(device), noise.noise.to(device),
                               config.mask_id, train_config.mask_eps)
            else:
                loss = arm_loss(model, data)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for index in range(args.warmup):
        step(index)
    start = time.perf_counter()
    for index in range(args.steps):
        step(args.warmup + index)
    elapsed = time.perf_counter() - start

    tokens_per_s = args.batch * args.seq_len * args.steps / elapsed
    flops_per_token = config.flops_per_token(args.seq_len)
    peak_dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32
    peak = matmul_peak_tflops(1024, peak_dtype)
    return {
        "model": args.model, "kind": args.kind, "loss_scheme": args.loss, "precision": args.precision,
        "batch": args.batch, "seq_len": args.seq_len, "vocab_size": args.vocab_size,
        "tokens_per_s": tokens_per_s, "flops_per_token": flops_per_token,
        "achieved_tflops": tokens_per_s * flops_per_token / 1e12, "matmul_peak_tflops": peak,
        "mfu": tokens_per_s * flops_per_token / 1e12 / peak,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="19M")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", action="store_true", help="run the single configuration given below (internal)")
    parser.add_argument("--kind", default="mdm")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--loss", default="masked-head", choices=("masked-head", "full-head"))
    parser.add_argument("--out", default="", help="append the JSON rows to this file")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return

    rows = []
    for precision in ("fp32", "bf16-mixed"):
        for kind, loss in (("mdm", "full-head"), ("mdm", "masked-head"), ("arm", "masked-head")):
            command = [sys.executable, __file__, "--one", "--kind", kind, "--precision", precision, "--loss", loss,
                       "--model", args.model, "--vocab-size", str(args.vocab_size), "--batch", str(args.batch),
                       "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--device", args.device]
            output = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ).stdout
            row = json.loads(output.strip().splitlines()[-1])
            rows.append(row)
            print(f"{kind} {loss:11s} {precision:10s} {row['tokens_per_s']:8.0f} tok/s  MFU {row['mfu']:.3f}  "
                  f"peak RSS {row['peak_rss_mib']:.0f} MiB  matmul peak {row['matmul_peak_tflops']:.3f} TFLOP/s",
                  flush=True)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    print(f"MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_', 'unset')} "
          f"MALLOC_TRIM_THRESHOLD_={os.environ.get('MALLOC_TRIM_THRESHOLD_', 'unset')}")


if __name__ == "__main__":
    main()
