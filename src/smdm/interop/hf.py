"""Hugging Face folders: export to and import from the transformers LLaMA layout.

An ARM becomes a folder that `transformers.LlamaForCausalLM.from_pretrained` loads without custom
code: smdm's backbone is LLaMA's (pre-norm RMSNorm, rotate-half RoPE over the full head, SwiGLU,
no biases, untied head), so only the names change and the fused qkv weight is split.

An MDM uses the same tensor names, with one more embedding row for the mask id, but its attention
is bidirectional, which no transformers class provides. Its config.json therefore names a model
type of its own ("smdm_mdm") so that no LLaMA class loads it by mistake, and a README.md in the
folder documents how to load it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from smdm.checkpoint import write_atomically
from smdm.config import ModelConfig
from smdm.data.tokenizer import Tokenizer
from smdm.interop.state import check_tensors, check_vocabulary, expected_shapes
from smdm.model import Transformer

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
README_FILE = "README.md"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
MDM_MODEL_TYPE = "smdm_mdm"
MDM_ARCHITECTURE = "SmdmMaskedDiffusionModel"
# Files a hub download needs. Everything else in a repository (pickles, other formats) is skipped.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", README_FILE]
# smdm name inside a block -> Hugging Face LLaMA name inside model.layers.{i}. The fused qkv is split apart.
LAYER_NAMES = {
    "norm_1.weight": "input_layernorm.weight",
    "attn.proj.weight": "self_attn.o_proj.weight",
    "norm_2.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}
QKV_NAMES = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")


def _require_transformers():
    try:
        import transformers
    except ImportError as error:
        raise ModuleNotFoundError(
            "Hugging Face export needs transformers; install it with `pip install 'smdm[hf]'`"
        ) from error
    return transformers


def to_hf(model: Transformer) -> dict[str, torch.Tensor]:
    """Return the model's weights under Hugging Face LLaMA names (tensors share the model's device)."""
    state = model.state_dict()
    out = {
        "model.embed_tokens.weight": state["wte.weight"],
        "model.norm.weight": state["norm_f.weight"],
        "lm_head.weight": state["lm_head.weight"],
    }
    for i in range(model.config.n_layer):
        prefix = f"model.layers.{i}."
        for ours, theirs in LAYER_NAMES.items():
            out[prefix + theirs] = state[f"blocks.{i}.{ours}"]
        q, k, v = state[f"blocks.{i}.attn.qkv.weight"].chunk(3, dim=0)  # 3 x (D, D)
        for name, tensor in zip(QKV_NAMES, (q, k, v)):
            out[prefix + name] = tensor
    return out


def from_hf(
    tensors: Mapping[str, torch.Tensor], config: ModelConfig, source: str = "Hugging Face weights"
) -> Transformer:
    """Build a float32 smdm model on the CPU from Hugging Face LLaMA weights, after checking every key and shape."""
    check_tensors(tensors, expected_shapes(config, to_hf), source)
    state = {
        "wte.weight": tensors["model.embed_tokens.weight"],
        "norm_f.weight": tensors["model.norm.weight"],
        "lm_head.weight": tensors["lm_head.weight"],
    }
    for i in range(config.n_layer):
        prefix = f"model.layers.{i}."
        for ours, theirs in LAYER_NAMES.items():
            state[f"blocks.{i}.{ours}"] = tensors[prefix + theirs]
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([tensors[prefix + name] for name in QKV_NAMES], dim=0)
    model = Transformer(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _llama_fields(config: ModelConfig, tokenizer: Tokenizer) -> dict:
    """LLaMA config fields in transformers' names, shared by the ARM and MDM folders."""
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_head,
        head_dim=config.head_size,
        hidden_act="silu",
        max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_base},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.backend.token_to_id("<s>"),
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )


def _save_tokenizer(tokenizer: Tokenizer, folder: Path, context_length: int) -> None:
    """Write tokenizer.json and tokenizer_config.json, so transformers' AutoTokenizer loads the folder.

    context_length becomes model_max_length, so the tokenizer warns about inputs longer than the model's context.
    """
    transformers = _require_transformers()
    backend = tokenizer.backend
    special = {"eos_token": backend.id_to_token(tokenizer.eos_id), "pad_token": backend.id_to_token(tokenizer.pad_id)}
    for key, token in (("bos_token", "<s>"), ("unk_token", "<unk>")):
        if backend.token_to_id(token) is not None:
            special[key] = token
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=context_length, **special)
    fast.save_pretrained(str(folder))
    # transformers adds an empty post-processor, so the original file is written back to keep the identity hash.
    tokenizer.save(folder)
    # The generic class name also resolves in transformers 4, whose AutoTokenizer lacks TokenizersBackend.
    config_path = folder / TOKENIZER_CONFIG_FILE
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")


def _mdm_readme(config: ModelConfig) -> str:
    return f"""---
library_name: smdm
tags:
- masked-diffusion
---
# Masked diffusion language model (smdm)

A masked diffusion model (MDM) trained with smdm, the implementation of "Scaling up Masked
Diffusion Models on Text" (Nie et al., arXiv 2410.18514). It has {config.n_non_embedding:,}
non-embedding parameters ({config.n_layer} layers, width {config.n_embd}, {config.n_head} heads,
MLP width {config.intermediate_size}), a vocabulary of {config.vocab_size} ids and a context of
{config.block_size} tokens.

## Loading

```python
from smdm.interop import load_hf

model, tokenizer = load_hf("path/to/this/folder")  # or a hub repo id with hub=True
```

or from the command line, into an smdm checkpoint that `smdm sample` and `smdm evaluate` use:

```
smdm convert import-hf path/to/this/folder --out checkpoint
smdm sample --checkpoint checkpoint --max-new-tokens 64
```

## Layout

- `model.safetensors`: LLaMA tensor names (`model.embed_tokens.weight`,
  `model.layers.{{i}}.self_attn.q_proj.weight`, ...). The embedding has {config.vocab_size + 1} rows:
  the last row, id {config.vocab_size}, is the mask token. `lm_head.weight` has {config.vocab_size} rows,
  so the model never predicts the mask.
- `config.json`: LLaMA fields, `mask_token_id` and the full smdm config under `smdm`.
- `tokenizer.json`, `tokenizer_config.json`: the tokenizer; the mask id is not one of its ids.

Attention is bidirectional. `transformers.LlamaForCausalLM` applies a causal mask, so it must not
be used to run this model; the model type `{MDM_MODEL_TYPE}` keeps transformers' Auto classes from
trying.
"""


