"""The `smdm` command. Each verb is a function of parsed arguments; nothing is parsed at import."""

from __future__ import annotations

import argparse
import os
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("smdm")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--kind", choices=("mdm", "arm"), default="mdm", help="masked diffusion or autoregressive")
    group.add_argument("--model", default="tiny-0.8M", help="size name (see `smdm sizes`), for example 19M or tiny-0.8M")
    group.add_argument("--block-size", type=int, default=0, help="context length of the model (default: --seq-len)")


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    from smdm.config import TrainConfig

    defaults = TrainConfig()
    group = parser.add_argument_group("training")
    group.add_argument("--seq-len", type=int, default=defaults.seq_len, help="training sequence length in tokens")
    group.add_argument("--global-batch", type=int, default=defaults.global_batch, help="sequences per optimiser step")
    group.add_argument("--micro-batch", type=int, default=defaults.micro_batch,
                       help="sequences per forward pass of each process (0: the process's whole share of the "
                            "global batch); the rest is accumulated")
    group.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    group.add_argument("--min-lr", type=float, default=defaults.min_lr, help="learning rate at the end of the cosine")
    group.add_argument("--warmup-fraction", type=float, default=defaults.warmup_fraction,
                       help="share of the steps spent in linear warmup (at least --min-warmup-steps)")
    group.add_argument("--min-warmup-steps", type=int, default=defaults.min_warmup_steps,
                       help="minimum warmup in steps, capped at the run length")
    group.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay of matrices")
    group.add_argument("--grad-clip", type=float, default=defaults.grad_clip, help="maximum global gradient norm")
    budget = parser.add_argument_group("budget (give exactly one)")
    budget.add_argument("--max-steps", type=int, default=0, help="optimiser steps")
    budget.add_argument("--max-tokens", type=int, default=0, help="training tokens")
    budget.add_argument("--flops", type=float, default=0.0, help="compute budget C = 6 N D in FLOPs, e.g. 1e15")
    group.add_argument("--ssl-ratio", type=float, default=defaults.ssl_ratio, help="stochastic sequence length probability (MDM)")
    group.add_argument("--eval-interval", type=int, default=defaults.eval_interval, help="steps between validations")
    group.add_argument("--eval-batches", type=int, default=defaults.eval_batches, help="validation micro-batches")
    group.add_argument("--eval-mc-samples", type=int, default=defaults.eval_mc_samples,
                       help="Monte Carlo draws per validation sequence (MDM)")
    group.add_argument("--log-interval", type=int, default=defaults.log_interval, help="steps between log lines")
    group.add_argument("--checkpoint-interval", type=int, default=defaults.checkpoint_interval,
                       help="steps between checkpoints (one is always written at the end)")
    group.add_argument("--seed", type=int, default=defaults.seed, help="seed of the initialisation, batches and masks")
    group.add_argument("--precision", choices=("auto", "fp32", "bf16-mixed"), default="auto",
                       help="auto: bf16-mixed on a GPU that supports it, else fp32")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")


def _train_config(args: argparse.Namespace):
    from smdm.config import TrainConfig

    return TrainConfig(
        seq_len=args.seq_len, global_batch=args.global_batch, micro_batch=args.micro_batch, lr=args.lr,
        min_lr=args.min_lr, warmup_fraction=args.warmup_fraction, min_warmup_steps=args.min_warmup_steps,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, max_steps=args.max_steps,
        max_tokens=args.max_tokens, flops=args.flops, ssl_ratio=args.ssl_ratio, eval_interval=args.eval_interval,
        eval_batches=args.eval_batches, eval_mc_samples=args.eval_mc_samples, log_interval=args.log_interval,
        checkpoint_interval=args.checkpoint_interval, seed=args.seed, precision=args.precision, device=args.device,
    )


# prepare
def add_prepare(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", default="shakespeare",
                        help="a .txt/.md file, a JSONL file, a folder of them, or 'shakespeare' (the default corpus)")
    parser.add_argument("--out", required=True, help="folder to write the shards, tokenizer and meta.json into")
    parser.add_argument("--tokenizer", default=None,
                        help="existing tokenizer.json or Hugging Face tokenizer folder (default: train a BPE)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the trained BPE, specials included")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="share of tokens held out for validation")
    parser.add_argument("--text-field", default="text", help="field that holds the text in JSONL records")


