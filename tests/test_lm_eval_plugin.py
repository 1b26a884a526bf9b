"""The `smdm` lm-eval model through lm-eval's own evaluator, against direct likelihood calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import shared_path, tiny_model

lm_eval = pytest.importorskip("lm_eval")
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from smdm.checkpoint import save_checkpoint  # noqa: E402
from smdm.data.tokenizer import train_bpe  # noqa: E402
from smdm.evaluate.harness import SmdmLM  # noqa: E402
from smdm.evaluate.likelihood import arm_loglikelihood, mdm_mc_loglikelihood  # noqa: E402
from smdm.evaluate.offline_tasks import TASKS_DIR, race_doc_to_text  # noqa: E402
from smdm.generate import SampleConfig, generate  # noqa: E402

DEVICE = torch.device("cpu")
REAL_TASKS = ("arc_easy", "boolq", "hellaswag", "lambada_standard", "openbookqa", "piqa", "social_iqa")
MC_SAMPLES = 4


@pytest.fixture(scope="module")
def tokenizer():
    text = (shared_path("benchmarks/piqa/validation.jsonl").read_text(encoding="utf-8")[:60000]).split("\n")
    return train_bpe(text, vocab_size=320)


@pytest.fixture(scope="module")
def models(tokenizer):
    return {
        kind: tiny_model(kind, vocab_size=tokenizer.vocab_size, block_size=128, seed=7).to(DEVICE)
        for kind in ("mdm", "arm")
    }


def split_like_template_lm(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The TemplateLM rule, written out: trailing context spaces move to the continuation; empty context is EOS."""
    if not context:
        return [tokenizer.eos_id], tokenizer.encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


def fit_window(kind, context, continuation, block_size=128):
    """Requests longer than the window keep their last tokens, as lm-eval's Hugging Face model does."""
    limit = block_size - 1 if kind == "mdm" else block_size
    cut = max(0, len(continuation) - limit)
    return context + continuation[:cut], continuation[cut:]


def run_tasks(lm, tasks, metadata, limit=2):
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)
    return simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager, log_samples=True,
                           bootstrap_iters=0)


def direct_scores(kind, model, pairs):
    if kind == "mdm":
        return mdm_mc_loglikelihood(model, pairs, mc_samples=MC_SAMPLES, batch_size=16, seed=1234)
    return [score for score, _ in arm_loglikelihood(model, pairs)]


@pytest.mark.parametrize("kind", ["mdm", "arm"])
def test_evaluator_matches_direct_calls(kind, models, tokenizer):
    data_dir = shared_path("benchmarks")
    model = models[kind]
    lm = SmdmLM(model=model, tokenizer=tokenizer, mc_samples=MC_SAMPLES, batch_size=16, seed=1234)
    results = run_tasks(lm, REAL_TASKS, {"data_dir": str(data_dir)})
    for task in REAL_TASKS:
        samples = results["samples"][task]
        assert len(samples) == 2, task
        correct = []
        for sample in samples:
            pairs = [fit_window(kind, *split_like_template_lm(tokenizer, *arguments)) for arguments in sample["arguments"]]
            got = [resp[0][0] for resp in sample["resps"]]
            assert got == pytest.approx(direct_scores(kind, model, pairs), abs=1e-3), task
            if task != "lambada_standard":
                correct.append(float(max(range(len(got)), key=got.__getitem__) == int(sample["target"])))
        if task != "lambada_standard":
            assert results["results"][task]["acc,none"] == pytest.approx(sum(correct) / len(correct)), task


