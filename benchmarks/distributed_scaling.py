"""Throughput of `smdm train` on one and several processes, and MFU on a GPU.

cpu mode: trains the same run (same global batch) as one plain process and as
N processes under torchrun with DDP on gloo, each process limited to
--threads threads, and reports tokens/s and the scaling efficiency
tokens_per_s(N) / (N * tokens_per_s(1)).

gpu mode: trains the 170M and 1028M shapes of smdm.config.PAPER_SIZES on one GPU with FSDP2 and
bf16-mixed precision (torchrun, one process) and reports tokens/s and MFU =
tokens_per_s * flops_per_token / peak FLOP/s, where flops_per_token is
ModelConfig.flops_per_token (6 x matmul weights, head included, plus
attention). The MDM computes its output head on the masked positions only,
so this count overstates its work by up to half of the head's share.

Both modes train on random tokens of a word-level tokenizer of --vocab-size ids
(throughput does not depend on the text), prepared through smdm.data.prepare.

Examples:
  python benchmarks/distributed_scaling.py cpu --processes 1 2 --model tiny-3.2M
  python benchmarks/distributed_scaling.py gpu --models 170M 1028M --peak-tflops 989
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SOURCE))

from smdm.config import ModelConfig

# Dense bf16 peak of the GPU's tensor cores, from the vendors' data sheets (SXM parts).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def make_data(folder: Path, vocab_size: int, n_tokens: int, seed: int = 0) -> Path:
    """Prepare a data folder of n_tokens random words from a word-level tokenizer of vocab_size ids."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from smdm.data.shards import META_FILE, prepare
    from smdm.data.tokenizer import EOS_TOKEN, PAD_TOKEN, Tokenizer

    data = folder / f"random-{vocab_size}"
    if (data / META_FILE).is_file():
        return data
    folder.mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(vocab_size - 2)]
    vocab = {word: i for i, word in enumerate(words)}
    vocab[EOS_TOKEN], vocab[PAD_TOKEN] = vocab_size - 2, vocab_size - 1
    backend = HFTokenizer(models.WordLevel(vocab, unk_token=PAD_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = Tokenizer(backend, source=f"random words, {vocab_size} ids")

    rng = random.Random(seed)
    corpus = folder / f"random-{vocab_size}.txt"
    with open(corpus, "w", encoding="utf-8") as handle:
        handle.writelines(" ".join(rng.choices(words, k=1000)) + "\n\n" for _ in range(n_tokens // 1000))
    prepare(corpus, data, tokenizer=tokenizer, val_fraction=0.02)
    return data


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_train(processes: int | None, train_flags: list[str], out: Path, threads: int | None) -> dict:
    """Run `smdm train` (under torchrun when processes is set) and return its metrics and wall time."""
    command = [sys.executable]
    if processes is not None:
        command += ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(processes),
                    "--master-addr", "127.0.0.1", "--master-port", str(free_loopback_port())]
    command += ["-m", "smdm", "train", "--out", str(out), *train_flags]
    env = dict(os.environ, PYTHONPATH=f"{SOURCE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.time()
    completed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stderr[-4000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"rows": [row for row in rows if "loss" in row], "wall_s": time.time() - started}


def steady_rate(rows: list[dict], skip: int) -> float:
    """Tokens per second over the logged steps after the first `skip` (which include start-up costs)."""
    kept = rows[skip:]
    tokens = kept[-1]["tokens"] - rows[skip - 1]["tokens"] if skip else kept[-1]["tokens"]
    seconds = kept[-1]["elapsed_s"] - (rows[skip - 1]["elapsed_s"] if skip else 0.0)
    return tokens / seconds


def cpu_mode(args: argparse.Namespace) -> None:
    work = Path(args.work or tempfile.mkdtemp(prefix="smdm-scaling-"))
    data = make_data(work, args.vocab_size, args.tokens)
    flags = ["--data", str(data), "--model", args.model, "--seq-len", str(args.seq_len),
             "--global-batch", str(args.global_batch), "--micro-batch", str(args.micro_batch),
             "--max-steps", str(args.steps), "--log-interval", "1", "--eval-interval", str(args.steps + 1),
             "--eval-batches", "1", "--checkpoint-interval", str(10 * args.steps), "--device", "cpu",
             "--precision", "fp32"]
    results = []
    for processes in args.processes:
        rates = []
        for repeat in range(args.repeats):
            out = work / f"run-{processes}-{repeat}"
            launcher = None if processes == 1 else processes
            extra = [] if processes == 1 else ["--strategy", "ddp"]
            run = run_train(launcher, flags + extra, out, args.threads)
            rates.append(steady_rate(run["rows"], args.skip))
        results.append({"processes": processes, "tokens_per_s": max(rates), "all_tokens_per_s": rates})
    base = results[0]["tokens_per_s"] / results[0]["processes"]
    for result in results:
        result["efficiency"] = result["tokens_per_s"] / (result["processes"] * base)
    print(json.dumps({"mode": "cpu", "model": args.model, "threads_per_process": args.threads,
                      "global_batch": args.global_batch, "seq_len": args.seq_len, "results": results}, indent=2))


def gpu_mode(args: argparse.Namespace) -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu mode needs a CUDA device; none is available")
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    if peak is None:
        raise SystemExit(f"no peak bf16 TFLOP/s known for {name!r}; pass --peak-tflops")
    work = Path(args.work or tempfile.mkdtemp(prefix="smdm-mfu-"))
    data = make_data(work, args.vocab_size, args.tokens)
    results = []
    for model in args.models:
        flags = ["--data", str(data), "--model", model, "--kind", args.kind, "--seq-len", str(args.seq_len),
                 "--global-batch", str(args.global_batch), "--micro-batch", str(args.micro_batch),
                 "--max-steps", str(args.steps), "--log-interval", "1", "--eval-interval", str(args.steps + 1),
                 "--eval-batches", "1", "--checkpoint-interval", str(10 * args.steps), "--device", "cuda",
                 "--precision", "bf16-mixed", "--strategy", "fsdp"]
        if args.activation_checkpointing:
            flags.append("--activation-checkpointing")
        run = run_train(1, flags, work / f"run-{model}", None)
        rate = steady_rate(run["rows"], args.skip)
        config = ModelConfig.from_name(model, kind=args.kind, vocab_size=args.vocab_size, block_size=args.seq_len)
        flops = config.flops_per_token(args.seq_len)
        results.append({"model": model, "tokens_per_s": rate, "flops_per_token": flops,
                        "mfu": rate * flops / (peak * 1e12)})
    print(json.dumps({"mode": "gpu", "device": name, "peak_tflops": peak, "kind": args.kind,
                      "seq_len": args.seq_len, "global_batch": args.global_batch,
                      "micro_batch": args.micro_batch, "results": results}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)

    cpu = sub.add_parser("cpu", help="scaling efficiency from 1 to N processes on CPU")
    cpu.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    cpu.add_argument("--model", default="tiny-3.2M")
    cpu.add_argument("--seq-len", type=int, default=128)
    cpu.add_argument("--global-batch", type=int, default=16)
    cpu.add_argument("--micro-batch", type=int, default=0)
    cpu.add_argument("--steps", type=int, default=12)
    cpu.add_argument("--skip", type=int, default=2, help="logged steps left out of the rate (start-up)")
    cpu.add_argument("--threads", type=int, default=1, help="OMP threads of each process")
    cpu.add_argument("--repeats", type=int, default=2, help="runs per process count; the fastest is kept")
    cpu.add_argument("--vocab-size", type=int, default=4096)
    cpu.add_argument("--tokens", type=int, default=200_000, help="random training tokens to prepare")
    cpu.add_argument("--work", default=None, help="folder for data and runs (default: a new temporary folder)")

    gpu = sub.add_parser("gpu", help="tokens/s and MFU on one GPU with FSDP2 and bf16")
    gpu.add_argument("--models", nargs="+", default=["170M", "1028M"])
    gpu.add_argument("--kind", choices=("mdm", "arm"), default="mdm")
    gpu.add_argument("--seq-len", type=int, default=2048)
    gpu.add_argument("--global-batch", type=int, default=32)
    gpu.add_argument("--micro-batch", type=int, default=8)
    gpu.add_argument("--steps", type=int, default=20)
    gpu.add_argument("--skip", type=int, default=5, help="logged steps left out of the rate (start-up, warm-up)")
    gpu.add_argument("--activation-checkpointing", action="store_true")
    gpu.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s of the GPU")
    gpu.add_argument("--vocab-size", type=int, default=32000,
                     help="ids of the random-word tokenizer (default: PAPER_VOCAB_SIZE, 32000)")
    gpu.add_argument("--tokens", type=int, default=5_000_000, help="random training tokens to prepare")
    gpu.add_argument("--work", default=None, help="folder for data and runs (default: a new temporary folder)")

    args = parser.parse_args()
    if args.mode == "cpu":
        cpu_mode(args)
    else:
        gpu_mode(args)


if __name__ == "__main__":
    main()