def run_prepare(args: argparse.Namespace) -> int:
    from smdm.data.shards import prepare

    result = prepare(args.corpus, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                     val_fraction=args.val_fraction, text_field=args.text_field)
    print(json.dumps(result.meta, indent=2))
    return 0


# train
def add_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="prepared data folder (from `smdm prepare`)")
    parser.add_argument("--out", required=True, help="run folder for checkpoints, metrics and config")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    _add_model_args(parser)
    _add_train_args(parser)
    _add_distributed_args(parser)


def _add_distributed_args(parser: argparse.ArgumentParser) -> None:
    from smdm.distributed import STRATEGIES

    group = parser.add_argument_group("distributed (launch with torchrun for several processes)")
    group.add_argument("--strategy", choices=STRATEGIES, default="auto",
                       help="data parallelism across processes: ddp replicates the model, fsdp shards it per "
                            "transformer block; auto is fsdp on CUDA and ddp on CPU, and none for a single process "
                            "started without torchrun")
    group.add_argument("--activation-checkpointing", action="store_true",
                       help="recompute each block's activations in backward to save memory (one more forward pass per block, about a third more compute)")


def model_config_from_args(args: argparse.Namespace, vocab_size: int):
    from smdm.config import ModelConfig

    block_size = args.block_size or args.seq_len
    return ModelConfig.from_name(args.model, kind=args.kind, vocab_size=vocab_size, block_size=block_size)


def run_train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from smdm.data.shards import TokenData
    from smdm.train import train

    data = TokenData(args.data)
    model_config = model_config_from_args(args, data.vocab_size)
    owned_group = not dist.is_initialized()
    try:
        result = train(model_config, _train_config(args), args.data, args.out, resume=args.resume,
                       strategy=args.strategy, activation_checkpointing=args.activation_checkpointing)
    finally:
        if owned_group and dist.is_initialized():
            dist.destroy_process_group()
    # Under torchrun only rank 0 prints the summary.
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"run": str(result.run_dir), "steps": result.steps, "tokens": result.tokens,
                          "validation": result.final_val}, indent=2))
    return 0


# sample
def add_sample(parser: argparse.ArgumentParser) -> None:
    from smdm.generate import CACHE_MODES, SAMPLERS, SampleConfig

    defaults = SampleConfig()
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder (uses its latest)")
    parser.add_argument("--prompt", action="append", default=None,
                        help="prompt text; repeat for a batch of prompts; omit for unconditional samples")
    parser.add_argument("--prompt-file", default=None,
                        help="text file with one prompt per line, added to the batch after any --prompt")
    parser.add_argument("--suffix", default=None, help="text after the gap: the MDM fills in between prompt and suffix")
    parser.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="tokens to generate per sample")
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help="MDM forward passes (an upper bound for --sampler threshold)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 is greedy")
    parser.add_argument("--sampler", choices=SAMPLERS, default=defaults.sampler, help="MDM remasking rule")
    parser.add_argument("--block-length", type=int, default=defaults.block_length,
                        help="semi-autoregressive block length in tokens (MDM); 0 for one block")
    parser.add_argument("--threshold", type=float, default=defaults.threshold,
                        help="confidence above which --sampler threshold reveals a token")
    parser.add_argument("--cfg", type=float, default=defaults.cfg, help="unsupervised CFG scale (MDM); 0 is off")
    parser.add_argument("--cache", choices=CACHE_MODES, default=defaults.cache,
                        help="KV cache: auto (ARM cached, MDM none), none, or prefix/dual (MDM, approximate)")
    parser.add_argument("--min-new-tokens", type=int, default=defaults.min_new_tokens,
                        help="new tokens before EOS may be chosen")
    parser.add_argument("--stop", action="append", default=[], help="stop string that ends a sample; repeatable")
    parser.add_argument("--no-stop-at-eos", action="store_true", help="keep text after the first EOS")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")


