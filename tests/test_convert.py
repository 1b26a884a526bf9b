"""Conversion to and from the reference layout, Hugging Face folders and SentencePiece tokenizers."""

from __future__ import annotations

import io
import json
import os
import stat

import pytest
import torch
from conftest import shared_path, tiny_model
from safetensors.torch import load_file, save_file

from smdm.checkpoint import load_model, save_checkpoint
from smdm.cli import main
from smdm.config import ModelConfig
from smdm.data.tokenizer import Tokenizer, train_bpe
from smdm.interop import config_from_reference, export_hf, from_hf, from_reference, load_hf, to_hf, to_reference
from smdm.interop.state import check_tensors, expected_shapes
from smdm.model import Transformer, rope_tables

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
VOCAB_SIZE = 320


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device(name)


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return shared_path("tinyshakespeare/input.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tokenizer(shakespeare):
    return train_bpe([shakespeare[:200_000]], VOCAB_SIZE)


@pytest.fixture(scope="module")
def token_ids(shakespeare, tokenizer) -> torch.Tensor:
    """Two rows of 48 tokens from a passage the tokenizer was not trained on."""
    ids = tokenizer.encode(shakespeare[300_000:302_000])
    return torch.tensor([ids[:48], ids[48:96]])


def random_model(kind: str, seed: int = 0, **overrides) -> Transformer:
    """A tiny model whose norm weights are random too, so swapped norms change the logits."""
    model = tiny_model(kind, vocab_size=VOCAB_SIZE, seed=seed, **overrides)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def reference_by_hand(model: Transformer) -> dict[str, torch.Tensor]:
    """Build the reference state dict head by head, independently of smdm.interop."""
    config, state = model.config, model.state_dict()
    d, k = config.n_embd, config.head_size
    out = {"transformer.wte.weight": state["wte.weight"], "transformer.ln_f.weight": state["norm_f.weight"],
           "lm_head.weight": state["lm_head.weight"]}
    for i in range(config.n_layer):
        qkv = state[f"blocks.{i}.attn.qkv.weight"]
        q, key, v = qkv[:d], qkv[d : 2 * d], qkv[2 * d :]
        rows = []
        for h in range(config.n_head):
            rows += [q[h * k : (h + 1) * k], key[h * k : (h + 1) * k], v[h * k : (h + 1) * k]]
        prefix = f"transformer.h.{i}."
        out[prefix + "attn.attn.weight"] = torch.cat(rows)
        out[prefix + "norm_1.weight"] = state[f"blocks.{i}.norm_1.weight"]
        out[prefix + "attn.proj.weight"] = state[f"blocks.{i}.attn.proj.weight"]
        out[prefix + "norm_2.weight"] = state[f"blocks.{i}.norm_2.weight"]
        out[prefix + "mlp.swiglu.w1.weight"] = state[f"blocks.{i}.mlp.gate.weight"]
        out[prefix + "mlp.swiglu.w2.weight"] = state[f"blocks.{i}.mlp.up.weight"]
        out[prefix + "mlp.swiglu.w3.weight"] = state[f"blocks.{i}.mlp.down.weight"]
    return out


# Hugging Face transformers
@pytest.mark.parametrize("device", DEVICES)
def test_arm_export_matches_llama_logits(tmp_path, tokenizer, token_ids, shakespeare, device):
    transformers = pytest.importorskip("transformers")
    device = _device(device)
    model = random_model("arm").to(device)
    export_hf(model, tokenizer, tmp_path / "hf")

    llama = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).to(device).eval()
    ids = token_ids.to(device)
    with torch.no_grad():
        expected = model(ids)
        logits = llama(ids).logits
    assert logits.shape == (2, 48, VOCAB_SIZE)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)

    passage = shakespeare[300_000:300_500]
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tokenizer.encode(passage, add_special_tokens=False) == tokenizer.encode(passage)
    assert hf_tokenizer.eos_token_id == tokenizer.eos_id