def test_prompts_follow_stock_templates(models, tokenizer):
    data_dir = shared_path("benchmarks")
    lm = SmdmLM(model=models["arm"], tokenizer=tokenizer, batch_size=16)
    results = run_tasks(lm, REAL_TASKS, {"data_dir": str(data_dir)}, limit=1)
    first = {task: results["samples"][task][0] for task in REAL_TASKS}
    arc = json.loads(Path(data_dir, "arc_easy/test_llmfoundry.jsonl").read_text().split("\n")[0])
    assert first["arc_easy"]["arguments"][0] == (arc["query"] + "\nAnswer:", " " + arc["choices"][0])
    boolq = json.loads(Path(data_dir, "boolq/validation.jsonl").read_text().split("\n")[0])
    assert first["boolq"]["arguments"] == [
        (f"{boolq['passage']}\nQuestion: {boolq['question']}?\nAnswer:", " no"),
        (f"{boolq['passage']}\nQuestion: {boolq['question']}?\nAnswer:", " yes"),
    ]
    assert int(first["boolq"]["target"]) == int(boolq["answer"])
    piqa = json.loads(Path(data_dir, "piqa/validation.jsonl").read_text().split("\n")[0])
    assert first["piqa"]["arguments"][1] == (f"Question: {piqa['goal']}\nAnswer:", " " + piqa["sol2"])
    siqa = json.loads(Path(data_dir, "social_iqa/validation.jsonl").read_text().split("\n")[0])
    assert first["social_iqa"]["arguments"][2] == (f"Q: {siqa['context']} {siqa['question']}\nA:", " " + siqa["answerC"])
    assert int(first["social_iqa"]["target"]) == int(siqa["label"]) - 1
    obqa = json.loads(Path(data_dir, "openbookqa/test_llmfoundry.jsonl").read_text().split("\n")[0])
    assert first["openbookqa"]["arguments"][0] == (obqa["query"], " " + obqa["choices"][0])
    assert int(first["openbookqa"]["target"]) == obqa["gold"]
    assert first["hellaswag"]["arguments"][3] == (
        "Roof shingle removal: A man is sitting on a roof. he", " starts pulling up roofing on a roof."
    )
    assert int(first["hellaswag"]["target"]) == 3
    line = Path(data_dir, "lambada/lambada_standard_test.txt").read_text().split("\n")[0]
    assert first["lambada_standard"]["arguments"] == [(line.rsplit(" ", 1)[0], " " + line.rsplit(" ", 1)[1])]


RACE_RECORDS = [
    {
        "article": "Tom has a red bike. He rides it to school every day.",
        "problems": repr([
            {"question": "Tom rides his bike to  _  .", "options": ["the park", "school", "work", "town"],
             "answer": "B"},
            {"question": "What colour is the bike?", "options": ["red", "blue", "green", "black"], "answer": "A"},
        ]),
    },
    {
        "article": "Ann reads books at night.",
        "questions": ["When does Ann read?"],
        "options": [["at noon", "in the morning", "at night", "never"]],
        "answers": ["C"],
    },
]


def test_race_from_a_local_file(tmp_path, models, tokenizer):
    path = tmp_path / "race_test.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in RACE_RECORDS) + "\n", encoding="utf-8")
    lm = SmdmLM(model=models["mdm"], tokenizer=tokenizer, mc_samples=MC_SAMPLES, batch_size=16, seed=1234)
    results = run_tasks(lm, ["race"], {"race_file": str(path)})
    samples = sorted(results["samples"]["race"], key=lambda s: s["doc_id"])
    assert samples[0]["arguments"][0] == (
        "Article: Tom has a red bike. He rides it to school every day.\n\nTom rides his bike to school\n"
        "What colour is the bike?",
        " red",
    )
    assert samples[1]["arguments"][2] == ("Article: Ann reads books at night.\n\nWhen does Ann read?", " at night")
    assert [int(s["target"]) for s in samples] == [0, 2]
    for sample in samples:
        pairs = [split_like_template_lm(tokenizer, *arguments) for arguments in sample["arguments"]]
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(direct_scores("mdm", models["mdm"], pairs), abs=1e-3)


def test_race_prompt_matches_lm_eval_stock():
    stock = pytest.importorskip("lm_eval.tasks.race.preprocess_race")
    doc = RACE_RECORDS[0]
    assert race_doc_to_text(doc) == stock.doc_to_text(doc)


def test_hellaswag_cleaning_matches_lm_eval_stock():
    stock = pytest.importorskip("lm_eval.tasks.hellaswag.utils")
    from smdm.evaluate.offline_tasks import clean_hellaswag

    for text in ("A man [title] is here. [step] He  walks.", " plain text ", "Cut [header] the cake [substeps]"):
        assert clean_hellaswag(text) == stock.preprocess(text)


def make_instance(request_type, arguments, task="demo"):
    return Instance(request_type=request_type, doc={}, arguments=arguments, idx=0, metadata=(task, 0, 1))


