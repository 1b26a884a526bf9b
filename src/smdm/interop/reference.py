"""The weight layout of the checkpoints released with the paper's reference code (lit-gpt style names).

"Scaling up Masked Diffusion Models on Text" (Nie et al., arXiv 2410.18514) released ARM and MDM
checkpoints of every size as safetensors files with these names:

  transformer.wte.weight                    (V, D) for an ARM, (V + 1, D) for an MDM (mask id V)
  transformer.h.{i}.norm_1.weight           (D,)
  transformer.h.{i}.attn.attn.weight        (3 D, D) fused q, k, v grouped per head
  transformer.h.{i}.attn.proj.weight        (D, D)
  transformer.h.{i}.norm_2.weight           (D,)
  transformer.h.{i}.mlp.swiglu.w1.weight    (F, D) gate, passed through SiLU
  transformer.h.{i}.mlp.swiglu.w2.weight    (F, D) up
  transformer.h.{i}.mlp.swiglu.w3.weight    (D, F) down
  transformer.ln_f.weight                   (D,)
  lm_head.weight                            (V, D)

The fused attention weight holds, for head 0, its K query rows, its K key rows and its K value
rows, then the same for head 1, and so on. smdm keeps all query rows first, then all key rows,
then all value rows. The number of heads cannot be read from the shapes, so it comes from the
named size that matches (n_layer, D, F), or from the caller.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from smdm.config import PAPER_BLOCK_SIZE, PAPER_SIZES, TINY_SIZES, ModelConfig
from smdm.interop.state import check_tensors, expected_shapes
from smdm.model import Transformer

EMBEDDING_KEY = "transformer.wte.weight"
HEAD_KEY = "lm_head.weight"
FINAL_NORM_KEY = "transformer.ln_f.weight"
# smdm name inside a block -> reference name inside transformer.h.{i}.
LAYER_NAMES = {
    "norm_1.weight": "norm_1.weight",
    "attn.qkv.weight": "attn.attn.weight",
    "attn.proj.weight": "attn.proj.weight",
    "norm_2.weight": "norm_2.weight",
    "mlp.gate.weight": "mlp.swiglu.w1.weight",
    "mlp.up.weight": "mlp.swiglu.w2.weight",
    "mlp.down.weight": "mlp.swiglu.w3.weight",
}
_LAYER_PATTERN = re.compile(r"^transformer\.h\.(\d+)\.")


def qkv_from_reference(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Regroup a fused (3 D, D) weight from per-head [q, k, v] blocks to [all q, all k, all v]."""
    d_in = weight.shape[1]
    return weight.view(n_head, 3, -1, d_in).transpose(0, 1).reshape(-1, d_in)  # (H, 3, K, D) -> (3, H, K, D)