@pytest.mark.parametrize("kind", ["arm", "mdm"])
def test_hf_folder_round_trip(tmp_path, tokenizer, token_ids, kind):
    pytest.importorskip("transformers")
    model = random_model(kind, seed=1)
    export_hf(model, tokenizer, tmp_path / "hf")

    loaded, loaded_tokenizer = load_hf(tmp_path / "hf")
    assert loaded.config == model.config
    assert loaded_tokenizer.identity == tokenizer.identity
    assert loaded_tokenizer.mask_id == VOCAB_SIZE
    with torch.no_grad():
        assert torch.equal(loaded(token_ids), model(token_ids))


def test_hf_import_reads_sharded_weights(tmp_path, tokenizer, token_ids):
    pytest.importorskip("transformers")
    model = random_model("arm", seed=5)
    export_hf(model, tokenizer, tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    (tmp_path / "hf" / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for index, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = f"model-{index + 1:05d}-of-00002.safetensors"
        save_file({name: tensors[name] for name in part}, tmp_path / "hf" / shard)
        weight_map.update({name: shard for name in part})
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    loaded, _ = load_hf(tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(loaded(token_ids), model(token_ids))


def test_mdm_folder_documents_loading(tmp_path, tokenizer):
    pytest.importorskip("transformers")
    export_hf(random_model("mdm"), tokenizer, tmp_path / "hf")

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "smdm_mdm"
    assert config["mask_token_id"] == VOCAB_SIZE
    assert load_file(tmp_path / "hf" / "model.safetensors")["model.embed_tokens.weight"].shape == (VOCAB_SIZE + 1, 32)
    readme = (tmp_path / "hf" / "README.md").read_text()
    assert "load_hf" in readme
    assert "smdm convert import-hf" in readme
    assert f"id {VOCAB_SIZE}, is the mask token" in readme


def test_hf_import_rejects_grouped_query_attention(tmp_path, tokenizer):
    pytest.importorskip("transformers")
    export_hf(random_model("arm"), tokenizer, tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_key_value_heads"] = 1
    config_path.write_text(json.dumps(config))

    with pytest.raises(ValueError, match="num_key_value_heads=1"):
        load_hf(tmp_path / "hf")


def test_hf_import_names_wrong_shape():
    model = random_model("arm")
    tensors = to_hf(model)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(63, 32)

    expected = r"model.layers.1.mlp.up_proj.weight has shape \[63, 32\], expected \[64, 32\]"
    with pytest.raises(ValueError, match=expected):
        from_hf(tensors, model.config)


def test_hf_import_without_folder_suggests_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="--hub"):
        load_hf(tmp_path / "owner" / "missing")


# Reference (lit-gpt style) checkpoints
@pytest.mark.parametrize("kind", ["arm", "mdm"])
def test_reference_layout_imports_to_identical_logits(token_ids, kind):
    model = random_model(kind, seed=2)
    by_hand = reference_by_hand(model)

    exported = to_reference(model)
    assert exported.keys() == by_hand.keys()
    for name, tensor in by_hand.items():
        assert torch.equal(exported[name], tensor), name

    imported = from_reference(by_hand, n_head=model.config.n_head, block_size=model.config.block_size)
    assert imported.config.kind == kind
    assert imported.config.vocab_size == VOCAB_SIZE
    assert imported.config.mask_id == (VOCAB_SIZE if kind == "mdm" else None)
    with torch.no_grad():
        assert torch.equal(imported(token_ids), model(token_ids))


def test_reference_detects_tiny_size(token_ids):
    model = random_model("mdm", n_layer=4, n_head=4, n_embd=128, intermediate_size=512)  # tiny-0.8M
    imported = from_reference(to_reference(model), block_size=64)

    assert imported.config.name == "tiny-0.8M"
    assert imported.config.n_head == 4
    with torch.no_grad():
        assert torch.equal(imported(token_ids), model(token_ids))


@pytest.mark.parametrize(("name", "kind", "heads"), [("19M", "mdm", 6), ("75M", "arm", 8), ("1028M", "mdm", 14)])
def test_reference_detects_paper_sizes(name, kind, heads):
    config = ModelConfig.from_name(name, kind=kind)
    with torch.device("meta"):
        tensors = to_reference(Transformer(config))

    detected = config_from_reference(tensors)
    assert (detected.name, detected.kind, detected.n_head) == (name, kind, heads)
    assert detected.vocab_size == 32000
    assert detected.mask_id == (32000 if kind == "mdm" else None)
    assert detected.n_non_embedding == config.n_non_embedding
    check_tensors(tensors, expected_shapes(detected, to_reference), name)


def test_reference_custom_size_needs_heads():
    tensors = to_reference(random_model("arm"))  # 2 layers, width 32 match no named size

    with pytest.raises(ValueError, match="--n-head"):
        config_from_reference(tensors)
    assert config_from_reference(tensors, n_head=2).name == ""


def test_reference_names_wrong_shape():
    tensors = to_reference(random_model("mdm"))
    tensors["transformer.h.1.attn.proj.weight"] = torch.zeros(32, 31)

    with pytest.raises(ValueError, match=r"transformer.h.1.attn.proj.weight has shape \[32, 31\], expected \[32, 32\]"):
        from_reference(tensors, n_head=2)


def test_reference_names_unknown_and_missing_keys():
    tensors = to_reference(random_model("arm"))
    tensors["transformer.h.0.attn.rotary.inv_freq"] = torch.zeros(8)
    del tensors["transformer.h.1.norm_2.weight"]

    with pytest.raises(ValueError) as error:
        from_reference(tensors, n_head=2)
    assert "unknown keys: transformer.h.0.attn.rotary.inv_freq" in str(error.value)
    assert "missing keys: transformer.h.1.norm_2.weight" in str(error.value)


def test_reference_rejects_inconsistent_vocabulary():
    tensors = to_reference(random_model("arm"))
    tensors["transformer.wte.weight"] = torch.zeros(VOCAB_SIZE + 2, 32)

    with pytest.raises(ValueError, match=rf"transformer.wte.weight has {VOCAB_SIZE + 2} rows"):
        from_reference(tensors, n_head=2)


def test_reference_import_points_hf_weights_elsewhere():
    with pytest.raises(ValueError, match="import-hf"):
        from_reference(to_hf(random_model("arm")), n_head=2)


def test_reference_kind_must_match_shapes():
    tensors = to_reference(random_model("arm"))

    with pytest.raises(ValueError, match="shapes are those of an ARM"):
        from_reference(tensors, n_head=2, kind="mdm")


def test_rope_table_dtype_is_validated():
    with pytest.raises(ValueError, match="rope_table_dtype='float16' is invalid"):
        ModelConfig(rope_table_dtype="float16")


def test_bfloat16_rope_tables_round_as_reference(token_ids):
    model = random_model("arm")
    config = model.config
    rounded = from_reference(to_reference(model), n_head=2, block_size=64, rope_table_dtype="bfloat16")

    positions = torch.arange(64, dtype=torch.float32)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, config.head_size, 2, dtype=torch.float32) / config.head_size)
    angles = torch.outer(positions, inv_freq).repeat(1, 2)  # (T, K)
    assert rounded.rope_cos.dtype == torch.float32
    assert torch.equal(rounded.rope_cos, angles.cos().bfloat16().float())
    assert torch.equal(rounded.rope_sin, angles.sin().bfloat16().float())
    assert torch.equal(model.rope_cos, rope_tables(64, config.head_size, 10000.0)[0])
    assert not torch.equal(model.rope_cos, rounded.rope_cos)
    with torch.no_grad():
        gap = (rounded(token_ids) - model(token_ids)).abs().max().item()
    assert 0 < gap < 0.05


# Command line and tokenizers
def test_cli_reference_round_trip(tmp_path, tokenizer, token_ids, capsys):
    model = random_model("mdm", seed=3)
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)

    assert main(["convert", "export-reference", "--checkpoint", str(tmp_path / "ckpt"),
                 "--out", str(tmp_path / "reference.safetensors")]) == 0
    tokenizer.save(tmp_path / "tok")
    capsys.readouterr()
    assert main(["convert", "import-reference", str(tmp_path / "reference.safetensors"), "--tokenizer",
                 str(tmp_path / "tok"), "--n-head", "2", "--block-size", "64", "--out", str(tmp_path / "back")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["kind"], report["mask_id"], report["tokenizer_vocab_size"]) == ("mdm", VOCAB_SIZE, VOCAB_SIZE)

    loaded, loaded_tokenizer, _ = load_model(tmp_path / "back")
    assert loaded.config.kind == "mdm"
    assert loaded_tokenizer.identity == tokenizer.identity
    with torch.no_grad():
        assert torch.equal(loaded(token_ids), model(token_ids))


def test_cli_rejects_tokenizer_of_other_vocabulary(tmp_path, shakespeare, capsys):
    save_file({k: v.contiguous() for k, v in to_reference(random_model("arm")).items()}, tmp_path / "ref.safetensors")
    train_bpe([shakespeare[:50_000]], 300).save(tmp_path / "tok")

    code = main(["convert", "import-reference", str(tmp_path / "ref.safetensors"), "--tokenizer", str(tmp_path / "tok"),
                 "--n-head", "2", "--out", str(tmp_path / "out")])
    message = capsys.readouterr().err
    assert code == 2
    assert f"vocab_size={VOCAB_SIZE}" in message
    assert "has 300 ids" in message
    assert not (tmp_path / "out").exists()


def test_cli_hf_round_trip(tmp_path, tokenizer, token_ids):
    pytest.importorskip("transformers")
    model = random_model("arm", seed=4)
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)

    assert main(["convert", "export-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    assert main(["convert", "import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0

    loaded, _, _ = load_model(tmp_path / "back")
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(token_ids), model(token_ids))


def test_cli_export_keeps_existing_folder(tmp_path, tokenizer, capsys):
    pytest.importorskip("transformers")
    save_checkpoint(tmp_path / "ckpt", random_model("arm", seed=4), tokenizer)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("keep me")
    command = ["convert", "export-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]

    assert main(command) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "hf" / "notes.txt").read_text() == "keep me"
    assert main(command + ["--overwrite"]) == 0
    assert not (tmp_path / "hf" / "notes.txt").exists()
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_hf_export_modes_and_context_length(tmp_path, tokenizer):
    pytest.importorskip("transformers")
    model = random_model("arm")
    export_hf(model, tokenizer, tmp_path / "hf")
    umask = os.umask(0)
    os.umask(umask)
    for path in (tmp_path / "hf").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
    tokenizer_config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == model.config.block_size


@pytest.mark.parametrize("remove_extra_whitespaces", [False, True])
@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_tokenizer_round_trip(tmp_path, shakespeare, model_type, remove_extra_whitespaces):
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("transformers")
    proto = io.BytesIO()
    # LLaMA's settings (for BPE): byte fallback, <unk> 0, <s> 1, </s> 2, a dummy prefix, no pad piece.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(shakespeare[:200_000].splitlines()), model_writer=proto, vocab_size=400,
        model_type=model_type, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        add_dummy_prefix=True, remove_extra_whitespaces=remove_extra_whitespaces,
        normalization_rule_name="identity", minloglevel=2,
    )
    (tmp_path / "tokenizer.model").write_bytes(proto.getvalue())
    reference = spm.SentencePieceProcessor(model_proto=proto.getvalue())

    loaded = Tokenizer.load(tmp_path)
    assert loaded.vocab_size == 400
    assert loaded.mask_id == 400
    assert loaded.eos_id == reference.eos_id() == 2
    passage = shakespeare[300_000:303_000] + "\n  Ünïcode ☃ falls back to bytes."
    ids = loaded.encode(passage)
    assert ids == reference.encode(passage)
    assert loaded.decode(ids) == reference.decode(ids)
    assert max(ids) < loaded.mask_id

    loaded.save(tmp_path / "saved")
    again = Tokenizer.load(tmp_path / "saved")
    assert again.identity == loaded.identity
    assert again.encode(passage) == ids
