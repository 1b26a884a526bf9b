"""GSM8K: two-row fine-tuning data, two-stage generation, answer extraction and symbolic equivalence.

Each problem gives two fine-tuning rows (Nie et al., arXiv 2410.18514, after
the augmented chain-of-thought recipe of Deng et al., arXiv 2311.01460):
question to reasoning, and question plus reasoning to the final answer.
Evaluation mirrors them: stage 1 generates the reasoning from the question,
stage 2 generates the answer from the question and that reasoning, each with
its own guidance scale.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import sympy
from sympy.parsing.sympy_parser import parse_expr

from smdm.data.corpus import read_jsonl
from smdm.data.sft import PromptResponse
from smdm.data.tokenizer import Tokenizer
from smdm.generate import SampleConfig
from smdm.model import Transformer
from smdm.tasks.common import generate_texts, prompt_fits, sample_settings

log = logging.getLogger(__name__)

ANSWER_MARK = "####"
# Calculator annotations of the original GSM8K solutions, e.g. "<<48/2=24>>".
CALCULATION = re.compile(r"<<[^>]*>>")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/-?\d+(?:\.\d+)?)?")


@dataclass(frozen=True)
class Problem:
    question: str
    reasoning: str
    answer: str


def reasoning_prompt(question: str) -> str:
    """Stage-1 prompt: the question, then a newline before the reasoning."""
    return f"{question.strip()}\n"


def answer_prompt(question: str, reasoning: str) -> str:
    """Stage-2 prompt: the question, the reasoning and the answer mark."""
    return f"{question.strip()}\n{reasoning.strip()}\n{ANSWER_MARK} "


def two_rows(problem: Problem) -> list[PromptResponse]:
    """Return the problem's two fine-tuning rows: question to reasoning, question plus reasoning to answer."""
    return [
        PromptResponse(reasoning_prompt(problem.question), problem.reasoning.strip()),
        PromptResponse(answer_prompt(problem.question, problem.reasoning), problem.answer.strip()),
    ]


def split_solution(solution: str, strip_calculations: bool = True) -> tuple[str, str]:
    """Split a solution "reasoning #### answer" at its last answer mark into (reasoning, answer)."""
    if ANSWER_MARK not in solution:
        raise ValueError(f"solution has no {ANSWER_MARK!r} before its answer: {solution[-80:]!r}")
    reasoning, answer = solution.rsplit(ANSWER_MARK, 1)
    if strip_calculations:
        reasoning = CALCULATION.sub("", reasoning)
    return " ".join(reasoning.split()), answer.strip()


def read_problems(path: str | Path, limit: int = 0, strip_calculations: bool = True) -> list[Problem]:
    """Read GSM8K problems from JSONL ({"question", "answer"}) or text lines "question||reasoning #### answer"."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K file not found: {path}")
    problems = []
    if path.suffix == ".jsonl":
        for record in read_jsonl(path):
            if "question" not in record or "answer" not in record:
                raise ValueError(f"{path}: record without 'question' and 'answer' fields: {sorted(record)}")
            reasoning, answer = split_solution(record["answer"], strip_calculations)
            problems.append(Problem(record["question"].strip(), reasoning, answer))
            if limit and len(problems) >= limit:
                break
    else:
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                if "||" not in line:
                    raise ValueError(f"{path}:{line_number}: expected 'question||reasoning #### answer'")
                question, solution = line.rstrip("\n").split("||", 1)
                reasoning, answer = split_solution(solution, strip_calculations)
                problems.append(Problem(question.strip(), reasoning, answer))
                if limit and len(problems) >= limit:
                    break
    return problems


def write_two_row_data(problems: Sequence[Problem], out: str | Path) -> Path:
    """Write the two rows of every problem as prompt/response JSONL for `smdm finetune`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        for problem in problems:
            for row in two_rows(problem):
                handle.write(json.dumps({"prompt": row.prompt, "response": row.response}) + "\n")
    return out


def extract_answer(text: str) -> str | None:
    """Return the text after the last answer mark, or None when the text has none."""
    if ANSWER_MARK not in text:
        return None
    return text.rsplit(ANSWER_MARK, 1)[1].strip()


def normalize_answer(text: str) -> str:
    """Reduce an answer to its number: drop $ signs, thousands commas, units and a trailing period.

    "$1,200.50 dollars." becomes "1200.50"; "3 / 4" becomes "3/4". Text without
    a number is returned stripped and lower-cased.
    """
    cleaned = text.strip().replace("\u2212", "-").replace("$", "").replace(",", "")
    cleaned = re.sub(r"(?<=\d)\s*/\s*(?=-?\d)", "/", cleaned)
    cleaned = re.sub(r"-\s+(?=\d)", "-", cleaned)
    match = NUMBER.search(cleaned)
    if match is None:
        return cleaned.rstrip(".").strip().lower()
    return match.group(0)


