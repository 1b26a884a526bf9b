"""Downstream tasks: GSM8K grading and data, reversal metrics, temporal table, MT-Bench files and judge."""

from __future__ import annotations

import json
import logging
import math
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import shared_path, tiny_model
from scipy import stats

from smdm.cli import main
from smdm.data.corpus import read_jsonl
from smdm.data.sft import PromptResponse
from smdm.data.tokenizer import train_bpe
from smdm.generate import SampleConfig, generate
from smdm.sampling_api import encode_prompt
from smdm.tasks.common import generate_texts, keep_prompt_end
from smdm.tasks.gsm8k import (
    Problem,
    accuracy_with_stderr,
    answers_equivalent,
    evaluate_two_stage,
    extract_answer,
    normalize_answer,
    read_problems,
    two_rows,
)
from smdm.tasks.mt_bench import (
    ANSWER_FIELDS,
    JudgeClient,
    JudgeError,
    aggregate_scores,
    generate_answers,
    judge_answers,
    parse_rating,
    read_judge_prompts,
    truncated_questions,
    write_answers,
)
from smdm.tasks.reversal import candidate_ranking, evaluate_reversal, reversal_metrics
from smdm.tasks.temporal import evaluate_periods, group_by_period, plot_periods, read_dated_texts, report_markdown

DEVICE = "cpu"


# GSM8K
def test_gsm8k_extraction_real_test_answers():
    records = read_jsonl(shared_path("gsm8k/cllm/test.jsonl"))
    for record in records:
        extracted = extract_answer(record["answer"])
        assert answers_equivalent(extracted, record["target"]), (extracted, record["target"])
    # Real answers with thousands separators and negative numbers.
    assert extract_answer(records[611]["answer"]) == "1,450,000"
    assert normalize_answer(extract_answer(records[611]["answer"])) == "1450000"
    assert extract_answer(records[1113]["answer"]) == "-3"


@pytest.mark.parametrize("prediction, reference", [
    ("$2,125.", "2125"),
    ("114,200 dollars", "114200"),
    ("18 eggs.", "18"),
    ("-10 degrees", "-10"),
    ("\u22123", "-3"),
    ("- 3", "-3"),
    ("36/2", "18"),
    ("0.5", "1/2"),
    ("3 / 4", "0.75"),
    ("18.00", "18"),
    ("20%", "20"),
])
def test_gsm8k_equivalent_answers(prediction, reference):
    assert answers_equivalent(prediction, reference)


@pytest.mark.parametrize("prediction, reference", [
    ("5", "-5"), ("2,125", "2126"), ("1/3", "0.33"), ("no answer", "4"), (None, "4"),
])
def test_gsm8k_different_answers(prediction, reference):
    assert not answers_equivalent(prediction, reference)


def test_gsm8k_extract_requires_mark():
    assert extract_answer("so the total is 12") is None
    assert extract_answer("a #### 3 #### 4") == "4"


def test_gsm8k_two_rows_match_hand_built():
    problems = read_problems(shared_path("gsm8k/implicit_cot/train_no_aug.txt"), limit=1)
    question = ("The town\u2019s annual budget totals $32 million. If half of the budget goes towards policing and "
                "$12 million goes towards education. How much money is left for managing public spaces?")
    reasoning = ("The annual budget for policing is 32 / 2 = $16 million. The combined budget for education and "
                 "policing is 16 + 12 = $28 million. There is 32 - 28 = $4 million to manage public spaces.")
    assert two_rows(problems[0]) == [
        PromptResponse(question + "\n", reasoning),
        PromptResponse(question + "\n" + reasoning + "\n#### ", "4"),
    ]


def test_gsm8k_openai_rows_drop_calculations():
    problem = read_problems(shared_path("gsm8k/openai/train.jsonl"), limit=1)[0]
    assert problem.answer == "72"
    assert "<<" not in problem.reasoning
    assert problem.reasoning.startswith("Natalia sold 48/2 = 24 clips in May.")


def test_gsm8k_accuracy_stderr_matches_scipy():
    correct = [True, False, True, True, False, True, False, False, True, True]
    result = accuracy_with_stderr(correct)
    assert result["accuracy"] == pytest.approx(0.6)
    assert result["stderr"] == pytest.approx(stats.sem(np.array(correct, dtype=float)))