def export_hf(model: Transformer, tokenizer: Tokenizer, folder: str | Path) -> Path:
    """Write a Hugging Face folder: config.json, model.safetensors and the tokenizer (plus README.md for an MDM)."""
    config = model.config
    check_vocabulary(config, tokenizer, "the model")
    transformers = _require_transformers()
    folder = Path(folder)
    weights = {name: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in to_hf(model).items()}
    fields = _llama_fields(config, tokenizer)

    def write(tmp: Path) -> None:
        save_file(weights, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        if config.is_mdm:
            hf_config = {"architectures": [MDM_ARCHITECTURE], "model_type": MDM_MODEL_TYPE, **fields,
                         "mask_token_id": config.mask_id, "smdm": {"model": config.to_dict()}}
            (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2), encoding="utf-8")
            (tmp / README_FILE).write_text(_mdm_readme(config), encoding="utf-8")
        else:
            llama = transformers.LlamaConfig(architectures=["LlamaForCausalLM"], dtype="float32", **fields)
            llama.smdm = {"model": config.to_dict()}  # kept so a re-import restores the size name
            llama.save_pretrained(str(tmp))
        _save_tokenizer(tokenizer, tmp, config.block_size)

    write_atomically(folder, write)
    return folder


def resolve_hf_folder(source: str | Path, *, hub: bool = False, revision: str | None = None) -> Path:
    """Return a local folder for `source`: the folder itself, or a hub download of repo id `source` when hub is set."""
    path = Path(source)
    if path.is_dir():
        return path
    if not hub:
        raise FileNotFoundError(
            f"no folder {source}; to download a Hugging Face hub repository with that id, pass hub=True (--hub)"
        )
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=str(source), revision=revision, allow_patterns=HUB_PATTERNS))


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / WEIGHTS_FILE).is_file():
        return load_file(folder / WEIGHTS_FILE)
    index = folder / WEIGHTS_INDEX_FILE
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(load_file(folder / shard))
        return tensors
    raise FileNotFoundError(
        f"{folder} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}; smdm reads safetensors only and never "
        "unpickles .bin files"
    )


def config_from_hf(hf_config: dict, source: str) -> ModelConfig:
    """Build the smdm config of a Hugging Face folder: an smdm MDM, or a LLaMA model as an ARM."""
    model_type = hf_config.get("model_type")
    if model_type == MDM_MODEL_TYPE:
        return ModelConfig.from_dict(hf_config["smdm"]["model"])
    if model_type != "llama":
        raise ValueError(
            f"{source} has model_type={model_type!r}; smdm imports 'llama' (as an ARM) and {MDM_MODEL_TYPE!r}"
        )

    heads, width = hf_config["num_attention_heads"], hf_config["hidden_size"]
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    problems = []
    if hf_config.get("num_key_value_heads", heads) != heads:
        problems.append(f"num_key_value_heads={hf_config['num_key_value_heads']} (grouped-query attention)")
    if hf_config.get("head_dim", width // heads) != width // heads:
        problems.append(f"head_dim={hf_config['head_dim']} differs from hidden_size / num_attention_heads")
    if hf_config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf_config['hidden_act']!r}")
    if hf_config.get("attention_bias") or hf_config.get("mlp_bias"):
        problems.append("attention or MLP biases")
    if hf_config.get("tie_word_embeddings"):
        problems.append("tie_word_embeddings=true")
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r}")
    if problems:
        raise ValueError(f"{source} uses features smdm's backbone does not have: {'; '.join(problems)}")

    saved = hf_config.get("smdm", {}).get("model", {})
    # transformers 5 keeps rope_theta in rope_parameters, transformers 4 at the top level.
    rope_theta = rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    return ModelConfig(
        kind="arm", n_layer=hf_config["num_hidden_layers"], n_head=heads, n_embd=width,
        intermediate_size=hf_config["intermediate_size"], vocab_size=hf_config["vocab_size"],
        block_size=hf_config["max_position_embeddings"], rope_base=float(rope_theta),
        norm_eps=hf_config.get("rms_norm_eps", 1e-6), rope_table_dtype=saved.get("rope_table_dtype", "float32"),
        name=saved.get("name", ""),
    )


def load_hf(
    source: str | Path, *, hub: bool = False, revision: str | None = None
) -> tuple[Transformer, Tokenizer]:
    """Load a Hugging Face folder (or a hub repo id when hub is set) written by export_hf, or a LLaMA model.

    Returns a float32 model on the CPU in eval mode and its tokenizer.
    """
    folder = resolve_hf_folder(source, hub=hub, revision=revision)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE}; is it a Hugging Face model folder?")
    config = config_from_hf(json.loads(config_path.read_text(encoding="utf-8")), str(folder))
    tokenizer = Tokenizer.load(folder)
    check_vocabulary(config, tokenizer, str(folder))
    model = from_hf(_read_weights(folder), config, source=str(folder))
    return model, tokenizer