def test_loglikelihood_rolling_windows(models, tokenizer):
    text = " ".join(["the bike is red and the cake is sweet"] * 12)
    ids = tokenizer.encode(text)
    assert len(ids) > 128
    arm = SmdmLM(model=models["arm"], tokenizer=tokenizer)
    windows = arm.rolling_windows(text)
    assert [t for _, cont in windows for t in cont] == ids
    (got,) = arm.loglikelihood_rolling([make_instance("loglikelihood_rolling", (text,))])
    # The ARM's value is exact: compare with the explicit per-window log-probabilities.
    expected = 0.0
    for context, continuation in windows:
        tokens = torch.tensor(context + continuation)
        with torch.no_grad():
            logp = torch.log_softmax(models["arm"](tokens[None, :-1])[0].double(), -1)
        rows = torch.arange(len(context) - 1, len(tokens) - 1)
        expected += logp[rows, tokens[len(context) :]].sum().item()
    assert got == pytest.approx(expected, abs=1e-3)

    mdm = SmdmLM(model=models["mdm"], tokenizer=tokenizer, mc_samples=MC_SAMPLES, seed=1234)
    mdm_windows = mdm.rolling_windows(text)
    assert all(len(c) + len(y) <= 128 for c, y in mdm_windows)
    assert [t for _, cont in mdm_windows for t in cont] == ids
    (bound,) = mdm.loglikelihood_rolling([make_instance("loglikelihood_rolling", (text,))])
    direct = mdm_mc_loglikelihood(models["mdm"], mdm_windows, mc_samples=MC_SAMPLES, batch_size=32, seed=1234)
    assert bound == pytest.approx(sum(direct), abs=1e-3)


def test_generate_until_cuts_at_stop(models, tokenizer):
    lm = SmdmLM(model=models["arm"], tokenizer=tokenizer, seed=5)
    context = "Question: how do I open a jar?\nAnswer:"
    (full,) = lm.generate_until([make_instance("generate_until", (context, {"until": [], "max_gen_toks": 12}))])
    prompt = torch.tensor([[tokenizer.eos_id] + tokenizer.encode(context)])
    (row,) = generate(models["arm"], prompt, SampleConfig(max_new_tokens=12, temperature=0.0, seed=5),
                      eos_id=tokenizer.eos_id)
    assert full == tokenizer.decode(row)
    assert len(full) > 2
    stop = full[1:3]
    (cut,) = lm.generate_until([make_instance("generate_until", (context, {"until": [stop], "max_gen_toks": 12}))])
    assert cut == full[: full.index(stop)]


def test_greedy_flag_only_for_lambada(models, tokenizer):
    lm = SmdmLM(model=models["mdm"], tokenizer=tokenizer, mc_samples=2)
    request = ("the cake is", " sweet")
    lambada, other = lm.loglikelihood([make_instance("loglikelihood", request, "lambada_standard"),
                                       make_instance("loglikelihood", request, "piqa")])
    assert lambada[0] == pytest.approx(other[0])
    always = SmdmLM(model=models["mdm"], tokenizer=tokenizer, mc_samples=2, greedy="always")
    assert always.loglikelihood([make_instance("loglikelihood", request, "piqa")])[0][1] == lambada[1]


def test_per_task_guidance(models, tokenizer):
    request = ("the cake is", " sweet")
    plain = SmdmLM(model=models["mdm"], tokenizer=tokenizer, mc_samples=4)
    guided = SmdmLM(model=models["mdm"], tokenizer=tokenizer, mc_samples=4, cfg="piqa:1.0")
    base = plain.loglikelihood([make_instance("loglikelihood", request, "piqa")])[0][0]
    assert guided.loglikelihood([make_instance("loglikelihood", request, "boolq")])[0][0] == base
    assert guided.loglikelihood([make_instance("loglikelihood", request, "piqa")])[0][0] != base
    with pytest.raises(ValueError, match="needs an MDM"):
        SmdmLM(model=models["arm"], tokenizer=tokenizer, cfg=0.5)
    with pytest.raises(ValueError, match="invalid cfg"):
        SmdmLM(model=models["mdm"], tokenizer=tokenizer, cfg="piqa:x")


def test_registered_under_smdm():
    assert get_model("smdm") is SmdmLM


# lm-eval's command line indexes its thousands of stock task files at start-up (about 30 s on 2 busy cores).
@pytest.mark.slow
def test_found_by_lm_eval_cli(tmp_path, models, tokenizer):
    checkpoint = save_checkpoint(tmp_path / "ckpt", models["arm"], tokenizer)
    data_dir = shared_path("benchmarks")
    out = tmp_path / "out"
    command = [
        sys.executable, "-c", "from smdm.evaluate.harness import cli_main; cli_main()",
        "run", "--model", "smdm", "--model_args", f"checkpoint={checkpoint}", "--device", "cpu",
        "--tasks", "piqa", "--include_path", str(TASKS_DIR), "--limit", "2",
        "--metadata", json.dumps({"data_dir": str(data_dir)}), "--output_path", str(out),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    (result_file,) = out.rglob("results_*.json")
    results = json.loads(result_file.read_text())["results"]["piqa"]
    lm = SmdmLM(model=models["arm"], tokenizer=tokenizer)
    direct = run_tasks(lm, ["piqa"], {"data_dir": str(data_dir)})["results"]["piqa"]
    assert results["acc,none"] == direct["acc,none"]
    assert results["acc_norm,none"] == direct["acc_norm,none"]