def _tiny_with_tokenizer(kind, texts, block_size=96):
    tokenizer = train_bpe(texts, 300)
    return tiny_model(kind, vocab_size=tokenizer.vocab_size, block_size=block_size), tokenizer


def test_generate_texts_batches_by_length():
    model, tokenizer = _tiny_with_tokenizer("mdm", ["one two three four five six"] * 10)
    prompts = ["one", "one two three", "two", "one two three four"]
    config = SampleConfig(max_new_tokens=4, steps=4, temperature=0.0, sampler="low_confidence", stop_at_eos=False)
    together = generate_texts(model, tokenizer, prompts, config, batch_size=3)
    alone = [generate_texts(model, tokenizer, [prompt], config)[0] for prompt in prompts]
    assert together == alone
    guided_together = generate_texts(model, tokenizer, prompts, config, guidance=1.5, batch_size=3)
    guided_alone = [generate_texts(model, tokenizer, [prompt], config, guidance=1.5)[0] for prompt in prompts]
    assert guided_together == guided_alone
    assert guided_together != together  # guidance changes the argmax somewhere


def test_gsm8k_two_stage_grades_outputs():
    model, tokenizer = _tiny_with_tokenizer("mdm", ["Tom has 3 apples #### 3 and 4"] * 10)
    problems = [Problem("Tom has 3 apples. How many?", "He has 3.", "3"), Problem("2 + 2?", "4", "4")]
    config = SampleConfig(max_new_tokens=6, steps=3, temperature=0.0, sampler="low_confidence")
    results = evaluate_two_stage(model, tokenizer, problems, config, config, reasoning_guidance=0.5)
    assert results["summary"]["n"] == 2
    assert results["summary"]["skipped"] == 0
    assert results["settings"]["reasoning"]["guidance"] == 0.5
    for record in results["records"]:
        assert record["correct"] == answers_equivalent(extract_answer("#### " + record["output"]), record["reference"])


def test_gsm8k_skips_problems_too_long_for_context():
    model, tokenizer = _tiny_with_tokenizer("mdm", ["Tom has 3 apples #### 3 and 4"] * 10, block_size=40)
    long_question = "Tom has 3 apples and 4 apples and " * 6 + "how many?"
    problems = [Problem(long_question, "7", "7"), Problem("2 + 2?", "4", "4")]
    config = SampleConfig(max_new_tokens=6, steps=3, temperature=0.0, sampler="low_confidence")
    results = evaluate_two_stage(model, tokenizer, problems, config, config)
    assert results["summary"]["skipped"] == 1
    assert results["summary"]["n"] == 1
    assert [record["question"] for record in results["records"]] == ["2 + 2?"]


def test_gsm8k_cli_uses_block_decoding(tmp_path):
    from smdm.checkpoint import save_checkpoint

    rows = read_jsonl(shared_path("gsm8k/openai/test.jsonl"))[:2]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    model, tokenizer = _tiny_with_tokenizer("mdm", [row["question"] + row["answer"] for row in rows], block_size=192)
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    assert main(["task", "gsm8k", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "test.jsonl"),
                 "--out", str(tmp_path / "out"), "--reasoning-max-new-tokens", "8", "--reasoning-steps", "8",
                 "--reasoning-block-length", "4", "--answer-max-new-tokens", "4", "--answer-steps", "4",
                 "--device", DEVICE]) == 0
    results = json.loads((tmp_path / "out" / "gsm8k.json").read_text())
    assert results["settings"]["reasoning"]["block_length"] == 4
    assert results["settings"]["answer"]["block_length"] == 0

    # The same two stages run directly with blocks of 4 give the same reasoning.
    blocks = SampleConfig(max_new_tokens=8, steps=8, temperature=0.0, sampler="low_confidence", block_length=4)
    answer = SampleConfig(max_new_tokens=4, steps=4, temperature=0.0, sampler="low_confidence")
    direct = evaluate_two_stage(model, tokenizer, read_problems(tmp_path / "test.jsonl"), blocks, answer)
    assert [r["reasoning"] for r in results["records"]] == [r["reasoning"] for r in direct["records"]]


