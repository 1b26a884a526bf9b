"""Multi-process training on CPU with gloo: two processes must train exactly like one.

Two processes are started once per module with torch.multiprocessing (a file
store, no network port) and train the same tiny run with DDP and with FSDP2,
then fine-tune on prompt/response pairs with both. Their metrics, checkpoints
and the rows each rank read are compared with a single-process run in this
process.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import smdm.train
from smdm.checkpoint import CHECKPOINTS_DIR, LATEST_FILE, MODEL_FILE, OPTIMIZER_FILE
from smdm.config import ModelConfig, TrainConfig
from smdm.data.sft import read_prompt_response
from smdm.data.shards import TokenData, prepare
from smdm.data.tokenizer import Tokenizer, train_bpe
from smdm.distributed import local_micro_batch, rows_of_rank, setup_distributed
from smdm.finetune import FinetuneConfig, finetune
from smdm.model import Transformer
from smdm.train import Trainer

WORLD_SIZE = 2
MODEL = "tiny-0.1M"
SEQ_LEN = 16
# Relative tolerance of float32 sums taken in another order (row blocks, all-reduce).
RTOL = 1e-5

TRAIN = {
    "seq_len": SEQ_LEN, "global_batch": 8, "micro_batch": 2, "max_steps": 4, "min_warmup_steps": 1, "lr": 3e-3,
    "ssl_ratio": 0.5, "eval_interval": 2, "eval_batches": 3, "eval_mc_samples": 2, "log_interval": 1,
    "checkpoint_interval": 2, "device": "cpu", "precision": "fp32",
}
# name -> (model kind, Trainer options). FSDP also recomputes activations, which must not change any number.
STRATEGY_RUNS = {
    "ddp": ("mdm", {"strategy": "ddp"}),
    "fsdp": ("mdm", {"strategy": "fsdp", "activation_checkpointing": True}),
    "fsdp-arm": ("arm", {"strategy": "fsdp"}),
}
# Fine-tuning: 8 rows per step, each rank's 4 in micro-batches of 2. The single process takes all 8 at once.
SFT_SEQ_LEN = 64
SFT = {"seq_len": SFT_SEQ_LEN, "batch_size": 8, "micro_batch": 2, "steps": 3, "lr": 3e-3, "precision": "fp32",
       "log_interval": 1, "checkpoint_interval": 0, "device": "cpu"}
# name -> (model kind, strategy, FinetuneConfig options)
SFT_RUNS = {
    "sft-ddp": ("mdm", "ddp", {"prompt_dropout": 0.25}),
    "sft-fsdp-arm": ("arm", "fsdp", {}),
}


def model_config(data_dir: Path, kind: str = "mdm") -> ModelConfig:
    return ModelConfig.from_name(MODEL, kind=kind, vocab_size=TokenData(data_dir).vocab_size, block_size=SEQ_LEN)


READ_WINDOWS, MDM_LOSS = smdm.train.read_windows, smdm.train.mdm_loss


def install_spies(record: list[dict], on_read=None) -> None:
    """Record the window offsets and diffusion times that each training micro-batch uses.

    on_read, when given, is called with the number of reads so far before each read.
    """
    read_windows, mdm_loss = READ_WINDOWS, MDM_LOSS

    def spy_read_windows(tokens, starts, window):
        if on_read is not None:
            on_read(len(record))
        record.append({"starts": [int(s) for s in starts]})
        return read_windows(tokens, starts, window)

    def spy_mdm_loss(model, x, t, noise, mask_id, eps):
        record[-1]["t"] = t.tolist()
        return mdm_loss(model, x, t, noise, mask_id, eps)

    smdm.train.read_windows = spy_read_windows
    smdm.train.mdm_loss = spy_mdm_loss


def sft_model(kind: str, tokenizer: Tokenizer) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name(MODEL, kind=kind, vocab_size=tokenizer.vocab_size,
                                             block_size=SFT_SEQ_LEN))


def run_sft(name: str, sft_dir: Path, out: Path, micro_batch: int, context=None) -> list[float]:
    """Fine-tune run `name` of SFT_RUNS into out and return its losses."""
    kind, _, options = SFT_RUNS[name]
    tokenizer = Tokenizer.load(sft_dir / "tokenizer.json")
    pairs = read_prompt_response(sft_dir / "pairs.jsonl")
    config = FinetuneConfig(**dict(SFT, micro_batch=micro_batch, **options))
    model = sft_model(kind, tokenizer).to(context.device if context else "cpu")
    return finetune(model, tokenizer, pairs, out, config, context=context).losses


def distributed_worker(rank: int, store_path: str, data_dir: str, out_dir: str, sft_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    # A short timeout turns a rank that waits on a collective the other never joins into an error, not a hang.
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=90))
    try:
        for name, (kind, options) in STRATEGY_RUNS.items():
            record: list[dict] = []
            install_spies(record)
            trainer = Trainer(model_config(Path(data_dir), kind), TrainConfig(**TRAIN), data_dir,
                              Path(out_dir) / name, **options)
            result = trainer.fit()
            summary = {"reads": record, "history": result.history, "strategy": trainer.dist.strategy,
                       "micro_batch": trainer.micro_batch, "accumulation": trainer.accumulation_steps}
            (Path(out_dir) / f"{name}-rank{rank}.json").write_text(json.dumps(summary))

        # Only rank 1 receives SIGTERM, during the second step (its reads 2 and 3); both ranks must stop after it.
        def signal_rank1(reads: int) -> None:
            if rank == 1 and reads == 2:
                os.kill(os.getpid(), signal.SIGTERM)

        install_spies([], on_read=signal_rank1)
        trainer = Trainer(model_config(Path(data_dir)), TrainConfig(**TRAIN), data_dir, Path(out_dir) / "stop",
                          strategy="ddp")
        with contextlib.suppress(KeyboardInterrupt):  # fit raises it after the stop checkpoint
            trainer.fit()
        (Path(out_dir) / f"stop-rank{rank}.json").write_text(json.dumps({"steps": trainer.step}))

        for name, (_, strategy, _) in SFT_RUNS.items():
            losses = run_sft(name, Path(sft_dir), Path(out_dir) / name, SFT["micro_batch"],
                             setup_distributed("cpu", strategy))
            (Path(out_dir) / f"{name}-rank{rank}.json").write_text(json.dumps({"losses": losses}))
    finally:
        smdm.train.read_windows, smdm.train.mdm_loss = READ_WINDOWS, MDM_LOSS
        dist.destroy_process_group()


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Run this module's in-process training on one thread, as each spawned process does, to share 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from conftest import shared_path

    text = shared_path("gutenberg/moby_dick.txt").read_text(encoding="utf-8")[:40000]
    folder = tmp_path_factory.mktemp("distributed")
    (folder / "corpus.txt").write_text(text, encoding="utf-8")
    prepare(folder / "corpus.txt", folder / "data", vocab_size=300)
    return folder / "data"


def train_single_process(data_dir: Path, run_dir: Path, kind: str) -> dict:
    """Train the reference run: one process, no process group."""
    record: list[dict] = []
    install_spies(record)
    try:
        result = Trainer(model_config(data_dir, kind), TrainConfig(**TRAIN), data_dir, run_dir).fit()
    finally:
        smdm.train.read_windows, smdm.train.mdm_loss = READ_WINDOWS, MDM_LOSS
    return {"reads": record, "history": result.history, "run_dir": run_dir}


@pytest.fixture(scope="module")
def single_runs(data_dir, tmp_path_factory) -> dict:
    return {kind: train_single_process(data_dir, tmp_path_factory.mktemp("single") / kind, kind)
            for kind in ("mdm", "arm")}


@pytest.fixture(scope="module")
def single_run(single_runs) -> dict:
    return single_runs["mdm"]


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory) -> Path:
    """Real prompt/response pairs and a BPE trained on them, as files every process reads."""
    from conftest import shared_path

    folder = tmp_path_factory.mktemp("sft")
    pairs = read_prompt_response(shared_path("chat_sft/dolly15k_prompt_response.jsonl"), limit=60)
    tokenizer = train_bpe((text for pair in pairs for text in (pair.prompt, pair.response)), 300)
    tokenizer.save(folder)
    with open(folder / "pairs.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"prompt": pair.prompt, "response": pair.response}) + "\n" for pair in pairs)
    return folder


@pytest.fixture(scope="module")
def two_process_runs(data_dir, sft_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("two")
    mp.spawn(distributed_worker, args=(str(out / "store"), str(data_dir), str(out), str(sft_dir)),
             nprocs=WORLD_SIZE)
    runs = {}
    for name in STRATEGY_RUNS:
        ranks = [json.loads((out / f"{name}-rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
        runs[name] = {"ranks": ranks, "run_dir": out / name}
    for name in SFT_RUNS:
        runs[name] = {"ranks": [json.loads((out / f"{name}-rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)],
                      "run_dir": out / name}
    runs["stop"] = {"ranks": [json.loads((out / f"stop-rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)],
                    "run_dir": out / "stop"}
    return runs


def metric_rows(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(row["step"], row[key]) for row in rows if key in row]


def assert_close_rows(actual: list[tuple[int, float]], expected: list[tuple[int, float]], what: str) -> None:
    assert [step for step, _ in actual] == [step for step, _ in expected], what
    for (step, a), (_, e) in zip(actual, expected):
        assert math.isclose(a, e, rel_tol=RTOL), f"{what} at step {step}: {a} vs single-process {e}"


def latest_tensors(run_dir: Path, file: str) -> dict[str, torch.Tensor]:
    root = run_dir / CHECKPOINTS_DIR
    return load_file(root / (root / LATEST_FILE).read_text().strip() / file)


@pytest.mark.parametrize("strategy", list(STRATEGY_RUNS))
def test_two_processes_match_loss_curve(strategy, single_runs, two_process_runs):
    kind, _ = STRATEGY_RUNS[strategy]
    single_run = single_runs[kind]
    run = two_process_runs[strategy]
    rank0 = run["ranks"][0]
    assert rank0["strategy"] == strategy.split("-")[0]
    assert (rank0["micro_batch"], rank0["accumulation"]) == (2, 2)
    for key in ("loss", "grad_norm", "val_loss"):
        assert_close_rows(metric_rows(rank0["history"], key), metric_rows(single_run["history"], key), key)
    # Every rank reports the reduced metrics, not its own share.
    assert metric_rows(run["ranks"][1]["history"], "loss") == metric_rows(rank0["history"], "loss")

    # rank 0 alone wrote the metrics file, one row per record.
    written = [json.loads(line) for line in (run["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    assert len(written) == len(rank0["history"])

    # The checkpoint has the single-process format: the same weights and AdamW state under the same keys.
    # Adam's update m / sqrt(v) magnifies float noise in near-zero gradients up to a fraction of the
    # learning rate (3e-3). So the weights get an absolute tolerance, and a wrong update is off by about lr.
    for file, atol in ((MODEL_FILE, 1e-5), (OPTIMIZER_FILE, 1e-7)):
        expected = latest_tensors(single_run["run_dir"], file)
        actual = latest_tensors(run["run_dir"], file)
        assert sorted(actual) == sorted(expected), file
        for name, tensor in expected.items():
            torch.testing.assert_close(actual[name], tensor, rtol=1e-4, atol=atol, msg=f"{file}: {name}")


def test_ranks_read_disjoint_rows_of_global_batch(single_run, two_process_runs):
    ranks = two_process_runs["ddp"]["ranks"]
    micro_batches_per_step = 2  # per rank: 4 rows in micro-batches of 2
    single = single_run["reads"]
    steps = TRAIN["max_steps"]
    assert len(single) == steps * 4
    for step in range(steps):
        expected_starts = [s for read in single[step * 4 : step * 4 + 4] for s in read["starts"]]
        expected_t = [t for read in single[step * 4 : step * 4 + 4] for t in read["t"]]
        seen_starts, seen_t = [], []
        for rank in ranks:
            reads = rank["reads"][step * micro_batches_per_step : (step + 1) * micro_batches_per_step]
            seen_starts += [s for read in reads for s in read["starts"]]
            seen_t += [t for read in reads for t in read["t"]]
        # Rank 0 then rank 1 reproduce the single-process order exactly: no gap, no overlap.
        assert seen_starts == expected_starts, f"step {step}"
        assert seen_t == expected_t, f"step {step}"


@pytest.mark.parametrize("strategy", list(STRATEGY_RUNS))
def test_two_process_checkpoint_resumes_in_one(strategy, data_dir, single_runs, two_process_runs, tmp_path):
    kind, _ = STRATEGY_RUNS[strategy]
    single_run = single_runs[kind]
    run_dir = tmp_path / "run"
    shutil.copytree(two_process_runs[strategy]["run_dir"], run_dir)
    # Act as if the job died after the checkpoint of step 2.
    root = run_dir / CHECKPOINTS_DIR
    (root / LATEST_FILE).write_text("step-0000002")
    shutil.rmtree(root / "step-0000004")

    trainer = Trainer(model_config(data_dir, kind), TrainConfig(**TRAIN), data_dir, run_dir, resume=True)
    assert trainer.dist.world_size == 1
    assert trainer.step == 2
    result = trainer.fit()

    expected = [row for row in single_run["history"] if row["step"] > 2]
    for key in ("loss", "grad_norm", "val_loss"):
        assert_close_rows(metric_rows(result.history, key), metric_rows(expected, key), key)
    # The metrics file contains the whole curve once: the rows after step 2 were rewritten, not duplicated.
    written = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in written] == [row["step"] for row in single_run["history"]]


def test_signal_to_one_rank_stops_all(two_process_runs):
    run = two_process_runs["stop"]
    assert [rank["steps"] for rank in run["ranks"]] == [2, 2]
    root = run["run_dir"] / CHECKPOINTS_DIR
    assert (root / LATEST_FILE).read_text() == "step-0000002"
    assert (root / "step-0000002" / MODEL_FILE).is_file()
    written = [json.loads(line) for line in (run["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    assert max(row["step"] for row in written) == 2


@pytest.mark.parametrize("name", list(SFT_RUNS))
def test_two_process_finetune_matches_one(name, sft_dir, two_process_runs, tmp_path):
    # One process, the whole batch in one forward pass: no accumulation, no process group.
    expected = run_sft(name, sft_dir, tmp_path / "single", micro_batch=0)
    run = two_process_runs[name]
    for rank in run["ranks"]:
        assert len(rank["losses"]) == SFT["steps"]
        for step, (actual, single) in enumerate(zip(rank["losses"], expected)):
            assert math.isclose(actual, single, rel_tol=RTOL), f"step {step + 1}: {actual} vs one process {single}"
    written = [json.loads(line) for line in (run["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in written] == [1, 2, 3]
    # Adam hides a gradient off by a constant factor in the weights, but the logged norms show it.
    single_rows = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    for row, single in zip(written, single_rows):
        assert math.isclose(row["grad_norm"], single["grad_norm"], rel_tol=1e-4), (row, single)
    expected_weights = latest_tensors(tmp_path / "single", MODEL_FILE)
    actual_weights = latest_tensors(run["run_dir"], MODEL_FILE)
    assert sorted(actual_weights) == sorted(expected_weights)
    for key, tensor in expected_weights.items():
        torch.testing.assert_close(actual_weights[key], tensor, rtol=1e-4, atol=1e-5, msg=key)


def test_activation_checkpointing_keeps_loss(data_dir, single_run, tmp_path):
    trainer = Trainer(model_config(data_dir), TrainConfig(**TRAIN), data_dir, tmp_path / "run",
                      activation_checkpointing=True)
    result = trainer.fit()
    for key in ("loss", "grad_norm"):
        assert_close_rows(metric_rows(result.history, key), metric_rows(single_run["history"], key), key)


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_under_torchrun(data_dir, single_run, tmp_path):
    out = tmp_path / "run"
    flags = {"--seq-len": SEQ_LEN, "--global-batch": TRAIN["global_batch"], "--micro-batch": TRAIN["micro_batch"],
             "--max-steps": TRAIN["max_steps"], "--min-warmup-steps": 1, "--lr": TRAIN["lr"],
             "--ssl-ratio": TRAIN["ssl_ratio"], "--eval-interval": 2, "--eval-batches": 3, "--eval-mc-samples": 2,
             "--log-interval": 1, "--checkpoint-interval": 2, "--device": "cpu", "--precision": "fp32"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(WORLD_SIZE),
               "--master-addr", "127.0.0.1", "--master-port", str(free_loopback_port()),
               "-m", "smdm", "train", "--data", str(data_dir), "--out", str(out), "--model", MODEL,
               "--strategy", "ddp"]
    for flag, value in flags.items():
        command += [flag, str(value)]
    source = Path(smdm.train.__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{source}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]

    # Only rank 0 prints the summary.
    summary = json.loads(completed.stdout)
    assert summary["steps"] == TRAIN["max_steps"]
    config = json.loads((out / "config.json").read_text())
    assert (config["world_size"], config["strategy"]) == (WORLD_SIZE, "ddp")
    written = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert_close_rows(metric_rows(written, "loss"), metric_rows(single_run["history"], "loss"), "loss")


def test_batch_split_rejects_uneven_shares():
    assert rows_of_rank(8, 1, 2) == slice(4, 8)
    assert local_micro_batch(32, 0, 4) == (8, 1)
    assert local_micro_batch(32, 4, 2) == (4, 4)
    # A micro-batch larger than a rank's share is capped at the share.
    assert local_micro_batch(8, 8, 2) == (4, 1)
    with pytest.raises(ValueError, match="--global-batch 6 cannot be split evenly over 4 processes"):
        rows_of_rank(6, 0, 4)
    with pytest.raises(ValueError, match="12 sequences per process"):
        local_micro_batch(24, 8, 2)


def test_finetune_cli_under_torchrun(sft_dir, tmp_path):
    from smdm.cli import main

    args = ["finetune", "--data", str(sft_dir / "pairs.jsonl"), "--kind", "mdm", "--model", MODEL,
            "--vocab-size", "300", "--seq-len", str(SFT_SEQ_LEN), "--batch-size", "8", "--steps", "2", "--lr", "3e-3",
            "--log-interval", "1", "--device", "cpu", "--precision", "fp32", "--prompt-dropout", "0.25"]
    assert main(args + ["--out", str(tmp_path / "single")]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(WORLD_SIZE),
               "--master-addr", "127.0.0.1", "--master-port", str(free_loopback_port()), "-m", "smdm",
               *args, "--out", str(tmp_path / "two"), "--strategy", "ddp", "--micro-batch", "2"]
    source = Path(smdm.train.__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{source}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    # Only rank 0 prints the summary, and both ranks trained with the BPE that rank 0 built.
    summary = json.loads(completed.stdout)
    assert summary["steps"] == 2
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("single", "two")}
    assert [row["step"] for row in rows["two"]] == [1, 2]
    for one, two in zip(rows["single"], rows["two"]):
        assert math.isclose(two["loss"], one["loss"], rel_tol=RTOL), (two, one)
    config = json.loads((tmp_path / "two" / "checkpoints" / "step-0000002" / "config.json").read_text())
    assert (config["train"]["world_size"], config["train"]["strategy"]) == (WORLD_SIZE, "ddp")
