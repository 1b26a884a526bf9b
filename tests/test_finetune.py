"""Supervised fine-tuning: row layout, the masked losses, prompt dropout and a short real run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import shared_path, tiny_model

import smdm.finetune
from smdm.checkpoint import load_model
from smdm.data.sft import PromptResponse, build_batch, encode_pairs, read_prompt_response
from smdm.data.tokenizer import train_bpe
from smdm.finetune import (
    FinetuneConfig,
    batch_indices,
    draw_sft_noise,
    finetune,
    sft_arm_loss,
    sft_mdm_loss,
)

EOS = 0
DEVICE = "cpu"


def _capture_inputs(model):
    """Record every token tensor the model is called with."""
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    return seen


def test_mdm_rows_match_hand_layout():
    batch = build_batch([[5, 6], [7]], [[8, 9, 10], [11]], 8, EOS, "mdm")
    assert batch.tokens.tolist() == [[5, 6, 8, 9, 10, 0, 0, 0], [7, 11, 0, 0, 0, 0, 0, 0]]
    assert batch.prompt.int().tolist() == [[1, 1, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]
    assert batch.response.int().tolist() == [[0, 0, 1, 1, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0]]
    assert batch.padding.int().tolist() == [[0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]]


def test_arm_rows_start_with_eos():
    batch = build_batch([[5, 6]], [[8]], 5, EOS, "arm")
    assert batch.tokens.tolist() == [[0, 5, 6, 8, 0, 0]]
    assert batch.prompt.int().tolist() == [[1, 1, 1, 0, 0, 0]]
    assert batch.response.int().tolist() == [[0, 0, 0, 1, 1, 0]]
    assert batch.padding.int().tolist() == [[0, 0, 0, 0, 0, 1]]


def _reference_mdm_loss(model, noisy, tokens, positions, p):
    """Sum of CE / p at the given (row, column) positions, from full logits."""
    logits = model(noisy).float()
    total = 0.0
    for row, column in positions:
        total += F.cross_entropy(logits[row, column][None], tokens[row, column][None]).item() / p[row]
    return total


@pytest.mark.parametrize("score_padding", [True, False])
def test_mdm_loss_scores_exactly_the_response(score_padding):
    model = tiny_model("mdm", vocab_size=31, block_size=16)
    mask_id = model.config.mask_id
    batch = build_batch([[5, 6, 7], [9]], [[8, 3], [4, 4, 12]], 8, EOS, "mdm")
    t = torch.tensor([0.999, 0.999])
    noise = torch.zeros(2, 8)  # every noisable position is masked
    seen = _capture_inputs(model)
    loss = sft_mdm_loss(model, batch, t, noise, torch.zeros(2, dtype=torch.bool), eps=1e-3,
                        score_padding=score_padding, train_on_prompt=False)

    noisy = seen[0]
    assert noisy[0, :3].tolist() == [5, 6, 7]  # prompt never masked
    assert noisy[1, :1].tolist() == [9]
    assert (noisy[0, 3:] == mask_id).all()  # response, its EOS and the padding are masked
    assert (noisy[1, 1:] == mask_id).all()

    response = [(0, 3), (0, 4), (0, 5), (1, 1), (1, 2), (1, 3), (1, 4)]
    padding = [(0, 6), (0, 7), (1, 5), (1, 6), (1, 7)]
    scored = response + (padding if score_padding else [])
    p = [(1 - 1e-3) * 0.999 + 1e-3] * 2
    expected = _reference_mdm_loss(model, noisy, batch.tokens, scored, p) / len(scored)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_mdm_loss_scores_only_masked_tokens():
    model = tiny_model("mdm", vocab_size=31, block_size=16)
    batch = build_batch([[5, 6]], [[8, 3, 2, 7]], 8, EOS, "mdm")
    noise = torch.tensor([[0.0, 0.0, 0.9, 0.1, 0.9, 0.1, 0.9, 0.9]])
    t = torch.tensor([0.5])
    seen = _capture_inputs(model)
    loss = sft_mdm_loss(model, batch, t, noise, torch.zeros(1, dtype=torch.bool), eps=0.0,
                        score_padding=False, train_on_prompt=False)
    noisy = seen[0]
    mask_id = model.config.mask_id
    assert noisy[0].tolist() == [5, 6, 8, mask_id, 2, mask_id, 0, 0]
    expected = _reference_mdm_loss(model, noisy, batch.tokens, [(0, 3), (0, 5)], [0.5]) / 5  # 4 tokens + EOS
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_train_on_prompt_noises_prompt():
    model = tiny_model("mdm", vocab_size=31, block_size=16)
    batch = build_batch([[5, 6]], [[8]], 4, EOS, "mdm")
    seen = _capture_inputs(model)
    sft_mdm_loss(model, batch, torch.tensor([0.9]), torch.zeros(1, 4), torch.zeros(1, dtype=torch.bool), eps=1e-3,
                 score_padding=True, train_on_prompt=True)
    assert (seen[0] == model.config.mask_id).all()


def test_prompt_dropout_replaces_whole_prompt():
    model = tiny_model("mdm", vocab_size=31, block_size=16)
    batch = build_batch([[5, 6, 7], [5, 6, 7]], [[8], [8]], 6, EOS, "mdm")
    seen = _capture_inputs(model)
    sft_mdm_loss(model, batch, torch.tensor([0.5, 0.5]), torch.ones(2, 6), torch.tensor([True, False]),
                 eps=1e-3, score_padding=True, train_on_prompt=False)
    mask_id = model.config.mask_id
    assert seen[0][0, :3].tolist() == [mask_id] * 3
    assert seen[0][1, :3].tolist() == [5, 6, 7]
    assert seen[0][:, 3:].tolist() == [[8, 0, 0], [8, 0, 0]]  # noise of 1 masks nothing else


@pytest.mark.parametrize("probability", [0.0, 0.1, 0.5])
def test_prompt_dropout_rate_matches_probability(probability):
    rows, steps = 64, 60
    drops = torch.cat([draw_sft_noise(0, step, rows, 8, probability)[2] for step in range(steps)])
    n = rows * steps
    rate = drops.float().mean().item()
    # Four binomial standard errors: a correct sampler fails this about once in 15,000 runs.
    tolerance = 4 * math.sqrt(probability * (1 - probability) / n)
    assert abs(rate - probability) <= tolerance


def test_arm_loss_scores_only_response_targets():
    model = tiny_model("arm", vocab_size=31, block_size=16)
    batch = build_batch([[5, 6]], [[8, 3]], 6, EOS, "arm")  # EOS 5 6 8 3 EOS pad
    for score_padding, targets in ((False, [3, 4, 5]), (True, [3, 4, 5, 6])):
        loss = sft_arm_loss(model, batch, score_padding=score_padding, train_on_prompt=False)
        logits = model(batch.tokens[:, :-1]).float()
        expected = sum(
            F.cross_entropy(logits[0, i - 1][None], batch.tokens[0, i][None]).item() for i in targets
        ) / len(targets)
        assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_batch_indices_cover_each_epoch():
    seen = [i for step in range(5) for i in batch_indices(10, 4, step, seed=3)]
    assert sorted(seen[:10]) == list(range(10))
    assert sorted(seen[10:20]) == list(range(10))


def test_encode_pairs_skips_long_rows():
    tokenizer = train_bpe(["alpha beta gamma delta"] * 20, 300)
    pairs = [PromptResponse("alpha", "beta"), PromptResponse("alpha " * 30, "beta")]
    encoded = encode_pairs(tokenizer, pairs, 16, "mdm")
    assert encoded.skipped == 1
    assert len(encoded.prompts) == 1


def test_read_pairs_fields_and_chat(tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"q": "hi", "a": "hello"}) + "\n", encoding="utf-8")
    assert read_prompt_response(plain, prompt_field="q", response_field="a") == [PromptResponse("hi", "hello")]
    with pytest.raises(ValueError, match="no field 'prompt'"):
        read_prompt_response(plain)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": "2+2?"},
                                             {"role": "assistant", "content": "4"}]}) + "\n"
                    + json.dumps({"conversations": [{"from": "human", "value": "hey"},
                                                    {"from": "gpt", "value": "hello"}]}) + "\n", encoding="utf-8")
    assert read_prompt_response(chat, chat=True) == [PromptResponse("2+2?", "4"), PromptResponse("hey", "hello")]


@pytest.mark.parametrize("kind", ["mdm", "arm"])
def test_finetune_real_pairs_and_reload(tmp_path, kind):
    path = shared_path("chat_sft/dolly15k_prompt_response.jsonl")
    pairs = read_prompt_response(path, limit=40)
    tokenizer = train_bpe((text for pair in pairs for text in (pair.prompt, pair.response)), 400)
    model = tiny_model(kind, vocab_size=tokenizer.vocab_size, block_size=128).to(DEVICE).train()
    config = FinetuneConfig(seq_len=128, batch_size=4, steps=12, lr=3e-3, precision="fp32", log_interval=4,
                            prompt_dropout=0.1 if kind == "mdm" else 0.0)
    result = finetune(model, tokenizer, pairs, tmp_path / "run", config, base="test")
    assert result.examples + result.skipped == 40
    assert result.examples >= 10
    assert sum(result.losses[-4:]) < sum(result.losses[:4])
    reloaded, reloaded_tokenizer, checkpoint = load_model(tmp_path / "run", DEVICE)
    assert checkpoint.train_config["seq_len"] == 128
    assert checkpoint.trainer_state["step"] == 12
    assert reloaded_tokenizer.identity == tokenizer.identity
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_finetune_resume_matches_uninterrupted(tmp_path, monkeypatch):
    pairs = read_prompt_response(shared_path("chat_sft/dolly15k_prompt_response.jsonl"), limit=40)
    tokenizer = train_bpe((text for pair in pairs for text in (pair.prompt, pair.response)), 400)
    config = FinetuneConfig(seq_len=128, batch_size=4, steps=8, lr=3e-3, precision="fp32", log_interval=1,
                            checkpoint_interval=3, prompt_dropout=0.1)
    straight = finetune(tiny_model("mdm", vocab_size=tokenizer.vocab_size, block_size=128), tokenizer, pairs,
                        tmp_path / "straight", config)

    # Interrupt the run at step 4, after its step-3 checkpoint, then resume it to the end.
    original_indices = smdm.finetune.batch_indices

    def interrupted_indices(n, batch_size, step, seed):
        if step == 4:
            raise KeyboardInterrupt
        return original_indices(n, batch_size, step, seed)

    monkeypatch.setattr(smdm.finetune, "batch_indices", interrupted_indices)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_model("mdm", vocab_size=tokenizer.vocab_size, block_size=128), tokenizer, pairs,
                 tmp_path / "resumed", config)
    monkeypatch.setattr(smdm.finetune, "batch_indices", original_indices)
    model = tiny_model("mdm", vocab_size=tokenizer.vocab_size, block_size=128)
    with pytest.raises(FileExistsError, match="pass --resume"):
        finetune(model, tokenizer, pairs, tmp_path / "resumed", config)
    resumed = finetune(model, tokenizer, pairs, tmp_path / "resumed", config, resume=True)

    assert resumed.losses == straight.losses[3:]
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 9))
    final_straight = load_model(tmp_path / "straight")[0].state_dict()
    final_resumed = load_model(tmp_path / "resumed")[0].state_dict()
    for name, tensor in final_straight.items():
        assert torch.equal(final_resumed[name], tensor), name


def test_finetune_rejects_arm_prompt_dropout(tmp_path):
    tokenizer = train_bpe(["alpha beta"] * 10, 300)
    model = tiny_model("arm", vocab_size=tokenizer.vocab_size)
    with pytest.raises(ValueError, match="needs an MDM"):
        finetune(model, tokenizer, [PromptResponse("alpha", "beta")], tmp_path, FinetuneConfig(prompt_dropout=0.1,
                                                                                              seq_len=16))


def test_finetune_cli_from_scratch(tmp_path):
    from smdm.cli import main

    data = shared_path("reversal_curse/reverse_experiments/june_version_7921032488/p2d_prompts_train.jsonl")
    code = main(["finetune", "--data", str(data), "--response-field", "completion", "--train-on-prompt",
                 "--out", str(tmp_path / "run"), "--kind", "mdm", "--model", "tiny-0.1M", "--vocab-size", "300",
                 "--limit", "16", "--seq-len", "96", "--batch-size", "4", "--steps", "2", "--device", DEVICE,
                 "--prompt-template", "Q: {prompt}\\nA:"])
    assert code == 0
    model, tokenizer, checkpoint = load_model(tmp_path / "run", DEVICE)
    assert model.config.kind == "mdm"
    assert tokenizer.vocab_size == 300
    assert checkpoint.train_config["finetune"]["train_on_prompt"] is True
    assert checkpoint.train_config["base"] == "scratch:tiny-0.1M"
    # The two characters \n in the flag value become a newline.
    assert checkpoint.train_config["finetune"]["prompt_template"] == "Q: {prompt}\nA:"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2


def test_finetune_cli_missing_field(tmp_path, capsys):
    from smdm.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n", encoding="utf-8")
    assert main(["finetune", "--data", str(data), "--out", str(tmp_path / "run"), "--device", DEVICE]) == 2
    assert "no field 'prompt'" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["mdm", "arm"])
def test_accumulation_matches_one_forward_pass(tmp_path, kind):
    pairs = read_prompt_response(shared_path("chat_sft/dolly15k_prompt_response.jsonl"), limit=40)
    tokenizer = train_bpe((text for pair in pairs for text in (pair.prompt, pair.response)), 400)
    options = {"seq_len": 128, "batch_size": 6, "steps": 3, "lr": 3e-3, "precision": "fp32", "log_interval": 1,
               "prompt_dropout": 0.3 if kind == "mdm" else 0.0}
    runs = {}
    for micro in (0, 2):
        torch.manual_seed(0)
        model = tiny_model(kind, vocab_size=tokenizer.vocab_size, block_size=128)
        runs[micro] = finetune(model, tokenizer, pairs, tmp_path / f"micro{micro}",
                               FinetuneConfig(micro_batch=micro, **options))
    # Three micro-batches of 2 rows share the batch's denominator, so their losses add up to the batch's.
    for one, accumulated in zip(runs[0].losses, runs[2].losses):
        assert math.isclose(one, accumulated, rel_tol=1e-5), (one, accumulated)
    rows = {micro: [json.loads(line) for line in (tmp_path / f"micro{micro}" / "metrics.jsonl").read_text().splitlines()]
            for micro in runs}
    for one, accumulated in zip(rows[0], rows[2]):
        assert math.isclose(one["grad_norm"], accumulated["grad_norm"], rel_tol=1e-4)
    weights = {micro: load_model(tmp_path / f"micro{micro}")[0].state_dict() for micro in runs}
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[2][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_micro_batch_must_divide_batch(tmp_path):
    tokenizer = train_bpe(["alpha beta gamma"] * 10, 300)
    model = tiny_model("mdm", vocab_size=tokenizer.vocab_size)
    config = FinetuneConfig(seq_len=16, batch_size=6, micro_batch=4)
    with pytest.raises(ValueError, match="not a multiple of --micro-batch 4"):
        finetune(model, tokenizer, [PromptResponse("alpha", "beta")], tmp_path, config)


def test_signal_saves_checkpoint_then_stops(tmp_path, monkeypatch):
    import os
    import signal

    pairs = read_prompt_response(shared_path("chat_sft/dolly15k_prompt_response.jsonl"), limit=40)
    tokenizer = train_bpe((text for pair in pairs for text in (pair.prompt, pair.response)), 400)
    config = FinetuneConfig(seq_len=128, batch_size=4, steps=6, lr=3e-3, precision="fp32", log_interval=1,
                            checkpoint_interval=0)
    straight = finetune(tiny_model("mdm", vocab_size=tokenizer.vocab_size, block_size=128), tokenizer, pairs,
                        tmp_path / "straight", config)

    # SIGTERM arrives while step 3 (index 2) builds its batch: the step finishes, is saved, and the run stops.
    original_indices = smdm.finetune.batch_indices

    def signalled_indices(n, batch_size, step, seed):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original_indices(n, batch_size, step, seed)

    monkeypatch.setattr(smdm.finetune, "batch_indices", signalled_indices)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_model("mdm", vocab_size=tokenizer.vocab_size, block_size=128), tokenizer, pairs,
                 tmp_path / "stopped", config)
    assert (tmp_path / "stopped" / "checkpoints" / "latest").read_text() == "step-0000003"
    monkeypatch.setattr(smdm.finetune, "batch_indices", original_indices)
    resumed = finetune(tiny_model("mdm", vocab_size=tokenizer.vocab_size, block_size=128), tokenizer, pairs,
                       tmp_path / "stopped", config, resume=True)
    assert resumed.losses == straight.losses[3:]


def test_prompt_template_wraps_prompts_and_is_saved(tmp_path, monkeypatch):
    pairs = [PromptResponse("2+2?", "4"), PromptResponse("Name a {colour}.", "Red")]
    tokenizer = train_bpe(["User: 2+2?\nAssistant: 4", "Name a {colour}. Red"] * 10, 300)
    seen = []
    original = smdm.finetune.encode_pairs
    monkeypatch.setattr(smdm.finetune, "encode_pairs", lambda tok, given, *rest: seen.extend(given) or original(tok, given, *rest))
    config = FinetuneConfig(seq_len=32, batch_size=2, steps=1, precision="fp32",
                            prompt_template="User: {prompt}\nAssistant:")
    finetune(tiny_model("mdm", vocab_size=tokenizer.vocab_size, block_size=32), tokenizer, pairs, tmp_path, config)
    assert [pair.prompt for pair in seen] == ["User: 2+2?\nAssistant:", "User: Name a {colour}.\nAssistant:"]
    assert [pair.response for pair in seen] == ["4", "Red"]
    _, _, checkpoint = load_model(tmp_path)
    assert checkpoint.train_config["finetune"]["prompt_template"] == "User: {prompt}\nAssistant:"


@pytest.mark.parametrize("template", ["User: prompt", "{prompt} {prompt}"])
def test_prompt_template_needs_one_slot(template):
    with pytest.raises(ValueError, match="must contain {prompt} exactly once"):
        FinetuneConfig(prompt_template=template)
