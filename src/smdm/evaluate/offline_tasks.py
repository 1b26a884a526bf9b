"""Offline copies of lm-eval's zero-shot tasks: loaders of local files for the task YAMLs in `tasks/`.

The YAML files next to this module define hellaswag, openbookqa, arc_easy,
boolq, piqa, social_iqa, race and lambada_standard with the prompts, answer
choices, splits and metrics of lm-eval's stock tasks (lm-eval 0.4.13), but
read their documents from local files through `custom_dataset`. Each loader
returns documents in the schema that the stock prompt templates expect.

Where the files are: lm-eval passes the task metadata to the loaders, so set
`data_dir` (a folder laid out as below) or `<task>_file` (one file) there,
for example `--metadata '{"data_dir": "/data/benchmarks"}'` on lm-eval's
command line or `smdm evaluate --benchmark-dir DIR --task-file race=FILE`.
The environment variable SMDM_BENCHMARK_DATA is the fallback for data_dir.

    hellaswag/hellaswag_val_full.txt.bz2    6 lines per item: context, gold index, 4 endings
    openbookqa/test_llmfoundry.jsonl        query, choices, gold   (or the HF schema)
    arc_easy/test_llmfoundry.jsonl          query "Question: ...", choices, gold (or the HF schema)
    boolq/validation.jsonl                  question, passage, answer (bool) or label
    piqa/validation.jsonl                   goal, sol1, sol2, label
    social_iqa/validation.jsonl             context, question, answerA/B/C, label "1".."3"
    race/test.jsonl                         article + problems (lm-eval's EleutherAI/race schema),
                                            or one original RACE record (article, questions, options, answers)
    lambada/lambada_standard_test.txt       one passage per line, target = last word

Running this module prints the folder of the task YAMLs, for lm-eval's --include_path.
"""

from __future__ import annotations

import ast
import bz2
import json
import os
import re
from pathlib import Path
from typing import Any

from smdm.data.corpus import read_jsonl

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
DATA_ENV = "SMDM_BENCHMARK_DATA"

# task -> (split name used by lm-eval's stock task, file relative to data_dir)
TASK_FILES: dict[str, tuple[str, str]] = {
    "hellaswag": ("validation", "hellaswag/hellaswag_val_full.txt.bz2"),
    "openbookqa": ("test", "openbookqa/test_llmfoundry.jsonl"),
    "arc_easy": ("test", "arc_easy/test_llmfoundry.jsonl"),
    "boolq": ("validation", "boolq/validation.jsonl"),
    "piqa": ("validation", "piqa/validation.jsonl"),
    "social_iqa": ("validation", "social_iqa/validation.jsonl"),
    "race": ("test", "race/test.jsonl"),
    "lambada_standard": ("test", "lambada/lambada_standard_test.txt"),
}
OFFLINE_TASKS: tuple[str, ...] = tuple(TASK_FILES)
LETTERS = "ABCDEFGHIJ"


def task_file(task: str, data_dir: str | Path | None = None, path: str | Path | None = None) -> Path:
    """Return the local file of a task: `path` if given, else its place under data_dir (or $SMDM_BENCHMARK_DATA)."""
    if path:
        file = Path(path)
    else:
        folder = data_dir or os.environ.get(DATA_ENV)
        if not folder:
            raise ValueError(
                f"no data folder for task {task!r}: set the task metadata data_dir (smdm evaluate --benchmark-dir DIR), "
                f"{task}_file (--task-file {task}=FILE) or the environment variable {DATA_ENV}"
            )
        file = Path(folder) / TASK_FILES[task][1]
    if not file.is_file():
        raise FileNotFoundError(
            f"data file of task {task!r} not found: {file}; expected {TASK_FILES[task][1]} under the data folder, "
            f"or pass the file with {task}_file"
        )
    return file


def _dataset(task: str, docs: list[dict]) -> dict:
    import datasets

    if not docs:
        raise ValueError(f"task {task!r}: the data file contains no documents; check the file passed for it")
    return {TASK_FILES[task][0]: datasets.Dataset.from_list(docs)}


def _choices_schema(record: dict, question_key: str, prefix: str = "") -> dict:
    """Map an llm-foundry record (query, choices, gold) or an HF record to the HF multiple-choice schema."""
    if "choices" in record and isinstance(record["choices"], dict):
        return {question_key: record[question_key], "choices": record["choices"], "answerKey": record["answerKey"]}
    query = record["query"]
    if prefix and query.startswith(prefix):
        query = query[len(prefix) :]
    labels = list(LETTERS[: len(record["choices"])])
    return {
        question_key: query,
        "choices": {"text": list(record["choices"]), "label": labels},
        "answerKey": labels[int(record["gold"])],
    }


def load_arc_easy(data_dir: str | None = None, arc_easy_file: str | None = None, **_: Any) -> dict:
    records = read_jsonl(task_file("arc_easy", data_dir, arc_easy_file))
    return _dataset("arc_easy", [_choices_schema(r, "question", prefix="Question: ") for r in records])


