"""Checkpoints: safetensors weights and optimiser state, JSON for everything else.

A checkpoint is a folder:
  model.safetensors       model weights
  optimizer.safetensors   AdamW moments and step counts (absent in weights-only exports)
  trainer_state.json      step, tokens seen, optimiser hyperparameters, data position
  config.json             the resolved model and training configs
  tokenizer.json          the tokenizer the model was trained with

It is written into a temporary sibling folder and renamed into place, so a
reader never sees a half-written checkpoint. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from smdm.config import ModelConfig
from smdm.data.tokenizer import Tokenizer
from smdm.model import Transformer

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.json"
LATEST_FILE = "latest"
CHECKPOINTS_DIR = "checkpoints"


def _fsync_folder(folder: Path) -> None:
    for file in folder.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def write_atomically(folder: Path, write: Any) -> None:
    """Call write(tmp_folder), then move the finished folder to `folder` in one rename."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        _apply_umask(tmp)
        _fsync_folder(tmp)
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _apply_umask(folder: Path) -> None:
    """Give every file in folder the mode that open() would give it under the process umask.

    safetensors 0.8.0 writes its files with mode 0600, which hides checkpoints from the
    other members of a group on a shared cluster.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def write_text_atomically(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def optimizer_to_tensors(optimizer: torch.optim.Optimizer | dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser's state dict (or the optimiser) into flat tensors for safetensors and JSON-safe groups."""
    state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{index}.{key}"] = tensor.detach().cpu().contiguous()
    return tensors, {"param_groups": state["param_groups"]}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], groups: dict) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    return {"state": state, "param_groups": groups["param_groups"]}


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(
    folder: str | Path,
    model: Transformer,
    tokenizer: Tokenizer,
    *,
    optimizer: torch.optim.Optimizer | dict | None = None,
    trainer_state: dict | None = None,
    train_config: dict | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint folder atomically and return its path.

    optimizer is an optimiser or its state_dict(). When weights are given
    (a sharded model's full weights, gathered beforehand), they replace
    model.state_dict() and the model only supplies its config.
    """
    folder = Path(folder)
    weights = model_state(model) if weights is None else {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    optimizer_tensors, optimizer_groups = optimizer_to_tensors(optimizer) if optimizer is not None else ({}, {})
    config = {"model": model.config.to_dict(), "train": train_config or {}}

    def write(tmp: Path) -> None:
        save_file(weights, tmp / MODEL_FILE, metadata={"format": "pt"})
        if optimizer is not None:
            save_file(optimizer_tensors, tmp / OPTIMIZER_FILE)
        state = dict(trainer_state or {})
        state["optimizer"] = optimizer_groups
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
        tokenizer.save(tmp)

    write_atomically(folder, write)
    return folder


def resolve_checkpoint(path: str | Path) -> Path:
    """Return the checkpoint folder for a checkpoint path or a run folder (its latest checkpoint)."""
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        return path
    latest = path / CHECKPOINTS_DIR / LATEST_FILE
    if latest.is_file():
        folder = path / CHECKPOINTS_DIR / latest.read_text(encoding="utf-8").strip()
        if (folder / MODEL_FILE).is_file():
            return folder
        raise FileNotFoundError(f"{latest} names {folder}, which has no {MODEL_FILE}; the run folder is damaged")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    raise FileNotFoundError(
        f"{path} is neither a checkpoint folder (with {MODEL_FILE}) nor a run folder with a checkpoint; "
        "pass the --out folder of `smdm train` or one of its checkpoints/step-* folders"
    )


@dataclass
class LoadedCheckpoint:
    folder: Path
    model_config: ModelConfig
    train_config: dict
    tokenizer: Tokenizer
    trainer_state: dict

    def weights(self) -> dict[str, torch.Tensor]:
        return load_file(self.folder / MODEL_FILE)

    def optimizer_state(self) -> dict:
        path = self.folder / OPTIMIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{self.folder} has no optimiser state; it cannot be resumed, only loaded")
        return optimizer_from_tensors(load_file(path), self.trainer_state["optimizer"])


def read_checkpoint(path: str | Path) -> LoadedCheckpoint:
    folder = resolve_checkpoint(path)
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    state_path = folder / STATE_FILE
    state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.is_file() else {}
    tokenizer = Tokenizer.load(folder)
    model_config = ModelConfig.from_dict(config["model"])
    if tokenizer.vocab_size != model_config.vocab_size:
        raise ValueError(
            f"checkpoint {folder}: the tokenizer has {tokenizer.vocab_size} ids but the model expects "
            f"vocab_size={model_config.vocab_size}; the checkpoint's tokenizer.json does not belong to it"
        )
    return LoadedCheckpoint(folder, model_config, config.get("train", {}), tokenizer, state)


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Transformer, Tokenizer, LoadedCheckpoint]:
    """Load a checkpoint (or a run folder's latest) as a model in eval mode, with its tokenizer."""
    checkpoint = read_checkpoint(path)
    model = Transformer(checkpoint.model_config)
    weights = checkpoint.weights()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {checkpoint.folder} does not match its config: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
    model.to(device=device, dtype=dtype).eval()
    return model, checkpoint.tokenizer, checkpoint