# Reversal curse
def test_reversal_metrics_hand_outputs():
    references = [" Daphne Barrington", " the director of \"A Journey Through Time.\"."]
    outputs = ["Daphne Barrington, of course", "the composer of a symphony"]
    metrics = reversal_metrics(outputs, references)
    assert metrics["exact_match"] == 0.5
    assert 0 < metrics["bleu"] < 100
    perfect = reversal_metrics([ref.strip() for ref in references], references)
    assert perfect["exact_match"] == 1.0
    assert perfect["bleu"] == pytest.approx(100.0)
    assert reversal_metrics(["xyz qqq", "zzz"], references)["bleu"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="2 outputs but 1 references"):
        reversal_metrics(outputs, references[:1])


def test_reversal_cli_on_real_questions(tmp_path):
    from smdm.checkpoint import save_checkpoint

    data = shared_path("reversal_curse/reverse_experiments/june_version_7921032488")
    texts = [r["prompt"] + r["completion"] for r in read_jsonl(data / "p2d_prompts_test.jsonl")]
    model, tokenizer = _tiny_with_tokenizer("arm", texts, block_size=128)
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    assert main(["task", "reversal", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(data), "--out",
                 str(tmp_path / "out"), "--limit", "2", "--device", DEVICE]) == 0
    results = json.loads((tmp_path / "out" / "reversal.json").read_text())
    assert set(results["splits"]) == {"p2d_same", "p2d_reversed", "d2p_same", "d2p_reversed"}
    assert results["splits"]["p2d_reversed"]["direction"] == "description to name"
    assert all(m["n"] == 2 for m in results["splits"].values())
    assert "| p2d_reversed |" in (tmp_path / "out" / "reversal.md").read_text()

    assert main(["task", "reversal", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(data), "--out",
                 str(tmp_path / "ranked"), "--limit", "2", "--split", "p2d_reversed", "--rank", "--device", DEVICE]) == 0
    ranked = json.loads((tmp_path / "ranked" / "reversal.json").read_text())
    assert list(ranked["splits"]) == ["p2d_reversed"]
    # The candidates are the 30 distinct names of the whole split, not only those of the 2 questions asked.
    assert ranked["splits"]["p2d_reversed"]["ranking"]["candidates"] == 30
    assert "top-1 of candidates" in (tmp_path / "ranked" / "reversal.md").read_text()


@pytest.mark.parametrize("kind", ["mdm", "arm"])
def test_eos_only_last_fills_canvas(kind):
    model, tokenizer = _tiny_with_tokenizer(kind, ["one two three four five six"] * 10)
    # Make EOS the top prediction everywhere, so only the option can keep it out of the canvas.
    model.lm_head.register_forward_hook(lambda module, args, out: out.index_add(
        -1, torch.tensor([tokenizer.eos_id]), torch.full((*out.shape[:-1], 1), 100.0)))
    decoded = []
    decode = tokenizer.decode
    tokenizer.decode = lambda ids, **options: decoded.append(list(ids)) or decode(ids, **options)
    config = SampleConfig(max_new_tokens=6, steps=6, temperature=0.0, sampler="low_confidence")
    prompts = ["one two", "three"]
    generate_texts(model, tokenizer, prompts, config)
    assert decoded == [[], []]
    decoded.clear()
    generate_texts(model, tokenizer, prompts, config, max_new_tokens=[3, 5], eos_only_last=True)
    # Each row keeps every token before its last one; the last is EOS and is cut.
    assert [len(ids) for ids in decoded] == [2, 4]
    assert all(tokenizer.eos_id not in ids for ids in decoded)


def test_candidate_ranking_matches_direct_scores():
    data = shared_path("reversal_curse/reverse_experiments/june_version_7921032488")
    records = read_jsonl(data / "p2d_reverse_prompts_test.jsonl")[::60]
    model, tokenizer = _tiny_with_tokenizer("arm", [r["prompt"] + r["completion"] for r in records])
    candidates = sorted({r["completion"] for r in records})
    prompts, references = [r["prompt"] for r in records], [r["completion"] for r in records]
    ranking = candidate_ranking(model, tokenizer, prompts, references, candidates)

    # Score each pair with one forward pass over EOS, prompt and candidate.
    ranks = []
    for prompt, reference in zip(prompts, references):
        scores = {}
        for candidate in candidates:
            context = [tokenizer.eos_id] + tokenizer.encode(prompt)
            ids = torch.tensor([context + tokenizer.encode(candidate)])
            with torch.no_grad():
                logprobs = F.log_softmax(model(ids[:, :-1]).double(), dim=-1)[0]
            targets = ids[0, len(context) :]
            scores[candidate] = logprobs[len(context) - 1 :].gather(1, targets[:, None]).sum().item()
        ranks.append(1 + sum(score >= scores[reference] for c, score in scores.items() if c != reference))
    assert ranking["candidates"] == len(candidates)
    assert ranking["top1"] == pytest.approx(sum(rank == 1 for rank in ranks) / len(ranks))
    assert ranking["mean_rank"] == pytest.approx(sum(ranks) / len(ranks))
    with pytest.raises(ValueError, match="must be one of the candidates"):
        candidate_ranking(model, tokenizer, prompts, references, candidates[1:])


