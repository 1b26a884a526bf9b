"""Command-line verbs `smdm finetune` and `smdm task NAME` (imported lazily by smdm.cli)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("smdm")

TASKS = ("gsm8k-data", "gsm8k", "reversal", "temporal", "mt-bench-answer", "mt-bench-judge")


def add_finetune(parser: argparse.ArgumentParser) -> None:
    from smdm.finetune import FinetuneConfig

    defaults = FinetuneConfig()
    parser.add_argument("--data", required=True, help="JSONL file of prompt/response records (or chat records)")
    parser.add_argument("--out", required=True, help="run folder for checkpoints and metrics.jsonl")
    start = parser.add_argument_group("starting point (a checkpoint, or a fresh model with --kind/--model)")
    start.add_argument("--checkpoint", default=None, help="checkpoint folder or run folder to fine-tune")
    start.add_argument("--kind", choices=("mdm", "arm"), default="mdm", help="kind of a fresh model")
    start.add_argument("--model", default="tiny-0.8M", help="size of a fresh model (see `smdm sizes`)")
    start.add_argument("--tokenizer", default=None,
                       help="tokenizer of a fresh model (default: train a byte-level BPE on the fine-tuning texts)")
    start.add_argument("--vocab-size", type=int, default=2048, help="vocabulary of that BPE, specials included")
    fields = parser.add_argument_group("data format")
    fields.add_argument("--prompt-field", default="prompt", help="record field with the prompt")
    fields.add_argument("--response-field", default="response", help="record field with the response")
    fields.add_argument("--chat", action="store_true",
                        help="records hold a messages/conversations list; use its first user turn and reply")
    fields.add_argument("--limit", type=int, default=0, help="use only the first N records (0: all)")
    group = parser.add_argument_group("fine-tuning")
    group.add_argument("--seq-len", type=int, default=defaults.seq_len, help="row length in tokens")
    group.add_argument("--batch-size", type=int, default=defaults.batch_size,
                       help="rows per optimiser step, over all processes")
    group.add_argument("--micro-batch", type=int, default=defaults.micro_batch,
                       help="rows per forward pass on one process (0: its whole share); smaller values accumulate "
                            "gradients over several passes to save memory, with the same result")
    group.add_argument("--steps", type=int, default=defaults.steps, help="optimiser steps")
    group.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    group.add_argument("--min-lr", type=float, default=defaults.min_lr, help="learning rate at the end of the cosine")
    group.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    group.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    group.add_argument("--prompt-dropout", type=float, default=defaults.prompt_dropout,
                       help="probability that a row's prompt is replaced by mask tokens, for standard CFG (MDM)")
    group.add_argument("--no-score-padding", action="store_true",
                       help="leave the EOS padding after the response's closing EOS out of the loss")
    group.add_argument("--prompt-template", default=defaults.prompt_template,
                       help="text around every prompt, with {prompt} where it goes, for example "
                            "'User: {prompt}\\nAssistant:' (\\n is a newline); saved with the run, and "
                            "mt-bench-answer applies it")
    group.add_argument("--train-on-prompt", action="store_true",
                       help="noise (MDM) and score the prompt too, so the whole row is training text")
    group.add_argument("--checkpoint-interval", type=int, default=defaults.checkpoint_interval,
                       help="steps between checkpoints (0: final only)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    group.add_argument("--log-interval", type=int, default=defaults.log_interval)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--precision", choices=("auto", "fp32", "bf16-mixed"), default="auto")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    _add_distributed_args(parser)


def run_finetune(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from smdm.data.sft import read_prompt_response
    from smdm.data.tokenizer import Tokenizer, train_bpe
    from smdm.distributed import enable_activation_checkpointing, setup_distributed
    from smdm.finetune import FinetuneConfig, finetune, initial_model

    config = FinetuneConfig(
        seq_len=args.seq_len, batch_size=args.batch_size, micro_batch=args.micro_batch, steps=args.steps,
        lr=args.lr, min_lr=args.min_lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, prompt_dropout=args.prompt_dropout,
        score_padding=not args.no_score_padding, train_on_prompt=args.train_on_prompt,
        prompt_template=_template_from_flag(args.prompt_template),
        checkpoint_interval=args.checkpoint_interval, log_interval=args.log_interval, seed=args.seed,
        precision=args.precision, device=args.device,
    )
    pairs = read_prompt_response(args.data, prompt_field=args.prompt_field, response_field=args.response_field,
                                 chat=args.chat, limit=args.limit)
    owned_group = not dist.is_initialized()
    context = setup_distributed(args.device, args.strategy)
    try:
        tokenizer = None
        if args.checkpoint is None:
            if args.tokenizer:
                tokenizer = Tokenizer.load(args.tokenizer)
            else:
                # Rank 0 trains the BPE and hands it to the other ranks, so all of them use the same ids.
                texts = (text for pair in pairs for text in (pair.prompt, pair.response))
                tokenizer = Tokenizer.from_json(context.run_on_main(lambda: train_bpe(texts, args.vocab_size).to_json()))
        model, tokenizer, base = initial_model(args.checkpoint, context.device, tokenizer=tokenizer, size=args.model,
                                               kind=args.kind, block_size=args.seq_len, seed=args.seed)
        if args.activation_checkpointing:
            enable_activation_checkpointing(model)
        result = finetune(model, tokenizer, pairs, args.out, config, base=base, resume=args.resume, context=context)
    finally:
        if owned_group and dist.is_initialized():
            dist.destroy_process_group()
    if context.is_main:
        print(json.dumps({"run": str(result.run_dir), "steps": result.steps, "examples": result.examples,
                          "skipped": result.skipped, "final_loss": result.final_loss}, indent=2))
    return 0


def _template_from_flag(text: str) -> str:
    """Turn the two characters \\n of a --prompt-template value into a newline, as the help text promises."""
    return text.replace("\\n", "\n")


def _add_distributed_args(parser: argparse.ArgumentParser) -> None:
    from smdm.cli import _add_distributed_args as add

    add(parser)


def _add_sampling(parser: argparse.ArgumentParser, max_new_tokens: int, prefix: str = "", label: str = "") -> None:
    from smdm.generate import SAMPLERS

    dash = f"--{prefix}-" if prefix else "--"
    what = f" ({label})" if label else ""
    parser.add_argument(f"{dash}max-new-tokens", type=int, default=max_new_tokens, help=f"canvas of new tokens{what}")
    parser.add_argument(f"{dash}steps", type=int, default=max_new_tokens, help=f"MDM forward passes{what}")
    parser.add_argument(f"{dash}temperature", type=float, default=0.0, help=f"0 is greedy{what}")
    parser.add_argument(f"{dash}sampler", choices=SAMPLERS, default="low_confidence", help=f"MDM remasking rule{what}")
    parser.add_argument(f"{dash}block-length", type=int, default=0,
                        help=f"MDM semi-autoregressive blocks of this many tokens, left to right (0: one block){what}")
    parser.add_argument(f"{dash}guidance", type=float, default=0.0,
                        help=f"classifier-free guidance scale w (MDM; 0 is none){what}")


def _sample_config(args: argparse.Namespace, prefix: str = ""):
    from smdm.generate import SampleConfig

    key = f"{prefix}_" if prefix else ""
    return SampleConfig(max_new_tokens=getattr(args, f"{key}max_new_tokens"), steps=getattr(args, f"{key}steps"),
                        temperature=getattr(args, f"{key}temperature"), sampler=getattr(args, f"{key}sampler"),
                        block_length=getattr(args, f"{key}block_length"), seed=args.seed)


def _add_common(parser: argparse.ArgumentParser, checkpoint: bool = True) -> None:
    if checkpoint:
        parser.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
    parser.add_argument("--out", required=True, help="folder for the results JSON and Markdown report")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")


def add_task(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="task", required=True, metavar="NAME")

    data = sub.add_parser("gsm8k-data", help="write the two-row GSM8K fine-tuning JSONL")
    data.add_argument("--input", required=True, help="GSM8K JSONL (question/answer) or 'question||reasoning #### answer' text")
    data.add_argument("--out", required=True, help="output JSONL of prompt/response rows")
    data.add_argument("--limit", type=int, default=0, help="use only the first N problems (0: all)")
    data.add_argument("--keep-calculations", action="store_true", help="keep the <<a*b=c>> calculator annotations")

    gsm8k = sub.add_parser("gsm8k", help="two-stage GSM8K evaluation with answer equivalence")
    _add_common(gsm8k)
    gsm8k.add_argument("--data", required=True, help="GSM8K test file (JSONL or text lines)")
    gsm8k.add_argument("--limit", type=int, default=0, help="evaluate the first N problems (0: all)")
    gsm8k.add_argument("--batch-size", type=int, default=16)
    _add_sampling(gsm8k, 128, "reasoning", "stage 1, reasoning")
    _add_sampling(gsm8k, 16, "answer", "stage 2, answer")

    reversal = sub.add_parser("reversal", help="reversal-curse evaluation in both directions (exact match, BLEU)")
    _add_common(reversal)
    reversal.add_argument("--data", required=True, help="folder with the reverse_experiments test JSONL files")
    reversal.add_argument("--limit", type=int, default=0, help="questions per split (0: all)")
    reversal.add_argument("--fixed-length", action="store_true",
                          help="use --max-new-tokens for every question instead of the reference length plus one")
    reversal.add_argument("--batch-size", type=int, default=32)
    reversal.add_argument("--eos-only-last", action="store_true",
                          help="allow EOS only as the last new token, so every generated completion fills its canvas")
    splits = ("p2d_same", "p2d_reversed", "d2p_same", "d2p_reversed")
    reversal.add_argument("--split", action="append", default=None, choices=splits,
                          help="evaluate this split; repeat for several (default: all four)")
    reversal.add_argument("--rank", action="store_true",
                          help="also rank every distinct completion of a split as the answer to each question, "
                               "by log-likelihood (a Monte Carlo bound for an MDM)")
    reversal.add_argument("--rank-mc-samples", type=int, default=32, help="Monte Carlo draws per candidate (MDM)")
    _add_sampling(reversal, 32)

    temporal = sub.add_parser("temporal", help="perplexity (ARM) and its bound (MDM) of dated text by period")
    _add_common(temporal, checkpoint=False)
    temporal.add_argument("--checkpoint", action="append", required=True,
                          help="checkpoint to evaluate; repeat for several (for example an MDM and an ARM)")
    temporal.add_argument("--data", required=True, help="folder with sotu.jsonl and the ParlSpeech CSV")
    temporal.add_argument("--source", action="append", choices=("sotu", "parlspeech"), default=None,
                          help="text source; repeat for both (default: both)")
    temporal.add_argument("--period-years", type=int, default=20, help="width of a period in years")
    temporal.add_argument("--seq-len", type=int, default=0, help="window length (default: the training seq_len)")
    temporal.add_argument("--max-windows", type=int, default=16, help="windows per period, evenly spread")
    temporal.add_argument("--mc-samples", type=int, default=8, help="Monte Carlo draws per window (MDM)")
    temporal.add_argument("--batch-size", type=int, default=8)

    answer = sub.add_parser("mt-bench-answer", help="first-turn MT-Bench answers in FastChat's answer-file format")
    _add_common(answer)
    answer.add_argument("--questions", required=True, help="MT-Bench question.jsonl")
    answer.add_argument("--model-id", default=None, help="model_id in the answer file (default: the run folder name)")
    answer.add_argument("--limit", type=int, default=0, help="answer the first N questions (0: all)")
    answer.add_argument("--prompt-template", default=None,
                        help="text around each question, with {prompt} where it goes (default: the template the "
                             "checkpoint was fine-tuned with, or the bare question)")
    answer.add_argument("--batch-size", type=int, default=8)
    _add_sampling(answer, 256)

    judge = sub.add_parser("mt-bench-judge",
                           help="grade an answer file with an OpenAI-compatible judge (SMDM_JUDGE_BASE_URL, "
                                "SMDM_JUDGE_MODEL, SMDM_JUDGE_API_KEY)")
    _add_common(judge, checkpoint=False)
    judge.add_argument("--answers", required=True, help="answer file from `smdm task mt-bench-answer`")
    judge.add_argument("--questions", required=True, help="MT-Bench question.jsonl")
    judge.add_argument("--judge-prompts", required=True, help="FastChat judge_prompts.jsonl")
    judge.add_argument("--references", default=None, help="reference answers (FastChat answer format) for math, "
                                                          "reasoning and coding")
    judge.add_argument("--max-retries", type=int, default=4, help="retries of a failed judge request")
    judge.add_argument("--timeout", type=float, default=120.0, help="seconds per judge request")


def run_task(args: argparse.Namespace) -> int:
    runners = {"gsm8k-data": _run_gsm8k_data, "gsm8k": _run_gsm8k, "reversal": _run_reversal,
               "temporal": _run_temporal, "mt-bench-answer": _run_mt_bench_answer, "mt-bench-judge": _run_mt_bench_judge}
    return runners[args.task](args)


def _load(args: argparse.Namespace, checkpoint: str):
    from smdm.checkpoint import load_model
    from smdm.runtime import resolve_device

    return load_model(checkpoint, resolve_device(args.device))


def _print_written(paths) -> None:
    print(json.dumps({"written": [str(path) for path in paths]}, indent=2))


def _run_gsm8k_data(args: argparse.Namespace) -> int:
    from smdm.tasks.gsm8k import read_problems, write_two_row_data

    problems = read_problems(args.input, limit=args.limit, strip_calculations=not args.keep_calculations)
    path = write_two_row_data(problems, args.out)
    print(json.dumps({"problems": len(problems), "rows": 2 * len(problems), "written": str(path)}, indent=2))
    return 0


def _run_gsm8k(args: argparse.Namespace) -> int:
    from smdm.tasks.common import write_results
    from smdm.tasks.gsm8k import evaluate_two_stage, read_problems, report_markdown

    model, tokenizer, loaded = _load(args, args.checkpoint)
    problems = read_problems(args.data, limit=args.limit)
    results = evaluate_two_stage(model, tokenizer, problems, _sample_config(args, "reasoning"),
                                 _sample_config(args, "answer"), reasoning_guidance=args.reasoning_guidance,
                                 answer_guidance=args.answer_guidance, batch_size=args.batch_size)
    results.update(checkpoint=str(loaded.folder), data=args.data)
    print(json.dumps(results["summary"], indent=2))
    _print_written(write_results(args.out, "gsm8k", results, report_markdown(results, str(loaded.folder))))
    return 0


def _run_reversal(args: argparse.Namespace) -> int:
    from smdm.tasks.common import write_results
    from smdm.tasks.reversal import TEST_SPLITS, evaluate_reversal, report_markdown

    model, tokenizer, loaded = _load(args, args.checkpoint)
    results = evaluate_reversal(model, tokenizer, args.data, _sample_config(args), limit=args.limit,
                                length_from_reference=not args.fixed_length, guidance=args.guidance,
                                splits=args.split or tuple(TEST_SPLITS),
                                batch_size=args.batch_size, eos_only_last=args.eos_only_last, rank=args.rank,
                                rank_mc_samples=args.rank_mc_samples)
    results.update(checkpoint=str(loaded.folder), kind=model.config.kind)
    print(json.dumps({split: {k: v for k, v in m.items() if k in ("exact_match", "bleu", "n")}
                      for split, m in results["splits"].items()}, indent=2))
    _print_written(write_results(args.out, "reversal", results, report_markdown(results, str(loaded.folder))))
    return 0


def _run_temporal(args: argparse.Namespace) -> int:
    from smdm.tasks.common import write_results
    from smdm.tasks.temporal import evaluate_periods, group_by_period, plot_periods, read_dated_texts, report_markdown

    sources = args.source or ["sotu", "parlspeech"]
    results: dict = {"period_years": args.period_years, "max_windows": args.max_windows,
                     "mc_samples": args.mc_samples, "seed": args.seed, "sources": {}}
    texts = {source: group_by_period(read_dated_texts(args.data, source), args.period_years) for source in sources}
    for checkpoint in args.checkpoint:
        model, tokenizer, loaded = _load(args, checkpoint)
        seq_len = args.seq_len or loaded.train_config.get("seq_len") or model.config.block_size
        name = Path(checkpoint).name if (Path(checkpoint) / "checkpoints").is_dir() else str(loaded.folder.name)
        if any(name in models for models in results["sources"].values()):
            name = f"{name}-{len(results['sources'][sources[0]]) + 1}"  # two runs with the same folder name
        for source in sources:
            rows = evaluate_periods(model, tokenizer, texts[source], seq_len=seq_len, max_windows=args.max_windows,
                                    mc_samples=args.mc_samples, batch_size=args.batch_size, seed=args.seed)
            results["sources"].setdefault(source, {})[name] = {
                "checkpoint": str(loaded.folder), "kind": model.config.kind, "seq_len": seq_len,
                "tokenizer": tokenizer.identity, "periods": rows}
    paths = list(write_results(args.out, "temporal", results, report_markdown(results)))
    paths.append(plot_periods(results, Path(args.out) / "temporal.png"))
    _print_written(paths)
    return 0


def _run_mt_bench_answer(args: argparse.Namespace) -> int:
    from smdm.data.corpus import read_jsonl
    from smdm.finetune import PROMPT_SLOT, checkpoint_prompt_template
    from smdm.tasks.mt_bench import answer_settings, generate_answers, truncated_questions, write_answers

    model, tokenizer, loaded = _load(args, args.checkpoint)
    questions = read_jsonl(args.questions)
    if args.limit:
        questions = questions[: args.limit]
    model_id = args.model_id or Path(args.checkpoint).resolve().name
    config = _sample_config(args)
    if args.prompt_template is None:
        template = checkpoint_prompt_template(loaded.train_config)
    else:
        template = _template_from_flag(args.prompt_template)
    if template.count(PROMPT_SLOT) != 1:
        raise ValueError(f"--prompt-template {template!r} must contain {PROMPT_SLOT} exactly once")
    truncated = truncated_questions(tokenizer, model, questions, config.max_new_tokens, template)
    if truncated:
        print(f"{len(truncated)} of {len(questions)} questions are longer than the model's context of "
              f"{model.config.block_size} tokens minus --max-new-tokens {config.max_new_tokens}; each keeps its last "
              f"tokens (question ids {truncated})", file=sys.stderr)
    records = generate_answers(model, tokenizer, questions, config, model_id, guidance=args.guidance,
                               batch_size=args.batch_size, prompt_template=template)
    out = Path(args.out) / f"{model_id}.jsonl"
    settings = answer_settings(config, model_id, str(loaded.folder), args.guidance, truncated, template)
    _print_written(write_answers(records, out, settings))
    return 0


def _run_mt_bench_judge(args: argparse.Namespace) -> int:
    from smdm.data.corpus import read_jsonl
    from smdm.tasks.common import write_results
    from smdm.tasks.mt_bench import (
        JudgeClient, JudgeError, aggregate_scores, judge_answers, read_judge_prompts, report_markdown,
    )

    client = JudgeClient.from_environment(max_retries=args.max_retries, timeout_s=args.timeout)
    references = {r["question_id"]: r for r in read_jsonl(args.references)} if args.references else None
    try:
        judgments = judge_answers(client, read_jsonl(args.questions), read_jsonl(args.answers),
                                  read_judge_prompts(args.judge_prompts), references)
    except JudgeError as error:
        print(f"smdm task mt-bench-judge: error: {error}", file=sys.stderr)
        return 2
    summary = aggregate_scores(judgments)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "judgments.jsonl", "w", encoding="utf-8") as handle:
        for judgment in judgments:
            handle.write(json.dumps(judgment) + "\n")
    results = {"judge_model": client.model, "judge_base_url": client.base_url, "answers": args.answers, **summary}
    print(json.dumps(summary, indent=2))
    _print_written(write_results(out, "mt_bench", results, report_markdown(summary, client.model, args.answers)))
    return 0
