"""Sampling outputs and the command line end to end."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model
from smdm.cli import main
from smdm.generate import SampleConfig, arm_sample, generate, mdm_sample


@pytest.mark.parametrize("sampler", ["random", "low_confidence"])
def test_mdm_sample_keeps_prompt_and_has_no_mask(sampler):
    model = tiny_model("mdm")
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    new = mdm_sample(model, prompt, SampleConfig(max_new_tokens=12, steps=6, sampler=sampler))
    assert new.shape == (2, 12)
    assert (new != model.config.mask_id).all()
    assert (new < model.config.vocab_size).all()


def test_low_confidence_reveals_follow_schedule():
    model = tiny_model("mdm")
    counts = []
    original_forward = model.forward

    def counting_forward(idx, **kwargs):
        counts.append(int((idx == model.config.mask_id).sum()))
        return original_forward(idx, **kwargs)

    model.forward = counting_forward
    mdm_sample(model, torch.zeros(1, 0, dtype=torch.long), SampleConfig(max_new_tokens=16, steps=4, sampler="low_confidence"))
    assert counts == [16, 12, 8, 4]  # masked count follows G * s / t on the grid 1, 3/4, 1/2, 1/4


def test_arm_greedy_cached_equals_uncached():
    model = tiny_model("arm")
    prompt = torch.randint(0, 97, (3, 4), generator=torch.Generator().manual_seed(5))
    cached = arm_sample(model, prompt, SampleConfig(max_new_tokens=20, temperature=0.0, stop_at_eos=False))
    sequence = prompt.clone()
    with torch.no_grad():
        for _ in range(20):
            next_token = model(sequence)[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(cached, sequence[:, 4:])


def test_arm_stops_rows_at_eos():
    model = tiny_model("arm")
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[7] = 1.0  # token 7 always wins
    rows = generate(model, torch.ones(2, 3, dtype=torch.long), SampleConfig(max_new_tokens=10, temperature=0.0), eos_id=7)
    assert rows == [[], []]


def test_quickstart_reduced(tmp_path, capsys):
    code = main(["quickstart", "--out", str(tmp_path / "qs"), "--model", "tiny-0.1M", "--max-steps", "6",
                 "--device", "cpu"])
    assert code == 0
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    for kind in ("mdm", "arm"):
        run = summary["runs"][kind]
        assert run["steps"] == 6
        assert 0 < run["val_loss"] < 10
        assert len(run["samples"]) == 2
        assert all(sample.startswith("HAMLET:\n") for sample in run["samples"])
        assert (tmp_path / "qs" / kind / "checkpoints" / "latest").is_file()
    assert summary["runs"]["mdm"]["val_loss_is_bound"] is True
    assert summary["runs"]["arm"]["val_loss_is_bound"] is False
    # Same windows per step: the ARM reads seq_len + 1 tokens and predicts seq_len of them, as the MDM scores seq_len.
    assert summary["runs"]["arm"]["tokens"] == 6 * 32 * 128
    printed = capsys.readouterr().out
    assert "upper bound on NLL" in printed
    assert "exact NLL" in printed


def test_cli_prepare_train_sample_evaluate(tmp_path, capsys, shared_data):
    corpus = shared_data("tinyshakespeare/input.txt")
    assert main(["prepare", "--corpus", str(corpus), "--out", str(tmp_path / "data"), "--vocab-size", "300"]) == 0
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--model", "tiny-0.1M",
                 "--seq-len", "32", "--global-batch", "8", "--max-steps", "3", "--eval-batches", "1",
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--prompt", "KING:", "--max-new-tokens", "8",
                 "--steps", "4", "--device", "cpu"]) == 0
    assert "KING:" in capsys.readouterr().out
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "data"),
                 "--max-sequences", "4", "--mc-samples", "2", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bound"] is True
    assert result["seq_len"] == 32
    assert result["sequences"] == 4