def load_openbookqa(data_dir: str | None = None, openbookqa_file: str | None = None, **_: Any) -> dict:
    records = read_jsonl(task_file("openbookqa", data_dir, openbookqa_file))
    return _dataset("openbookqa", [_choices_schema(r, "question_stem") for r in records])


def load_boolq(data_dir: str | None = None, boolq_file: str | None = None, **_: Any) -> dict:
    records = read_jsonl(task_file("boolq", data_dir, boolq_file))
    docs = [
        {"passage": r["passage"], "question": r["question"], "label": int(r["label"] if "label" in r else r["answer"])}
        for r in records
    ]
    return _dataset("boolq", docs)


def load_piqa(data_dir: str | None = None, piqa_file: str | None = None, **_: Any) -> dict:
    records = read_jsonl(task_file("piqa", data_dir, piqa_file))
    docs = [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(r["label"])} for r in records]
    return _dataset("piqa", docs)


def load_social_iqa(data_dir: str | None = None, social_iqa_file: str | None = None, **_: Any) -> dict:
    records = read_jsonl(task_file("social_iqa", data_dir, social_iqa_file))
    keys = ("context", "question", "answerA", "answerB", "answerC", "label")
    return _dataset("social_iqa", [{key: str(r[key]) for key in keys} for r in records])


def clean_hellaswag(text: str) -> str:
    """Remove WikiHow bracket artifacts and doubled spaces, as lm-eval's hellaswag preprocessing does."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(data_dir: str | None = None, hellaswag_file: str | None = None, **_: Any) -> dict:
    """Read the 6-lines-per-item text file (context, gold index, four endings)."""
    path = task_file("hellaswag", data_dir, hellaswag_file)
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines is not a multiple of 6 (context, gold index, four endings)")
    docs = []
    for start in range(0, len(lines), 6):
        context, gold, *endings = lines[start : start + 6]
        docs.append({"query": clean_hellaswag(context), "choices": [clean_hellaswag(e) for e in endings],
                     "label": str(int(gold)), "gold": int(gold)})
    return _dataset("hellaswag", docs)


def _race_problems(record: dict) -> list[dict]:
    """Return the problems of a RACE record as dicts with question, options and answer letter."""
    if "problems" in record:
        problems = record["problems"]
        return ast.literal_eval(problems) if isinstance(problems, str) else list(problems)
    if {"questions", "options", "answers"} <= set(record):
        return [{"question": q, "options": o, "answer": a}
                for q, o, a in zip(record["questions"], record["options"], record["answers"])]
    raise ValueError(f"RACE record with keys {sorted(record)} has neither 'problems' nor 'questions'/'options'/'answers'")


def load_race(data_dir: str | None = None, race_file: str | None = None, **_: Any) -> dict:
    """Read RACE articles, one JSON record per line (or a single JSON record per file)."""
    path = task_file("race", data_dir, race_file)
    text = path.read_text(encoding="utf-8").strip()
    records = [json.loads(text)] if text.startswith("{") and "\n" not in text else read_jsonl(path)
    docs = [{"article": r["article"], "problems": repr(_race_problems(r))} for r in records]
    return _dataset("race", docs)


def race_answer_option(problem: dict) -> str:
    return problem["options"][LETTERS.index(problem["answer"])]


def race_doc_to_text(doc: dict) -> str:
    """Build the RACE prompt: the article, every earlier problem with its answer, then the last question.

    Matches lm-eval's race task: a cloze question (ending in "  _  .") gets
    its answer filled in, any other becomes "Question: ...\\nAnswer: ...".
    """
    problems = ast.literal_eval(doc["problems"])
    text = "Article: " + doc["article"] + "\n\n"
    for problem in problems[:-1]:
        question = problem["question"]
        if question.endswith("  _  ."):
            text += question[:-5] + race_answer_option(problem) + "\n"
        else:
            text += "Question: " + question + "\n" + "Answer: " + race_answer_option(problem) + "\n"
    return text + problems[-1]["question"]


def race_doc_to_choice(doc: dict) -> list[str]:
    return list(ast.literal_eval(doc["problems"])[-1]["options"][:4])


def race_doc_to_target(doc: dict) -> int:
    return LETTERS.index(ast.literal_eval(doc["problems"])[-1]["answer"])


def load_lambada_standard(data_dir: str | None = None, lambada_standard_file: str | None = None, **_: Any) -> dict:
    path = task_file("lambada_standard", data_dir, lambada_standard_file)
    if path.suffix == ".jsonl":
        texts = [r["text"] for r in read_jsonl(path)]
    else:
        texts = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    return _dataset("lambada_standard", [{"text": text} for text in texts])


if __name__ == "__main__":
    print(TASKS_DIR)