def test_reversal_skips_questions_over_context():
    data = shared_path("reversal_curse/reverse_experiments/june_version_7921032488")
    records = read_jsonl(data / "p2d_prompts_test.jsonl")[:40]
    tokenizer = train_bpe([r["prompt"] + r["completion"] for r in records], 300)
    sizes = [len(tokenizer.encode(r["prompt"])) + len(tokenizer.encode(r["completion"])) + 1 for r in records]
    # A context that fits the shorter half of the questions.
    context = sorted(sizes)[20]
    model = tiny_model("mdm", vocab_size=tokenizer.vocab_size, block_size=context)
    config = SampleConfig(max_new_tokens=8, steps=4, temperature=0.0, sampler="low_confidence")
    results = evaluate_reversal(model, tokenizer, data, config, splits=["p2d_same"], limit=40)
    metrics = results["splits"]["p2d_same"]
    assert metrics["skipped"] == sum(size > context for size in sizes)
    assert 0 < metrics["skipped"] < 40
    assert metrics["n"] == 40 - metrics["skipped"]


# Temporal shift
def test_temporal_groups_real_sotu():
    texts = read_dated_texts(shared_path("temporal"), "sotu")
    assert len(texts) == 233
    groups = group_by_period(texts, 50)
    assert list(groups)[:2] == [1750, 1800]
    assert sum(len(v) for v in groups.values()) == 233
    parl = group_by_period(read_dated_texts(shared_path("temporal"), "parlspeech"), 10)
    assert set(parl) <= {1980, 1990, 2000, 2010}