def run_sample(args: argparse.Namespace) -> int:
    from smdm.data.corpus import read_text_file
    from smdm.sampling_api import sample_text

    prompts = list(args.prompt or [])
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} not found; pass a text file with one prompt per line")
        prompts += [line for line in read_text_file(path).splitlines() if line.strip()]
    prompts = prompts or [""]
    texts = sample_text(
        args.checkpoint, prompts, num_samples=args.num_samples, suffix=args.suffix, device=args.device,
        max_new_tokens=args.max_new_tokens, steps=args.steps, temperature=args.temperature, sampler=args.sampler,
        block_length=args.block_length, threshold=args.threshold, cfg=args.cfg, cache=args.cache,
        min_new_tokens=args.min_new_tokens, stop_strings=tuple(args.stop), stop_at_eos=not args.no_stop_at_eos,
        seed=args.seed,
    )
    for prompt, text in texts:
        print(f"--- prompt: {prompt!r}")
        print(prompt + text + (args.suffix or ""))
    return 0


# evaluate
def add_evaluate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder (uses its latest)")
    mode = parser.add_argument_group("what to evaluate (give exactly one)")
    mode.add_argument("--data", default=None, help="prepared data folder with the same tokenizer: validation loss")
    mode.add_argument("--tasks", default=None,
                      help="comma-separated zero-shot tasks run through lm-eval, e.g. hellaswag,piqa,lambada_standard")
    mode.add_argument("--text", default=None, help="a UTF-8 text file: its perplexity (an upper bound for an MDM)")
    parser.add_argument("--split", choices=("train", "val"), default="val", help="split of the --data folder to score")
    parser.add_argument("--seq-len", type=int, default=0, help="window length (default: the training seq_len)")
    parser.add_argument("--max-sequences", type=int, default=256, help="windows to score, evenly spread")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences or canvases per forward pass")
    parser.add_argument("--mc-samples", type=int, default=None,
                        help="Monte Carlo draws per window or per answer (MDM; default 16 for --data and --text, "
                             "128 for --tasks)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the Monte Carlo draws")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16-mixed"), default="auto",
                        help="auto: bf16-mixed on a GPU that supports it, else fp32")
    tasks = parser.add_argument_group("zero-shot tasks (--tasks)")
    tasks.add_argument("--limit", type=float, default=None,
                       help="documents per task (an integer), or a fraction of each task below 1")
    tasks.add_argument("--cfg", default="0",
                       help="guidance scale w of the MDM: a number, or per task as hellaswag:0.8;piqa:1.2;0.5")
    tasks.add_argument("--likelihood", choices=("mc", "chain"), default="mc",
                       help="MDM scoring: Monte Carlo ELBO or chain rule (one forward per continuation token)")
    tasks.add_argument("--mc-scheme", choices=("balanced", "stratified", "reference"), default="balanced",
                       help="Monte Carlo draws: stratified mask counts with positions spread evenly (balanced) or at "
                            "random (stratified), or the paper's per-mini-batch stratified times (reference)")
    tasks.add_argument("--benchmark-dir", default=None,
                       help="folder with the benchmark files (default: $SMDM_BENCHMARK_DATA)")
    tasks.add_argument("--task-file", action="append", default=[], metavar="TASK=FILE",
                       help="data file of one task, e.g. race=race_test.jsonl; repeat for several")
    tasks.add_argument("--output", default=None, help="write lm-eval's full result JSON to this file")


def run_evaluate(args: argparse.Namespace) -> int:
    modes = [name for name in ("data", "tasks", "text") if getattr(args, name)]
    if len(modes) != 1:
        raise ValueError(f"give exactly one of --data, --tasks and --text (got {', '.join(modes) or 'none'})")
    if args.tasks or args.text:
        from smdm.evaluate.zero_shot_cli import run_zero_shot

        return run_zero_shot(args)
    return run_validation(args)


def run_validation(args: argparse.Namespace) -> int:
    from smdm.checkpoint import load_model
    from smdm.data.shards import TokenData
    from smdm.evaluate.validation import validation_loss
    from smdm.runtime import resolve_device, resolve_precision

    device = resolve_device(args.device)
    model, tokenizer, checkpoint = load_model(args.checkpoint, device)
    data = TokenData(args.data)
    if data.tokenizer.identity != tokenizer.identity:
        raise ValueError(
            f"checkpoint {checkpoint.folder} was trained with another tokenizer than {data.folder}; "
            f"prepare the data with `smdm prepare --tokenizer {checkpoint.folder / 'tokenizer.json'}`"
        )
    seq_len = args.seq_len or checkpoint.train_config.get("seq_len") or model.config.block_size
    log.info("scoring up to %d windows of %d tokens of %s/%s with %s", args.max_sequences, seq_len, data.folder,
             args.split, checkpoint.folder)
    result = validation_loss(model, data.split(args.split), seq_len, max_sequences=args.max_sequences,
                             batch_size=args.batch_size, mc_samples=args.mc_samples or 16, seed=args.seed,
                             precision=resolve_precision(args.precision, device))
    result.update(checkpoint=str(checkpoint.folder), split=args.split, seq_len=seq_len)
    print(json.dumps(result, indent=2))
    return 0


