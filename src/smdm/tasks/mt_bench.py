"""MT-Bench: first-turn answer files in FastChat's format and single-answer grading by an LLM judge.

The answer file is FastChat's (lm-sys/FastChat, fastchat/llm_judge): one JSON
object per line with question_id, answer_id, model_id, choices [{index,
turns}] and tstamp. The sampler settings go to a separate settings file, so
the answer file keeps FastChat's fields only.

The judge is any OpenAI-compatible chat-completions endpoint. Its base URL,
model and key come from SMDM_JUDGE_BASE_URL, SMDM_JUDGE_MODEL and
SMDM_JUDGE_API_KEY (or OPENAI_API_KEY). The key is sent only in the
Authorization header and never logged or written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from smdm.data.corpus import read_jsonl
from smdm.data.tokenizer import Tokenizer
from smdm.finetune import PROMPT_SLOT, apply_prompt_template
from smdm.generate import SampleConfig
from smdm.model import Transformer
from smdm.tasks.common import generate_texts, prompt_fits, sample_settings

log = logging.getLogger(__name__)

ANSWER_FIELDS = ("question_id", "answer_id", "model_id", "choices", "tstamp")
# FastChat grades these categories against a reference answer.
REFERENCE_CATEGORIES = ("math", "reasoning", "coding")
RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)
# FastChat's single-answer rating formats: "[[7]]", with "[7]" as the fallback.
RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
RATING_FALLBACK = re.compile(r"\[(\d+\.?\d*)\]")


def answer_record(question_id: int, model_id: str, answer: str) -> dict:
    """Return one FastChat answer record with a single first-turn answer."""
    return {"question_id": question_id, "answer_id": uuid.uuid4().hex, "model_id": model_id,
            "choices": [{"index": 0, "turns": [answer]}], "tstamp": time.time()}


def generate_answers(
    model: Transformer,
    tokenizer: Tokenizer,
    questions: Sequence[dict],
    config: SampleConfig,
    model_id: str,
    *,
    guidance: float = 0.0,
    batch_size: int = 8,
    prompt_template: str = PROMPT_SLOT,
) -> list[dict]:
    """Answer the first turn of each question; return FastChat answer records in question order.

    Each question is put into prompt_template (the chat format of the
    fine-tuning run). A prompt too long for the model's context beside
    config.max_new_tokens keeps only its last tokens; truncated_questions lists them.
    """
    prompts = [apply_prompt_template(prompt_template, question["turns"][0]) for question in questions]
    answers = generate_texts(model, tokenizer, prompts, config, guidance=guidance, batch_size=batch_size,
                             truncate_prompts=True)
    return [answer_record(q["question_id"], model_id, a.strip()) for q, a in zip(questions, answers)]


def truncated_questions(tokenizer: Tokenizer, model: Transformer, questions: Sequence[dict],
                        max_new_tokens: int, prompt_template: str = PROMPT_SLOT) -> list[int]:
    """Return the ids of the questions whose prompt generate_answers shortens to fit the context."""
    return [question["question_id"] for question in questions
            if not prompt_fits(model, tokenizer, apply_prompt_template(prompt_template, question["turns"][0]),
                               max_new_tokens)]


def write_answers(records: Sequence[dict], path: str | Path, settings: dict) -> tuple[Path, Path]:
    """Write the answer file and, beside it, PATH.settings.json with the sampler settings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    settings_path = path.with_suffix(".settings.json")
    settings_path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return path, settings_path


def answer_settings(config: SampleConfig, model_id: str, checkpoint: str, guidance: float,
                    truncated: Sequence[int] = (), prompt_template: str = PROMPT_SLOT) -> dict:
    return {"model_id": model_id, "checkpoint": checkpoint, "turns": 1, "prompt_template": prompt_template,
            "sampler": sample_settings(config, guidance=guidance), "truncated_question_ids": list(truncated)}


class JudgeError(RuntimeError):
    """The judge endpoint failed or returned something that is not a chat completion."""


