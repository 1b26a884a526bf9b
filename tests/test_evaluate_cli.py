"""`smdm evaluate` in its task and text modes, on checkpoints written by the test."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_model

pytest.importorskip("lm_eval")

from smdm.checkpoint import save_checkpoint  # noqa: E402
from smdm.cli import main  # noqa: E402
from smdm.data.tokenizer import train_bpe  # noqa: E402
from smdm.evaluate.likelihood import mdm_mc_loglikelihood  # noqa: E402

TEXT = "\n".join(f"Line {i}: the red bike goes to school and the cake is sweet." for i in range(30))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    tokenizer = train_bpe([TEXT], vocab_size=300)
    paths = {}
    for kind in ("mdm", "arm"):
        model = tiny_model(kind, vocab_size=tokenizer.vocab_size, block_size=64, seed=11)
        paths[kind] = save_checkpoint(folder / kind, model, tokenizer)
    return paths, tokenizer


def test_text_mode_arm_is_exact(tmp_path, checkpoints, capsys):
    paths, tokenizer = checkpoints
    text_file = tmp_path / "corpus.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    assert main(["evaluate", "--checkpoint", str(paths["arm"]), "--text", str(text_file), "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    ids = tokenizer.encode(TEXT)
    assert report["tokens"] == len(ids)
    assert report["bound"] is False
    # Recompute the exact value window by window: EOS then the first 64 tokens, then 64-token windows.
    from smdm.checkpoint import load_model

    model, _, _ = load_model(paths["arm"])
    total, start = 0.0, 0
    while start < len(ids):
        end = min(start + 64, len(ids))
        inputs = ([tokenizer.eos_id] + ids)[max(0, end - 64) : end] if start == 0 else ids[end - 65 : end - 1]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([inputs]))[0].double(), -1)
        targets = torch.tensor(ids[end - len(inputs) : end]) if start == 0 else torch.tensor(ids[end - 64 : end])
        scored = end - start
        total += logp[-scored:].gather(-1, targets[-scored:, None]).sum().item()
        start = end
    assert report["loss"] == pytest.approx(-total / len(ids), rel=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(-total / len(ids)), rel=1e-5)


def test_text_mode_mdm_reports_bound(tmp_path, checkpoints, capsys):
    paths, tokenizer = checkpoints
    text_file = tmp_path / "corpus.txt"
    text_file.write_text(TEXT[:800], encoding="utf-8")
    argv = ["evaluate", "--checkpoint", str(paths["mdm"]), "--text", str(text_file), "--device", "cpu",
            "--mc-samples", "4", "--seed", "3"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bound"] is True
    from smdm.checkpoint import load_model

    model, _, _ = load_model(paths["mdm"])
    ids = tokenizer.encode(TEXT[:800])
    assert len(ids) > 2 * 63
    # lm-eval's rolling windows for a 64-token canvas: 63 new tokens each, the last one with a full canvas.
    windows, start = [], 0
    while start < len(ids):
        end = min(start + 63, len(ids))
        context = [tokenizer.eos_id] if start == 0 else ids[end - 64 : start]
        windows.append((context, ids[start:end]))
        start = end
    assert len(windows[-1][0]) > 1
    expected = sum(mdm_mc_loglikelihood(model, windows, mc_samples=4, seed=3))
    assert report["loss"] == pytest.approx(-expected / len(ids), rel=1e-5)


def test_tasks_mode_writes_results(tmp_path, checkpoints, capsys):
    paths, _ = checkpoints
    race = tmp_path / "race.jsonl"
    record = {"article": "Ann reads at night.", "questions": ["When does Ann read?"],
              "options": [["at noon", "at night", "never", "always"]], "answers": ["B"]}
    race.write_text(json.dumps(record) + "\n", encoding="utf-8")
    out = tmp_path / "results.json"
    argv = ["evaluate", "--checkpoint", str(paths["mdm"]), "--tasks", "race", "--task-file", f"race={race}",
            "--mc-samples", "4", "--cfg", "race:0.5", "--device", "cpu", "--output", str(out)]
    assert main(argv) == 0
    assert "race" in capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["results"]["race"]["acc,none"] in (0.0, 1.0)
    assert results["config"]["model"] == "SmdmLM"


def test_mode_errors(checkpoints, capsys):
    paths, _ = checkpoints
    assert main(["evaluate", "--checkpoint", str(paths["mdm"])]) == 2
    assert "exactly one of --data, --tasks and --text" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(paths["mdm"]), "--tasks", "squad"]) == 2
    assert "unknown tasks" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(paths["mdm"]), "--tasks", "race", "--task-file", "race"]) == 2
    assert "TASK=FILE" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(paths["arm"]), "--tasks", "race", "--cfg", "1.0"]) == 2
    assert "needs an MDM" in capsys.readouterr().err