def answers_equivalent(prediction: str | None, reference: str) -> bool:
    """Return whether two answers are the same number after normalisation, compared exactly with sympy.

    "0.5", "1/2" and "2/4" are equal; so are "18" and "18.00". Non-numeric
    answers fall back to symbolic simplification, then to string equality.
    """
    if prediction is None:
        return False
    left, right = normalize_answer(prediction), normalize_answer(reference)
    try:
        return sympy.Rational(left) == sympy.Rational(right)
    except (TypeError, ValueError, ZeroDivisionError):
        pass
    try:
        return sympy.simplify(parse_expr(left) - parse_expr(right)) == 0
    except (sympy.SympifyError, SyntaxError, TypeError, ValueError, ZeroDivisionError, AttributeError):
        return left == right


def accuracy_with_stderr(correct: Sequence[bool]) -> dict:
    """Return accuracy and its standard error sqrt(s^2 / n), s^2 the sample variance (ddof = 1)."""
    n = len(correct)
    if n == 0:
        raise ValueError("no graded problems; check --limit and the data path")
    accuracy = sum(correct) / n
    stderr = math.sqrt(accuracy * (1 - accuracy) / (n - 1)) if n > 1 else float("nan")
    return {"accuracy": accuracy, "stderr": stderr, "n": n}


def evaluate_two_stage(
    model: Transformer,
    tokenizer: Tokenizer,
    problems: Sequence[Problem],
    reasoning_config: SampleConfig,
    answer_config: SampleConfig,
    *,
    reasoning_guidance: float = 0.0,
    answer_guidance: float = 0.0,
    batch_size: int = 16,
) -> dict:
    """Generate reasoning, then the answer, for each problem and grade it against the reference.

    A problem whose question leaves no room in the model's context for both
    generation stages is skipped, counted in the summary as `skipped`, and
    left out of the accuracy.
    """
    limit = model.config.block_size
    budget = reasoning_config.max_new_tokens + answer_config.max_new_tokens
    fits = [prompt_fits(model, tokenizer, answer_prompt(p.question, ""), budget) for p in problems]
    skipped = [p for p, ok in zip(problems, fits) if not ok]
    problems = [p for p, ok in zip(problems, fits) if ok]
    if skipped:
        log.warning("skipping %d of %d problems whose question plus %d new tokens exceeds the context of %d tokens",
                    len(skipped), len(skipped) + len(problems), budget, limit)
    reasoning = generate_texts(model, tokenizer, [reasoning_prompt(p.question) for p in problems], reasoning_config,
                               guidance=reasoning_guidance, batch_size=batch_size)
    # A model may write the answer mark itself in stage 1; the reasoning before it is kept.
    reasoning = [text.split(ANSWER_MARK, 1)[0].strip() for text in reasoning]
    stage2_prompts = [answer_prompt(p.question, r) for p, r in zip(problems, reasoning)]
    answers = generate_texts(model, tokenizer, stage2_prompts, answer_config, guidance=answer_guidance,
                             batch_size=batch_size)
    records = []
    for problem, steps, answer in zip(problems, reasoning, answers):
        prediction = extract_answer(f"{ANSWER_MARK} {answer}")
        records.append({
            "question": problem.question, "reference": problem.answer, "reasoning": steps, "output": answer,
            "prediction": normalize_answer(prediction) if prediction else None,
            "correct": answers_equivalent(prediction, problem.answer),
        })
    summary = accuracy_with_stderr([record["correct"] for record in records])
    summary["skipped"] = len(skipped)
    settings = {
        "reasoning": sample_settings(reasoning_config, guidance=reasoning_guidance),
        "answer": sample_settings(answer_config, guidance=answer_guidance),
    }
    return {"summary": summary, "settings": settings, "records": records}


def report_markdown(results: dict, checkpoint: str) -> str:
    summary = results["summary"]
    settings = results["settings"]
    return "\n".join([
        "# GSM8K two-stage evaluation",
        "",
        f"Checkpoint: `{checkpoint}`",
        "",
        "| problems | skipped (too long) | accuracy | stderr |",
        "|---:|---:|---:|---:|",
        f"| {summary['n']} | {summary.get('skipped', 0)} | {summary['accuracy']:.4f} | {summary['stderr']:.4f} |",
        "",
        f"Stage 1 (reasoning): {json.dumps(settings['reasoning'])}",
        "",
        f"Stage 2 (answer): {json.dumps(settings['answer'])}",
    ])
