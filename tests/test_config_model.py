"""Model family counts and the behaviour of the shared backbone."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from smdm.config import PAPER_SIZES, TINY_SIZES, ModelConfig
from smdm.model import Transformer

# Non-embedding counts from the configuration table of Nie et al., arXiv 2410.18514.
PUBLISHED_COUNTS = {
    "6M": 6_294_784, "19M": 18_880_896, "34M": 33_563_136, "48M": 47_786_688, "66M": 65_549_440,
    "75M": 75_387_520, "85M": 85_214_080, "113M": 113_265_408, "142M": 141_581_568, "170M": 169_897_728,
    "180M": 179_856_768, "206M": 205_550_464, "231M": 231_244_160, "268M": 268_469_248, "302M": 302_027_776,
    "336M": 335_586_304, "472M": 471_906_560, "551M": 550_557_440, "571M": 571_001_728, "629M": 629_208_320,
    "666M": 666_168_448, "717M": 717_285_888, "761M": 761_335_168, "831M": 830_541_312, "944M": 943_796_736,
    "1028M": 1_027_677_952, "1233M": 1_233_213_184, "1476M": 1_476_487_168, "1678M": 1_677_826_048,
    "2121M": 2_121_393_280,
}


def test_family_has_all_paper_sizes():
    assert set(PAPER_SIZES) == set(PUBLISHED_COUNTS)


@pytest.mark.parametrize("name", sorted(PUBLISHED_COUNTS))
def test_formula_count_matches_published(name):
    assert ModelConfig.from_name(name).n_non_embedding == PUBLISHED_COUNTS[name]


@pytest.mark.parametrize("name", ["6M", "19M", "75M", "472M", "2121M", *TINY_SIZES])
def test_module_count_matches_formula(name):
    config = ModelConfig.from_name(name, block_size=64)
    with torch.device("meta"):
        model = Transformer(config)
    embedding = model.wte.weight.numel() + model.lm_head.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    assert total - embedding == config.n_non_embedding
    assert total == config.n_params


def test_mdm_has_mask_row_but_no_mask_output():
    model = tiny_model("mdm", vocab_size=50)
    assert model.wte.weight.shape[0] == 51
    assert model.config.mask_id == 50
    logits = model(torch.full((1, 8), 50))
    assert logits.shape[-1] == 50  # no column for the mask id


def test_arm_has_no_mask_row():
    model = tiny_model("arm", vocab_size=50)
    assert model.wte.weight.shape[0] == 50
    assert model.config.mask_id is None


def test_invalid_config_names_the_field():
    with pytest.raises(ValueError, match="n_embd=30 is not divisible by n_head=4"):
        ModelConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="kind='gpt'"):
        ModelConfig(kind="gpt")
    with pytest.raises(ValueError, match="unknown model size '7M'"):
        ModelConfig.from_name("7M")


@pytest.mark.parametrize("kind", ["mdm", "arm"])
def test_attention_direction_by_perturbing_later_token(kind):
    model = tiny_model(kind)
    x = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(1))
    perturbed = x.clone()
    perturbed[0, 9] = (x[0, 9] + 1) % 97
    with torch.no_grad():
        before, after = model(x), model(perturbed)
    early_change = (before[0, :9] - after[0, :9]).abs().max().item()
    if kind == "mdm":
        assert early_change > 1e-4  # bidirectional: earlier positions see the later token
    else:
        assert early_change == 0.0  # causal: earlier positions never see it
    assert (before[0, 9:] - after[0, 9:]).abs().max().item() > 1e-4


def test_kv_cache_logits_match_full_forward():
    model = tiny_model("arm")
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 16)
        prefill = model(x[:, :10], cache=cache)
        cache.length = 10
        steps = []
        for i in range(10, 16):
            steps.append(model(x[:, i : i + 1], cache=cache))
            cache.length += 1
    incremental = torch.cat([prefill, *steps], dim=1)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=1e-5)


def test_forward_rejects_sequence_longer_than_block():
    model = tiny_model("mdm", block_size=16)
    with pytest.raises(ValueError, match="exceeds the model's block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_flops_per_token_counts_head_and_attention():
    config = ModelConfig.from_name("19M", vocab_size=32000)
    d, f, n = 384, 1536, 8
    expected = 6 * (n * (4 * d * d + 3 * d * f) + 32000 * d) + 12 * n * d * 512
    assert config.flops_per_token(512) == expected