def qkv_to_reference(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Regroup a fused (3 D, D) weight from [all q, all k, all v] to per-head [q, k, v] blocks."""
    d_in = weight.shape[1]
    return weight.view(3, n_head, -1, d_in).transpose(0, 1).reshape(-1, d_in)  # (3, H, K, D) -> (H, 3, K, D)


def to_reference(model: Transformer) -> dict[str, torch.Tensor]:
    """Return the model's weights under the reference names and layout (tensors share the model's device)."""
    config = model.config
    state = model.state_dict()
    out = {
        EMBEDDING_KEY: state["wte.weight"],
        FINAL_NORM_KEY: state["norm_f.weight"],
        HEAD_KEY: state["lm_head.weight"],
    }
    for i in range(config.n_layer):
        for ours, theirs in LAYER_NAMES.items():
            tensor = state[f"blocks.{i}.{ours}"]
            if ours == "attn.qkv.weight":
                tensor = qkv_to_reference(tensor, config.n_head)
            out[f"transformer.h.{i}.{theirs}"] = tensor
    return out


def _shape(tensors: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in tensors:
        raise ValueError(f"reference checkpoint is missing key {key}; is it a lit-gpt style checkpoint?")
    return tuple(tensors[key].shape)


def _size_for(n_layer: int, n_embd: int, intermediate_size: int, n_head: int | None) -> tuple[str, int]:
    """Return (name, n_head) of the named size with these shapes, or ("", n_head) for a custom shape."""
    matches = [
        (name, heads)
        for name, (layers, heads, width, mlp) in {**PAPER_SIZES, **TINY_SIZES}.items()
        if (layers, width, mlp) == (n_layer, n_embd, intermediate_size) and n_head in (None, heads)
    ]
    if len(matches) == 1:
        return matches[0]
    if n_head is not None:
        return "", n_head
    if matches:
        raise ValueError(
            f"shapes n_layer={n_layer}, n_embd={n_embd}, intermediate_size={intermediate_size} match several "
            f"sizes ({', '.join(name for name, _ in matches)}) with different head counts; pass n_head (--n-head)"
        )
    raise ValueError(
        f"no named size has n_layer={n_layer}, n_embd={n_embd}, intermediate_size={intermediate_size}, and the "
        "head count cannot be read from the weights; pass n_head (--n-head)"
    )


def config_from_reference(
    tensors: Mapping[str, torch.Tensor],
    *,
    n_head: int | None = None,
    block_size: int | None = None,
    kind: str | None = None,
    rope_table_dtype: str = "float32",
) -> ModelConfig:
    """Detect the model config from the tensor shapes of a reference checkpoint.

    The kind follows from the embedding: one row more than the output head means an MDM (the
    extra row is the mask id), the same rows mean an ARM. The weights do not fix block_size, so it
    defaults to 2048, the context of the released checkpoints.
    """
    if "model.embed_tokens.weight" in tensors:
        raise ValueError(
            "these are Hugging Face LLaMA weights, not a reference checkpoint; import their folder with "
            "`smdm convert import-hf`"
        )
    embedding_rows, n_embd = _shape(tensors, EMBEDDING_KEY)
    head_rows = _shape(tensors, HEAD_KEY)[0]
    if embedding_rows == head_rows + 1:
        detected = "mdm"
    elif embedding_rows == head_rows:
        detected = "arm"
    else:
        raise ValueError(
            f"{EMBEDDING_KEY} has {embedding_rows} rows and {HEAD_KEY} has {head_rows}: an ARM has equal counts "
            "and an MDM one more embedding row (the mask id)"
        )
    if kind is not None and kind != detected:
        raise ValueError(f"the checkpoint's shapes are those of an {detected.upper()}, but kind={kind!r} was requested")

    layers = {int(m.group(1)) for key in tensors if (m := _LAYER_PATTERN.match(key))}
    if not layers:
        raise ValueError("reference checkpoint has no transformer.h.{i} layers; is it a lit-gpt style checkpoint?")
    n_layer = max(layers) + 1  # a missing layer in between is reported by check_tensors
    intermediate_size = _shape(tensors, "transformer.h.0.mlp.swiglu.w1.weight")[0]
    name, n_head = _size_for(n_layer, n_embd, intermediate_size, n_head)
    return ModelConfig(
        kind=detected, n_layer=n_layer, n_head=n_head, n_embd=n_embd, intermediate_size=intermediate_size,
        vocab_size=head_rows, block_size=block_size or PAPER_BLOCK_SIZE, rope_table_dtype=rope_table_dtype,
        name=name,
    )


def from_reference(
    tensors: Mapping[str, torch.Tensor],
    *,
    n_head: int | None = None,
    block_size: int | None = None,
    kind: str | None = None,
    rope_table_dtype: str = "float32",
    source: str = "reference checkpoint",
) -> Transformer:
    """Build a float32 smdm model on the CPU from a reference state dict, after checking every key and shape."""
    config = config_from_reference(
        tensors, n_head=n_head, block_size=block_size, kind=kind, rope_table_dtype=rope_table_dtype
    )
    check_tensors(tensors, expected_shapes(config, to_reference), source)
    state = {"wte.weight": tensors[EMBEDDING_KEY], "norm_f.weight": tensors[FINAL_NORM_KEY],
             "lm_head.weight": tensors[HEAD_KEY]}
    for i in range(config.n_layer):
        for ours, theirs in LAYER_NAMES.items():
            tensor = tensors[f"transformer.h.{i}.{theirs}"]
            if ours == "attn.qkv.weight":
                tensor = qkv_from_reference(tensor, config.n_head)
            state[f"blocks.{i}.{ours}"] = tensor
    model = Transformer(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def read_reference(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a reference checkpoint: one .safetensors file, or a folder that contains exactly one."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise FileNotFoundError(
                f"{path} contains {len(files)} .safetensors files; pass the checkpoint file itself"
            )
        path = files[0]
    if not path.is_file():
        raise FileNotFoundError(f"reference checkpoint not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{path} is not a .safetensors file; smdm never unpickles weights, so convert .pt/.pth/.bin files "
            "to safetensors first"
        )
    return load_file(path)