# quickstart
def add_quickstart(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/quickstart", help="folder for the data and both runs")
    parser.add_argument("--minutes", type=float, default=8.0, help="total training time of both models, roughly")
    parser.add_argument("--model", default="tiny-0.8M", help="size of both models")
    parser.add_argument("--max-steps", type=int, default=0, help="fixed step count instead of the time budget")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")


def run_quickstart(args: argparse.Namespace) -> int:
    from smdm.quickstart import quickstart

    quickstart(args.out, minutes=args.minutes, model=args.model, max_steps=args.max_steps, device=args.device)
    return 0


def run_sizes(args: argparse.Namespace) -> int:
    from smdm.config import ModelConfig, size_names

    print(f"{'name':>10} {'layers':>6} {'heads':>5} {'width':>5} {'mlp':>5} {'non-embedding':>15}")
    for name in size_names():
        c = ModelConfig.from_name(name)
        print(f"{name:>10} {c.n_layer:>6} {c.n_head:>5} {c.n_embd:>5} {c.intermediate_size:>5} {c.n_non_embedding:>15,}")
    return 0


# convert
def add_convert(parser: argparse.ArgumentParser) -> None:
    from smdm.interop.commands import add_convert_arguments

    add_convert_arguments(parser)


def run_convert(args: argparse.Namespace) -> int:
    from smdm.interop.commands import run_convert as run

    return run(args)


# sweep
def add_sweep(parser: argparse.ArgumentParser) -> None:
    from smdm.sweep_cli import add_sweep as add

    add(parser)


def run_sweep(args: argparse.Namespace) -> int:
    from smdm.sweep_cli import run_sweep_verb

    return run_sweep_verb(args)


# finetune and task (defined in smdm.tasks.commands)
def add_finetune(parser: argparse.ArgumentParser) -> None:
    from smdm.tasks.commands import add_finetune as add

    add(parser)


def run_finetune(args: argparse.Namespace) -> int:
    from smdm.tasks.commands import run_finetune as run

    return run(args)


def add_task(parser: argparse.ArgumentParser) -> None:
    from smdm.tasks.commands import add_task as add

    add(parser)


def run_task(args: argparse.Namespace) -> int:
    from smdm.tasks.commands import run_task as run

    return run(args)


Verb = tuple[str, str, Callable[[argparse.ArgumentParser], None] | None, Callable[[argparse.Namespace], int]]

VERBS: list[Verb] = [
    ("prepare", "tokenize a corpus into train/validation shards", add_prepare, run_prepare),
    ("train", "train an MDM or an ARM on prepared data", add_train, run_train),
    ("sample", "generate text from a checkpoint", add_sample, run_sample),
    ("evaluate", "validation loss, zero-shot tasks (lm-eval) or text perplexity of a checkpoint", add_evaluate,
     run_evaluate),
    ("quickstart", "prepare the default corpus, train an MDM and an ARM, compare and sample", add_quickstart,
     run_quickstart),
    ("sizes", "list the model sizes", None, run_sizes),
    ("convert", "import or export reference and Hugging Face checkpoints", add_convert, run_convert),
    ("sweep", "IsoFLOP scaling study: plan, run, fit and plot a sweep of MDM and ARM runs", add_sweep, run_sweep),
    ("finetune", "supervised fine-tuning of an MDM or an ARM on prompt/response pairs", add_finetune, run_finetune),
    ("task", "downstream tasks: gsm8k-data, gsm8k, reversal, temporal, mt-bench-answer, mt-bench-judge", add_task,
     run_task),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smdm", description="Masked diffusion and autoregressive language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, help_text, add, run in VERBS:
        verb = sub.add_parser(name, help=help_text, description=help_text,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if add is not None:
            add(verb)
        verb.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from smdm.errors import TrainingDiverged

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError, TrainingDiverged) as error:
        print(f"smdm {args.verb}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"smdm {args.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (as in `smdm sample | head`); silence the flush at exit.
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())