def test_temporal_arm_perplexity_matches_direct(tmp_path):
    model, tokenizer = _tiny_with_tokenizer("arm", ["alpha beta gamma delta epsilon"] * 10, block_size=32)
    groups = {1800: ["alpha beta gamma delta epsilon " * 8], 1900: ["gamma alpha " * 12]}
    rows = evaluate_periods(model, tokenizer, groups, seq_len=16, max_windows=1, mc_samples=2)
    for row, texts in zip(rows, groups.values()):
        ids = tokenizer.encode(texts[0]) + [tokenizer.eos_id]
        window = torch.tensor([ids[:17]])  # eval_windows takes the first window when only one is asked for
        logits = model(window[:, :-1]).float()
        expected = F.cross_entropy(logits[0], window[0, 1:]).item()
        assert row["loss"] == pytest.approx(expected, rel=1e-5)
        assert row["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
        assert row["bound"] is False
    results = {"sources": {"toy": {"arm-run": {"kind": "arm", "periods": rows}}}}
    table = report_markdown(results)
    assert table.count("| arm-run | arm |") == 2
    png = plot_periods(results, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_temporal_mdm_rows_are_bounds():
    model, tokenizer = _tiny_with_tokenizer("mdm", ["alpha beta gamma delta"] * 10, block_size=32)
    rows = evaluate_periods(model, tokenizer, {2000: ["alpha beta " * 20], 2010: ["x"]}, seq_len=16,
                            max_windows=2, mc_samples=2)
    assert rows[0]["bound"] is True
    # A uniform-ish untrained model sits near log V nats per token.
    assert abs(rows[0]["loss"] - math.log(tokenizer.vocab_size)) < 1.5
    assert "skipped" in rows[1]


# MT-Bench
def test_mt_bench_answer_file_fields(tmp_path):
    questions = read_jsonl(shared_path("mt_bench/question.jsonl"))[:3]
    model, tokenizer = _tiny_with_tokenizer("mdm", [q["turns"][0] for q in questions], block_size=256)
    config = SampleConfig(max_new_tokens=8, steps=4, temperature=0.0, sampler="low_confidence")
    records = generate_answers(model, tokenizer, questions, config, "tiny-mdm", guidance=1.0)
    path, settings_path = write_answers(records, tmp_path / "tiny-mdm.jsonl", {"sampler": config.__dict__})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["question_id"] for line in lines] == [81, 82, 83]
    for line in lines:
        assert tuple(line) == ANSWER_FIELDS
        assert set(ANSWER_FIELDS) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert line["model_id"] == "tiny-mdm"
        assert isinstance(line["answer_id"], str)
        assert isinstance(line["tstamp"], float)
        assert len(line["choices"]) == 1
        assert set(line["choices"][0]) == {"index", "turns"}
        assert line["choices"][0]["index"] == 0
        assert len(line["choices"][0]["turns"]) == 1
    assert json.loads(settings_path.read_text())["sampler"]["steps"] == 4


def test_mt_bench_answer_uses_checkpoint_template(tmp_path):
    from smdm.checkpoint import save_checkpoint

    questions = read_jsonl(shared_path("mt_bench/question.jsonl"))[:2]
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions), encoding="utf-8")
    model, tokenizer = _tiny_with_tokenizer("arm", [q["turns"][0] for q in questions], block_size=512)
    template = "User: {prompt}\nAssistant:"
    save_checkpoint(tmp_path / "ckpt", model, tokenizer, train_config={"finetune": {"prompt_template": template}})
    assert main(["task", "mt-bench-answer", "--checkpoint", str(tmp_path / "ckpt"), "--questions",
                 str(tmp_path / "questions.jsonl"), "--out", str(tmp_path / "out"), "--model-id", "tiny",
                 "--max-new-tokens", "6", "--device", DEVICE]) == 0
    settings = json.loads((tmp_path / "out" / "tiny.settings.json").read_text())
    assert settings["prompt_template"] == template
    answers = [json.loads(line)["choices"][0]["turns"][0] for line in (tmp_path / "out" / "tiny.jsonl").open()]
    config = SampleConfig(max_new_tokens=6, temperature=0.0)
    wrapped = [f"User: {q['turns'][0]}\nAssistant:" for q in questions]
    assert answers == [text.strip() for text in generate_texts(model, tokenizer, wrapped, config, batch_size=8)]


def test_keep_prompt_end_per_kind():
    assert keep_prompt_end([5, 6, 7, 8, 9], 3, "mdm") == [7, 8, 9]
    assert keep_prompt_end([0, 6, 7, 8, 9], 3, "arm") == [0, 8, 9]
    assert keep_prompt_end([5, 6], 3, "mdm") == [5, 6]
    with pytest.raises(ValueError, match="lower --max-new-tokens"):
        keep_prompt_end([5, 6], 1, "mdm")


@pytest.mark.parametrize("kind", ["mdm", "arm"])
def test_mt_bench_long_question_keeps_its_end(kind):
    questions = read_jsonl(shared_path("mt_bench/question.jsonl"))
    model, tokenizer = _tiny_with_tokenizer(kind, [q["turns"][0] for q in questions], block_size=48)
    config = SampleConfig(max_new_tokens=8, steps=4, temperature=0.0, sampler="low_confidence")
    truncated = truncated_questions(tokenizer, model, questions, config.max_new_tokens)
    lengths = {q["question_id"]: len(encode_prompt(tokenizer, q["turns"][0], kind)) for q in questions}
    assert truncated == [qid for qid, length in lengths.items() if length > 40]
    assert truncated
    long_question = next(q for q in questions if q["question_id"] == truncated[0])
    (record,) = generate_answers(model, tokenizer, [long_question], config, "tiny", batch_size=1)

    # The same prompt cut by hand to its last 40 tokens gives the same answer.
    ids = encode_prompt(tokenizer, long_question["turns"][0], kind)
    kept = ([tokenizer.eos_id] + ids[-39:]) if kind == "arm" else ids[-40:]
    assert len(kept) == 40
    (row,) = generate(model, [kept], replace(config, cfg=0.0), eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                      row_seeds=[config.seed])
    assert record["choices"][0]["turns"] == [tokenizer.decode(row).strip()]