@dataclass
class JudgeClient:
    """A minimal client for an OpenAI-compatible /chat/completions endpoint, with retries and backoff."""

    base_url: str
    model: str
    api_key: str = field(default="", repr=False)
    timeout_s: float = 120.0
    max_retries: int = 4
    backoff_s: float = 2.0
    """Wait before retry k (0-based) is backoff_s * 2**k, or the server's Retry-After when it sends one."""
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, **options) -> "JudgeClient":
        environ = os.environ if environ is None else environ
        base_url = environ.get("SMDM_JUDGE_BASE_URL", "")
        model = environ.get("SMDM_JUDGE_MODEL", "")
        missing = [name for name, value in (("SMDM_JUDGE_BASE_URL", base_url), ("SMDM_JUDGE_MODEL", model))
                   if not value]
        if missing:
            raise ValueError(
                f"the judge is not configured: set {' and '.join(missing)} (for example "
                "SMDM_JUDGE_BASE_URL=https://api.openai.com/v1 SMDM_JUDGE_MODEL=gpt-4), and SMDM_JUDGE_API_KEY"
            )
        api_key = environ.get("SMDM_JUDGE_API_KEY") or environ.get("OPENAI_API_KEY", "")
        return cls(base_url=base_url, model=model, api_key=api_key, **options)

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def _post(self, body: bytes) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return json.loads(response.read().decode("utf-8"))

    def complete(self, system: str, user: str, *, temperature: float = 0.0, max_tokens: int = 2048) -> str:
        """Send one chat request and return the reply text, retrying transient failures."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        body = json.dumps({"model": self.model, "messages": messages, "temperature": temperature,
                           "max_tokens": max_tokens}).encode("utf-8")
        for attempt in range(self.max_retries + 1):
            try:
                reply = self._post(body)
            except urllib.error.HTTPError as error:
                detail = error.read().decode("utf-8", "replace")[:300]
                if error.code not in RETRY_STATUS or attempt == self.max_retries:
                    raise JudgeError(
                        f"judge request to {self.url} failed with HTTP {error.code}: {detail}"
                        + (" (check SMDM_JUDGE_API_KEY)" if error.code in (401, 403) else "")
                    ) from error
                wait = _retry_after(error.headers.get("Retry-After")) or self.backoff_s * 2**attempt
                log.warning("judge returned HTTP %d; retry %d of %d in %.1f s", error.code, attempt + 1,
                            self.max_retries, wait)
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                if attempt == self.max_retries:
                    raise JudgeError(f"judge request to {self.url} failed after {attempt + 1} attempts: {error}") from error
                wait = self.backoff_s * 2**attempt
                log.warning("judge request failed (%s); retry %d of %d in %.1f s", error, attempt + 1,
                            self.max_retries, wait)
            except json.JSONDecodeError as error:
                raise JudgeError(f"judge at {self.url} returned a body that is not JSON: {error}") from error
            else:
                try:
                    return reply["choices"][0]["message"]["content"]
                except (KeyError, IndexError, TypeError) as error:
                    raise JudgeError(
                        f"judge at {self.url} returned no choices[0].message.content: {json.dumps(reply)[:300]}"
                    ) from error
            self.sleep(wait)
        raise AssertionError("unreachable: the retry loop returns or raises")


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date; fall back to exponential backoff


def parse_rating(judgment: str) -> float:
    """Return the judge's rating "[[x]]" (or "[x]"), or -1 when the text has none, as FastChat does."""
    match = RATING.search(judgment) or RATING_FALLBACK.search(judgment)
    return float(match.group(1)) if match else -1.0


def read_judge_prompts(path: str | Path) -> dict[str, dict]:
    return {record["name"]: record for record in read_jsonl(path)}


def judge_answers(
    client: JudgeClient,
    questions: Sequence[dict],
    answers: Sequence[dict],
    judge_prompts: Mapping[str, dict],
    references: Mapping[int, dict] | None = None,
) -> list[dict]:
    """Grade each first-turn answer with FastChat's single-answer prompts; return one judgment per answer.

    Questions in math, reasoning and coding use "single-math-v1" with the
    reference answer when one is given, the rest "single-v1".
    """
    by_id = {question["question_id"]: question for question in questions}
    references = references or {}
    judgments = []
    for answer in answers:
        question = by_id.get(answer["question_id"])
        if question is None:
            raise ValueError(f"answer for question_id {answer['question_id']} has no question in the question file")
        reference = references.get(question["question_id"])
        use_reference = question["category"] in REFERENCE_CATEGORIES and reference is not None
        prompt = judge_prompts["single-math-v1" if use_reference else "single-v1"]
        fields = {"question": question["turns"][0], "answer": answer["choices"][0]["turns"][0]}
        if use_reference:
            fields["ref_answer_1"] = reference["choices"][0]["turns"][0]
        user_prompt = prompt["prompt_template"].format(**fields)
        judgment = client.complete(prompt["system_prompt"], user_prompt)
        judgments.append({
            "question_id": question["question_id"], "model": answer["model_id"], "judge": [client.model, prompt["name"]],
            "user_prompt": user_prompt, "judgment": judgment, "score": parse_rating(judgment), "turn": 1,
            "tstamp": time.time(), "category": question["category"],
        })
    return judgments


def aggregate_scores(judgments: Sequence[dict]) -> dict:
    """Mean score per category and overall; judgments without a rating (-1) are counted, not averaged."""
    per_category: dict[str, list[float]] = defaultdict(list)
    unparsed: dict[str, int] = defaultdict(int)
    for judgment in judgments:
        if judgment["score"] < 0:
            unparsed[judgment["category"]] += 1
        else:
            per_category[judgment["category"]].append(judgment["score"])
    categories = sorted(set(per_category) | set(unparsed))
    table = {
        category: {"mean": (sum(per_category[category]) / len(per_category[category])) if per_category[category] else None,
                   "n": len(per_category[category]), "unparsed": unparsed[category]}
        for category in categories
    }
    scores = [score for values in per_category.values() for score in values]
    return {"overall": sum(scores) / len(scores) if scores else None, "n": len(scores), "categories": table}


def report_markdown(summary: dict, judge_model: str, answers_path: str) -> str:
    lines = ["# MT-Bench (first turn)", "", f"Answers: `{answers_path}`; judge model: `{judge_model}`", "",
             "| category | mean score | rated | unparsed |", "|---|---:|---:|---:|"]
    for category, row in summary["categories"].items():
        mean = f"{row['mean']:.2f}" if row["mean"] is not None else "-"
        lines.append(f"| {category} | {mean} | {row['n']} | {row['unparsed']} |")
    overall = f"{summary['overall']:.2f}" if summary["overall"] is not None else "-"
    lines.append(f"| overall | {overall} | {summary['n']} | |")
    return "\n".join(lines)
