"""Samplers: batch invariance, per-row schedules, caches, infilling, guidance, stops and Gumbel-max."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from conftest import tiny_model
from smdm.generate import (
    SampleConfig,
    _Denoiser,
    arm_sample,
    build_canvas,
    generate,
    gumbel_max,
    mdm_sample,
    reveal_counts,
)
from smdm.guidance import cfg_logits

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
# CUDA runs the same checks where a GPU exists; the CPU is always tested.
DEVICES = [
    pytest.param("cpu"),
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
]


def sharp_model(kind: str, seed: int = 0, eos_id: int | None = None, eos_bias: float = 0.0, device: str = "cpu"):
    """A tiny model with weights scaled up, so its predictions depend on the context instead of being flat."""
    model = tiny_model(kind, seed=seed).to(device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.mul_(4.0)
        if eos_id is not None:
            # Point the EOS output row along the mean final hidden state, so EOS wins almost everywhere.
            ids = torch.arange(model.config.vocab_size, device=device)[None, :64]
            direction = model(ids, return_hidden=True).mean(dim=(0, 1))
            model.lm_head.weight[eos_id] = eos_bias * direction / direction.norm()
    return model


@pytest.fixture(scope="module", params=DEVICES)
def mdm(request):
    return sharp_model("mdm", device=request.param)


@pytest.fixture(scope="module", params=DEVICES)
def arm(request):
    return sharp_model("arm", seed=1, device=request.param)


def alone_and_batched(model, config, **kwargs):
    batched = generate(model, PROMPTS, config, row_seeds=[0, 1, 2], **kwargs)
    alone = [generate(model, [p], config, row_seeds=[i], **kwargs)[0] for i, p in enumerate(PROMPTS)]
    return alone, batched


@pytest.mark.parametrize("sampler", ["random", "low_confidence", "threshold"])
@pytest.mark.parametrize("cfg", [0.0, 1.5])
def test_mdm_batch_invariance_greedy(mdm, sampler, cfg):
    config = SampleConfig(max_new_tokens=8, steps=8, temperature=0, sampler=sampler, cfg=cfg, threshold=0.5)
    alone, batched = alone_and_batched(mdm, config)
    assert batched == alone
    assert all(len(row) == 8 for row in batched)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_mdm_batch_invariance_blocks_cached(mdm, cache):
    config = SampleConfig(max_new_tokens=8, steps=8, temperature=0, sampler="low_confidence", block_length=4,
                          cache=cache, cfg=1.0)
    alone, batched = alone_and_batched(mdm, config)
    assert batched == alone


def test_mdm_batch_invariance_sampled(mdm):
    config = SampleConfig(max_new_tokens=8, steps=4, temperature=1.0, sampler="random", block_length=4)
    alone, batched = alone_and_batched(mdm, config)
    assert batched == alone


def test_mdm_batch_rows_differ(mdm):
    config = SampleConfig(max_new_tokens=8, steps=8, temperature=0, sampler="low_confidence")
    rows = generate(mdm, PROMPTS, config)
    assert len({tuple(r) for r in rows}) > 1


def test_reveal_counts_follow_linear_schedule():
    M, steps = torch.tensor([10, 7, 1]), 4
    masked, revealed = M.clone(), []
    for step in range(steps):
        counts = reveal_counts(M, masked, step, steps)
        masked = masked - counts
        revealed.append(counts.tolist())
        # At most floor(M s) may stay masked at time s = 1 - (step + 1) / steps.
        s = 1 - (step + 1) / steps
        assert masked.tolist() == [int(m * s + 1e-9) for m in M.tolist()]
    assert [sum(col) for col in zip(*revealed)] == M.tolist()
    assert revealed[0] == [3, 2, 1]  # 10 -> floor(7.5) = 7, 7 -> floor(5.25) = 5, 1 -> floor(0.75) = 0


def test_low_confidence_trace_matches_schedule(mdm):
    G, steps = 8, 3
    config = SampleConfig(max_new_tokens=G, steps=steps, temperature=0, sampler="low_confidence")
    trace: list[torch.Tensor] = []
    mdm_sample(mdm, PROMPTS, config, trace=trace)
    expected = [G * (steps - j) // steps - G * (steps - j - 1) // steps for j in range(steps)]
    assert torch.stack(trace).T.tolist() == [expected] * len(PROMPTS)


def test_threshold_budgets_are_per_row(mdm):
    config = SampleConfig(max_new_tokens=8, steps=8, temperature=0, sampler="threshold", threshold=0.3)
    batch_trace: list[torch.Tensor] = []
    mdm_sample(mdm, PROMPTS, config, row_seeds=[0, 1, 2], trace=batch_trace)
    per_row = torch.stack(batch_trace).T  # (B, steps run by the batch)
    for i, prompt in enumerate(PROMPTS):
        alone_trace: list[torch.Tensor] = []
        mdm_sample(mdm, [prompt], config, row_seeds=[i], trace=alone_trace)
        alone = torch.cat(alone_trace).tolist()
        assert per_row[i, : len(alone)].tolist() == alone
        assert per_row[i, len(alone) :].sum().item() == 0  # a finished row reveals nothing more
        assert sum(alone) == 8
        assert min(alone) >= 1
    assert len({tuple(r.tolist()) for r in per_row}) > 1  # rows really run different schedules


def test_random_remasking_reveals_everything(mdm):
    config = SampleConfig(max_new_tokens=12, steps=5, temperature=1.0, sampler="random", seed=3)
    trace: list[torch.Tensor] = []
    new = mdm_sample(mdm, PROMPTS, config, trace=trace)
    assert torch.stack(trace).sum(dim=0).tolist() == [12, 12, 12]
    assert not (new == mdm.config.mask_id).any()


def test_infilling_keeps_prefix_and_suffix(mdm):
    prefixes, suffixes = [[3, 4, 5, 6], [7]], [[20, 21], [22, 23, 24]]
    config = SampleConfig(max_new_tokens=6, steps=6, temperature=1.0, sampler="low_confidence", cfg=0.5)
    canvas = mdm_sample(mdm, prefixes, config, pad_id=1, suffixes=suffixes, return_canvas=True)
    P = 4
    for i, (prefix, suffix) in enumerate(zip(prefixes, suffixes)):
        assert canvas[i, P - len(prefix) : P].tolist() == prefix
        assert canvas[i, P + 6 : P + 6 + len(suffix)].tolist() == suffix
    assert not (canvas == mdm.config.mask_id).any()


def test_infilling_reads_the_suffix(mdm):
    config = SampleConfig(max_new_tokens=6, steps=6, temperature=0, sampler="low_confidence")
    one = mdm_sample(mdm, [[3, 4]], config, suffixes=[[20, 21, 22]])
    other = mdm_sample(mdm, [[3, 4]], config, suffixes=[[60, 61, 62]])
    assert not torch.equal(one, other)


def test_guidance_combines_both_passes(mdm):
    config = SampleConfig(max_new_tokens=4, steps=4, cfg=0.8)
    canvas = build_canvas([[5, 6, 7]], 4, mdm.config.mask_id, 0, mdm.lm_head.weight.device)
    denoise = _Denoiser(mdm, canvas, config)
    hidden = denoise(canvas.tokens, 3, 7, first=True)
    logits = denoise.logits_at(hidden, torch.ones(1, 4, dtype=torch.bool, device=hidden.device)).view(1, 4, -1)
    unconditional_canvas = canvas.tokens.clone()
    unconditional_canvas[:, :3] = mdm.config.mask_id
    with torch.no_grad():
        conditional = mdm(canvas.tokens)[:, 3:]
        unconditional = mdm(unconditional_canvas)[:, 3:]
    expected = unconditional + 1.8 * (conditional - unconditional)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cfg_logits(conditional, unconditional, 0.0), conditional)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_arm_cache_matches_uncached(arm, temperature):
    cached = generate(arm, PROMPTS, SampleConfig(max_new_tokens=10, temperature=temperature, cache="auto"))
    uncached = generate(arm, PROMPTS, SampleConfig(max_new_tokens=10, temperature=temperature, cache="none"))
    assert cached == uncached
    assert all(len(row) == 10 for row in cached)


def test_arm_batch_invariance_greedy(arm):
    alone, batched = alone_and_batched(arm, SampleConfig(max_new_tokens=10, temperature=0))
    assert batched == alone


def test_arm_uncached_matches_full_forward(arm):
    """Greedy decoding step by step with plain full-sequence forwards, as an independent reference."""
    prompt = PROMPTS[1]
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            logits = arm(torch.tensor([sequence], device=arm.lm_head.weight.device))[0, -1]
            sequence.append(int(logits.argmax()))
    new = arm_sample(arm, PROMPTS, SampleConfig(max_new_tokens=6, temperature=0))
    assert new[1].tolist() == sequence[len(prompt) :]


def test_min_new_tokens_blocks_early_eos():
    eos = 2
    model = sharp_model("arm", seed=1, eos_id=eos, eos_bias=50.0)
    free = generate(model, PROMPTS, SampleConfig(max_new_tokens=8, temperature=0), eos_id=eos)
    assert [len(row) for row in free] == [0, 0, 0]  # the biased model stops at once
    held = arm_sample(model, PROMPTS, SampleConfig(max_new_tokens=8, temperature=0, min_new_tokens=3), eos)
    assert (held[:, :3] != eos).all()
    assert (held[:, 3] == eos).all()
    assert held.size(1) == 4  # every row stopped, so decoding ended early


def test_mdm_min_new_tokens_and_no_mask_ids():
    eos = 2
    model = sharp_model("mdm", eos_id=eos, eos_bias=50.0)
    config = SampleConfig(max_new_tokens=8, steps=4, temperature=1.0, block_length=2, min_new_tokens=5)
    new = mdm_sample(model, PROMPTS, config, eos_id=eos)
    assert (new[:, :5] != eos).all()
    assert (new[:, 5:] == eos).all()
    assert not (new == model.config.mask_id).any()
    rows = generate(model, PROMPTS, config, eos_id=eos)
    assert [len(row) for row in rows] == [5, 5, 5]


def test_stop_strings_end_arm_rows(arm):
    full = generate(arm, PROMPTS, SampleConfig(max_new_tokens=24, temperature=0), eos_id=0)
    stop_token = full[1][2]
    config = SampleConfig(max_new_tokens=24, temperature=0, stop_strings=("|",))
    rows = generate(arm, PROMPTS, config, eos_id=0,
                    decode=lambda ids: "".join("|" if t == stop_token else "." for t in ids))
    for row, whole in zip(rows, full):
        assert row == whole[: len(row)]
    # Stop strings are checked every 8 tokens; the row that hit one stops there and emits EOS after it.
    assert len(rows[1]) == 8


def test_gumbel_max_matches_softmax_in_distribution():
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0])
    temperature, n = 0.7, 40_000
    gen = torch.Generator().manual_seed(1234)
    draws = gumbel_max(logits.expand(n, -1), temperature, gen)
    observed = torch.bincount(draws, minlength=5).double()
    expected = torch.softmax(logits.double() / temperature, dim=0) * n
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3
    # The same counts are far from softmax(l) at another temperature, so the test has power.
    wrong = torch.softmax(logits.double() / 1.0, dim=0) * n
    assert chisquare(observed.numpy(), wrong.numpy()).pvalue < 1e-6


def test_gumbel_max_zero_temperature_is_argmax():
    logits = torch.randn(4, 9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gumbel_max(logits, 0.0, torch.Generator()), logits.argmax(-1))


def test_invalid_settings_are_rejected(mdm, arm):
    with pytest.raises(ValueError, match="block_length"):
        SampleConfig(max_new_tokens=10, block_length=4)
    with pytest.raises(ValueError, match="sampler"):
        SampleConfig(sampler="top_k")
    with pytest.raises(ValueError, match="mask id"):
        mdm_sample(mdm, PROMPTS, SampleConfig(max_new_tokens=4), pad_id=mdm.config.mask_id)
    with pytest.raises(ValueError, match="context"):
        generate(mdm, [[1] * 60], SampleConfig(max_new_tokens=8))
    with pytest.raises(ValueError, match="MDM"):
        generate(arm, PROMPTS, SampleConfig(max_new_tokens=4), suffixes=[[1]] * 3)


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory):
    """A tiny sharpened MDM with a small BPE, saved as a checkpoint folder."""
    from smdm.checkpoint import save_checkpoint
    from smdm.data.tokenizer import train_bpe

    texts = ["To be, or not to be, that is the question.", "Whether 'tis nobler in the mind to suffer."] * 20
    tokenizer = train_bpe(texts, vocab_size=300)
    model = tiny_model("mdm", vocab_size=tokenizer.vocab_size, block_size=64)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.mul_(4.0)
    folder = tmp_path_factory.mktemp("ckpt") / "mdm"
    save_checkpoint(folder, model, tokenizer)
    return folder


def test_sample_text_batch_matches_alone(text_checkpoint):
    from smdm.sampling_api import sample_text

    settings = dict(max_new_tokens=8, steps=8, temperature=0.0, sampler="low_confidence", stop_at_eos=False,
                    device="cpu")
    batched = sample_text(text_checkpoint, ["To be", "Whether 'tis nobler in"], **settings)
    alone = sample_text(text_checkpoint, ["Whether 'tis nobler in"], **settings)
    assert batched[1] == alone[0]
    assert [prompt for prompt, _ in batched] == ["To be", "Whether 'tis nobler in"]


def test_sample_cli_prints_every_sample(text_checkpoint, capsys):
    from smdm.cli import main

    code = main(["sample", "--checkpoint", str(text_checkpoint), "--prompt", "To be", "--prompt", "Whether",
                 "--num-samples", "2", "--max-new-tokens", "8", "--steps", "4", "--block-length", "4",
                 "--sampler", "threshold", "--cache", "dual", "--cfg", "0.5", "--suffix", " END", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("--- prompt: 'To be'") == 2
    assert out.count("--- prompt: 'Whether'") == 2
    assert out.count(" END\n") == 4


def test_sample_cli_reads_prompt_file(text_checkpoint, tmp_path, capsys):
    from smdm.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("To be\n\nWhether\n", encoding="utf-8")
    code = main(["sample", "--checkpoint", str(text_checkpoint), "--prompt", "O", "--prompt-file", str(prompts),
                 "--max-new-tokens", "4", "--steps", "2", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    assert [line for line in out.splitlines() if line.startswith("---")] == [
        "--- prompt: 'O'", "--- prompt: 'To be'", "--- prompt: 'Whether'"]


def test_sample_cli_rejects_bad_block_length(text_checkpoint, capsys):
    from smdm.cli import main

    code = main(["sample", "--checkpoint", str(text_checkpoint), "--max-new-tokens", "10", "--block-length", "3"])
    assert code == 2
    assert "block_length=3" in capsys.readouterr().err


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_step_matches_full_pass(mdm, cache):
    """With an unchanged canvas, a cached step must reproduce the full pass (mixed lengths, CFG on)."""
    config = SampleConfig(max_new_tokens=8, steps=8, block_length=4, cache=cache, cfg=0.5)
    canvas = build_canvas(PROMPTS, 8, mdm.config.mask_id, 0, mdm.lm_head.weight.device)
    tokens = canvas.tokens.clone()
    tokens[:, canvas.start] = 40  # one revealed token in the first block
    uncached = _Denoiser(mdm, canvas, SampleConfig(max_new_tokens=8, steps=8, block_length=4, cfg=0.5))
    cached = _Denoiser(mdm, canvas, config)
    for lo in (canvas.start, canvas.start + 4):
        reference = uncached(tokens, lo, lo + 4, first=True)
        first = cached(tokens, lo, lo + 4, first=True)
        later = cached(tokens, lo, lo + 4, first=False)
        torch.testing.assert_close(first, reference, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(later, reference, rtol=1e-4, atol=1e-4)


def test_arm_keeps_going_without_eos_stop():
    eos = 2
    model = sharp_model("arm", seed=1, eos_id=eos, eos_bias=50.0)
    config = SampleConfig(max_new_tokens=6, temperature=0, stop_at_eos=False)
    new = arm_sample(model, PROMPTS, config, eos)
    assert new.shape == (3, 6)
    reference = arm_sample(model, PROMPTS, SampleConfig(max_new_tokens=6, temperature=0, cache="none",
                                                        stop_at_eos=False), eos)
    assert torch.equal(new, reference)
    assert (new[:, 0] == eos).all()  # the biased model emits EOS first, and the rows still continue
