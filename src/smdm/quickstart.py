"""The main job in one call: prepare the default corpus, train an MDM and an ARM of equal size
on the same tokens, compare their validation losses and print samples from both."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path


from smdm.config import ModelConfig, TrainConfig
from smdm.data.corpus import DEFAULT_CORPUS
from smdm.data.shards import META_FILE, TokenData, prepare
from smdm.generate import SampleConfig
from smdm.runtime import resolve_device
from smdm.sampling_api import sample_from_model
from smdm.train import Trainer

log = logging.getLogger(__name__)

QUICKSTART_VOCAB = 4096
QUICKSTART_SEQ_LEN = 128
QUICKSTART_BATCH = 32
QUICKSTART_PROMPT = "HAMLET:\n"


def measure_steps(trainer: Trainer, seconds: float) -> int:
    """Estimate how many steps fit in `seconds` by timing steps of a throwaway copy of the run.

    The first step is not timed: it pays for one-time allocations and kernel selection.
    """
    trainer.train_step()
    start = time.time()
    for _ in range(3):
        trainer.train_step()
    per_step = (time.time() - start) / 3
    trainer.optimizer.zero_grad(set_to_none=True)
    return max(20, int(seconds / per_step))


def quickstart(
    out: str | Path = "runs/quickstart",
    *,
    minutes: float = 8.0,
    model: str = "tiny-0.8M",
    max_steps: int = 0,
    device: str = "auto",
    corpus: str = DEFAULT_CORPUS,
) -> dict:
    """Run the main job and return the summary that it prints (also written to out/summary.json)."""
    out = Path(out)
    data_dir = out / "data"
    if not (data_dir / META_FILE).is_file():
        prepare(corpus, data_dir, vocab_size=QUICKSTART_VOCAB)
    data = TokenData(data_dir)
    resolved_device = str(resolve_device(device))

    summary: dict = {"data": str(data_dir), "model": model, "runs": {}}
    steps = max_steps
    for kind in ("mdm", "arm"):
        model_config = ModelConfig.from_name(model, kind=kind, vocab_size=data.vocab_size, block_size=QUICKSTART_SEQ_LEN)
        previous = out / kind / "config.json"
        if not steps and previous.is_file():
            steps = json.loads(previous.read_text(encoding="utf-8"))["total_steps"]  # a rerun continues that run
        if not steps:
            # Size the run from the MDM's measured speed; the ARM then trains on the same number of tokens.
            probe = TrainConfig(seq_len=QUICKSTART_SEQ_LEN, global_batch=QUICKSTART_BATCH, max_steps=1, device=resolved_device)
            steps = measure_steps(Trainer(model_config, probe, data_dir, out / "probe", resume=True), minutes * 60 / 2.4)
        train_config = TrainConfig(
            seq_len=QUICKSTART_SEQ_LEN, global_batch=QUICKSTART_BATCH, max_steps=steps, lr=3e-3, min_lr=3e-4,
            min_warmup_steps=min(100, steps // 10), eval_interval=max(50, steps // 4), eval_batches=8,
            eval_mc_samples=8, log_interval=max(1, steps // 40), checkpoint_interval=max(50, steps // 4),
            ssl_ratio=0.01, device=resolved_device,
        )
        run_dir = out / kind
        trainer = Trainer(model_config, train_config, data_dir, run_dir, resume=True)
        result = trainer.fit()
        samples = sample_from_model(
            trainer.model.eval(), data.tokenizer, [QUICKSTART_PROMPT],
            SampleConfig(max_new_tokens=96, steps=96, temperature=1.0, seed=0), num_samples=2,
        )
        summary["runs"][kind] = {
            "run": str(run_dir),
            "steps": result.steps,
            "tokens": result.tokens,
            "val_loss": result.final_val["loss"],
            "val_loss_is_bound": result.final_val["bound"],
            "samples": [prompt + text for prompt, text in samples],
        }
    _remove_probe(out / "probe")
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print_summary(summary)
    return summary


def _remove_probe(folder: Path) -> None:
    if folder.exists():
        for file in sorted(folder.rglob("*"), reverse=True):
            file.unlink() if file.is_file() else file.rmdir()
        folder.rmdir()


def print_summary(summary: dict) -> None:
    mdm, arm = summary["runs"]["mdm"], summary["runs"]["arm"]
    print()
    print(f"Validation loss on held-out Shakespeare ({summary['model']} models, nats per token):")
    print(f"  MDM  {mdm['val_loss']:.4f}  (upper bound on NLL: Monte Carlo NELBO)")
    print(f"  ARM  {arm['val_loss']:.4f}  (exact NLL)")
    for kind, run in (("MDM", mdm), ("ARM", arm)):
        print(f"\nSamples from the {kind} (trained for {run['steps']} steps on {run['tokens']:,} tokens):")
        for number, text in enumerate(run["samples"], start=1):
            print(f"  --- sample {number}")
            print("  | " + text.replace("\n", "\n  | "))
    print(f"\nRuns are in {Path(mdm['run']).parent}; sample again with "
          f"`smdm sample --checkpoint {mdm['run']} --prompt 'ROMEO:'`")