class _MockJudge(BaseHTTPRequestHandler):
    """Replies from a script of (status, body, headers); records each request."""

    script: list = []
    requests: list = []

    def do_POST(self):  # noqa: N802 (http.server naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        status, reply, headers = type(self).script.pop(0) if type(self).script else (200, _chat("[[5]]"), {})
        data = reply.encode() if isinstance(reply, str) else json.dumps(reply).encode()
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def _chat(text):
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


@pytest.fixture
def judge_server():
    _MockJudge.script = []
    _MockJudge.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _MockJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _client(url, sleeps, **options):
    return JudgeClient(base_url=url, model="judge-model", api_key="sk-secret-123", sleep=sleeps.append, **options)


def test_judge_retries_then_succeeds(judge_server, caplog):
    _MockJudge.script = [(503, "busy", {}), (429, "slow down", {"Retry-After": "3"}), (200, _chat("Rating: [[8]]"), {})]
    sleeps = []
    with caplog.at_level(logging.DEBUG):
        reply = _client(judge_server, sleeps, backoff_s=0.5).complete("system", "grade this")
    assert reply == "Rating: [[8]]"
    assert sleeps == [0.5, 3.0]  # exponential backoff, then the server's Retry-After
    assert len(_MockJudge.requests) == 3
    request = _MockJudge.requests[-1]
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == "Bearer sk-secret-123"
    assert request["body"]["model"] == "judge-model"
    assert request["body"]["messages"] == [{"role": "system", "content": "system"},
                                           {"role": "user", "content": "grade this"}]
    assert "retry 1 of 4" in caplog.text
    assert "sk-secret-123" not in caplog.text


def test_judge_errors(judge_server):
    sleeps = []
    client = _client(judge_server, sleeps, max_retries=2, backoff_s=0.1)
    assert "sk-secret" not in repr(client)
    _MockJudge.script = [(401, "bad key", {})]
    with pytest.raises(JudgeError, match="HTTP 401.*check SMDM_JUDGE_API_KEY"):
        client.complete("", "x")
    assert sleeps == []  # no retry on an authentication error
    _MockJudge.script = [(500, "down", {})] * 3
    with pytest.raises(JudgeError, match="HTTP 500: down"):
        client.complete("", "x")
    assert sleeps == [0.1, 0.2]
    _MockJudge.script = [(200, "not json", {})]
    with pytest.raises(JudgeError, match="not JSON"):
        client.complete("", "x")
    _MockJudge.script = [(200, {"error": "odd"}, {})]
    with pytest.raises(JudgeError, match="no choices"):
        client.complete("", "x")


def test_judge_unreachable_server():
    sleeps = []
    client = JudgeClient(base_url="http://127.0.0.1:9", model="m", sleep=sleeps.append, max_retries=1, timeout_s=2)
    with pytest.raises(JudgeError, match="after 2 attempts"):
        client.complete("", "x")
    assert len(sleeps) == 1


def test_judge_environment_configuration():
    with pytest.raises(ValueError, match="SMDM_JUDGE_BASE_URL and SMDM_JUDGE_MODEL"):
        JudgeClient.from_environment({})
    client = JudgeClient.from_environment({"SMDM_JUDGE_BASE_URL": "http://127.0.0.1:1/v1", "SMDM_JUDGE_MODEL": "m",
                                           "OPENAI_API_KEY": "k"})
    assert client.api_key == "k"
    assert client.url == "http://127.0.0.1:1/v1/chat/completions"


def test_parse_rating_formats():
    assert parse_rating("good. Rating: [[7.5]]") == 7.5
    assert parse_rating("Rating: [6]") == 6.0
    assert parse_rating("no rating here") == -1.0


def test_judge_cli_aggregates_by_category(judge_server, tmp_path, monkeypatch):
    questions = read_jsonl(shared_path("mt_bench/question.jsonl"))
    chosen = [q for q in questions if q["question_id"] in (81, 82, 111, 112)]  # two writing, two math
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": q["question_id"], "answer_id": "a", "model_id": "m",
                                           "choices": [{"index": 0, "turns": [f"answer {q['question_id']}"]}],
                                           "tstamp": 0.0}) + "\n" for q in chosen))
    question_file = tmp_path / "questions.jsonl"
    question_file.write_text("".join(json.dumps(q) + "\n" for q in chosen))
    _MockJudge.script = [(200, _chat("[[4]]"), {}), (200, _chat("[[8]]"), {}), (200, _chat("[[2]]"), {}),
                         (200, _chat("I cannot rate"), {})]
    monkeypatch.setenv("SMDM_JUDGE_BASE_URL", judge_server)
    monkeypatch.setenv("SMDM_JUDGE_MODEL", "judge-model")
    monkeypatch.setenv("SMDM_JUDGE_API_KEY", "sk-secret-123")
    code = main(["task", "mt-bench-judge", "--answers", str(answers), "--questions", str(question_file),
                 "--judge-prompts", str(shared_path("mt_bench/judge_prompts.jsonl")),
                 "--references", str(shared_path("mt_bench/reference_answer_gpt-4.jsonl")), "--out", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "mt_bench.json").read_text())
    assert results["categories"]["writing"] == {"mean": 6.0, "n": 2, "unparsed": 0}
    assert results["categories"]["math"] == {"mean": 2.0, "n": 1, "unparsed": 1}
    assert results["overall"] == pytest.approx(14 / 3)
    # Math questions are graded against the reference answer.
    math_prompt = _MockJudge.requests[2]["body"]["messages"][1]["content"]
    assert "[The Start of Reference Answer]" in math_prompt
    assert "sk-secret-123" not in (tmp_path / "mt_bench.json").read_text()
    assert "sk-secret-123" not in (tmp_path / "judgments.jsonl").read_text()


def test_judge_answers_rejects_unknown_question():
    prompts = read_judge_prompts(shared_path("mt_bench/judge_prompts.jsonl"))
    answer = {"question_id": 999, "model_id": "m", "choices": [{"index": 0, "turns": ["x"]}]}
    with pytest.raises(ValueError, match="question_id 999"):
        judge_answers(JudgeClient("http://127.0.0.1:9", "m"), [], [answer], prompts)


def test_aggregate_scores_without_ratings():
    summary = aggregate_scores([{"category": "stem", "score": -1.0}])
    assert summary["overall"] is None
    assert summary["categories"]["stem"] == {"mean": None, "n": 0, "unparsed": 1}


def test_gsm8k_data_cli_writes_two_rows(tmp_path):
    source = shared_path("gsm8k/openai/train.jsonl")
    out = tmp_path / "rows.jsonl"
    assert main(["task", "gsm8k-data", "--input", str(source), "--out", str(out), "--limit", "3"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = [row for problem in read_problems(source, limit=3) for row in two_rows(problem)]
    assert len(rows) == 6
    assert [PromptResponse(row["prompt"], row["response"]) for row in rows] == expected


def test_temporal_cli_writes_table_and_plot(tmp_path):
    from smdm.checkpoint import save_checkpoint

    records = [{"year": year, "text": f"In {year} the union is strong and the state is sound. " * 6}
               for year in (1801, 1825, 1990)]
    (tmp_path / "sotu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    model, tokenizer = _tiny_with_tokenizer("mdm", [r["text"] for r in records], block_size=32)
    arm = tiny_model("arm", vocab_size=tokenizer.vocab_size, block_size=32)
    save_checkpoint(tmp_path / "a" / "run", model, tokenizer)
    save_checkpoint(tmp_path / "b" / "run", arm, tokenizer)
    code = main(["task", "temporal", "--checkpoint", str(tmp_path / "a" / "run"), "--checkpoint",
                 str(tmp_path / "b" / "run"), "--data", str(tmp_path), "--source", "sotu", "--period-years", "50",
                 "--seq-len", "16", "--max-windows", "2", "--mc-samples", "2", "--out", str(tmp_path / "out"),
                 "--device", DEVICE])
    assert code == 0
    results = json.loads((tmp_path / "out" / "temporal.json").read_text())
    models = results["sources"]["sotu"]
    assert sorted(models) == ["run", "run-2"]  # same folder name, kept apart
    assert [models[name]["kind"] for name in ("run", "run-2")] == ["mdm", "arm"]
    assert [row["period"] for row in models["run"]["periods"]] == [1800, 1950]
    assert (tmp_path / "out" / "temporal.png").read_bytes()[:4] == b"\x89PNG"
    assert "| run-2 | arm | 1950 |" in (tmp_path / "out" / "temporal.md").read_text()
