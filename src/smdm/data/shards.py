"""Packed token shards: `smdm prepare` writes them, training and evaluation read them.

A prepared folder contains:
  train.bin, val.bin   token ids as a flat numpy memmap, documents separated by EOS
  tokenizer.json       the tokenizer that produced them
  meta.json            dtype, token counts, tokenizer identity and source
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smdm.data.corpus import Document, iter_documents
from smdm.data.tokenizer import Tokenizer, tokenizer_summary, train_bpe

log = logging.getLogger(__name__)

META_FILE = "meta.json"
SPLITS = ("train", "val")
FORMAT_VERSION = 1


def smallest_dtype(vocab_size: int) -> np.dtype:
    """Return the smallest unsigned integer dtype that fits ids 0 .. vocab_size - 1."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"vocab_size={vocab_size} does not fit in 32 bits")


def _batched(documents: Iterable[Document], size: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for document in documents:
        batch.append(document)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class PrepareResult:
    out_dir: Path
    meta: dict


def prepare(
    corpus: str | Path,
    out_dir: str | Path,
    *,
    tokenizer: str | Path | Tokenizer | None = None,
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    text_field: str = "text",
) -> PrepareResult:
    """Tokenize a corpus into train/val shards in out_dir.

    The tokenizer is trained on the corpus (byte-level BPE of vocab_size ids)
    unless one is given. Each document is followed by EOS. The last
    val_fraction of the token stream becomes the validation split.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must lie strictly between 0 and 1")
    out = Path(out_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _prepare_into(corpus, out, tokenizer, vocab_size, val_fraction, text_field)
    except BaseException:
        # Leave no trace of a failed run: an empty or partial folder would look like a prepared one.
        for leftover in ("tokens.tmp", "train.bin.tmp", "val.bin.tmp"):
            (out / leftover).unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise


def _prepare_into(
    corpus: str | Path,
    out: Path,
    tokenizer: str | Path | Tokenizer | None,
    vocab_size: int,
    val_fraction: float,
    text_field: str,
) -> PrepareResult:
    started = time.time()

    def documents() -> Iterator[Document]:
        count = 0
        for document in iter_documents(corpus, text_field):
            if document.text.strip():
                count += 1
                yield document
        if count == 0:
            raise ValueError(f"corpus {corpus} contains no text (every document is empty); give a non-empty corpus")

    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    elif tokenizer is not None:
        tok = Tokenizer.load(tokenizer)
    else:
        log.info("training a byte-level BPE tokenizer of %d ids on %s", vocab_size, corpus)
        tok = train_bpe((d.text for d in documents()), vocab_size)
    dtype = smallest_dtype(tok.vocab_size)

    # Encode in batches and stream the ids to one temporary file.
    stream_path = out / "tokens.tmp"
    n_tokens = n_documents = 0
    with open(stream_path, "wb") as stream:
        for batch in _batched(documents(), 64):
            for ids in tok.encode_batch([d.text for d in batch]):
                ids.append(tok.eos_id)
                np.asarray(ids, dtype=dtype).tofile(stream)
                n_tokens += len(ids)
            n_documents += len(batch)
            log.info("tokenized %d documents, %d tokens", n_documents, n_tokens)

    tokens = np.memmap(stream_path, dtype=dtype, mode="r")
    n_val = int(round(n_tokens * val_fraction))
    if n_val < 2 or n_tokens - n_val < 2:
        stream_path.unlink()
        raise ValueError(
            f"corpus {corpus} is too small: {n_tokens} tokens cannot be split into train and validation; "
            "give more text or change --val-fraction"
        )
    split_at = n_tokens - n_val
    for name, part in (("train", tokens[:split_at]), ("val", tokens[split_at:])):
        tmp = out / f"{name}.bin.tmp"
        np.asarray(part).tofile(tmp)
        os.replace(tmp, out / f"{name}.bin")
    del tokens
    stream_path.unlink()

    tok.save(out)
    meta = {
        "format": FORMAT_VERSION,
        "source": str(corpus),
        "text_field": text_field,
        "documents": n_documents,
        "dtype": dtype.name,
        "train_tokens": split_at,
        "val_tokens": n_val,
        "tokenizer": tokenizer_summary(tok),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    log.info(
        "prepared %s: %d documents, %d train and %d validation tokens in %.1fs",
        out, n_documents, split_at, n_val, time.time() - started,
    )
    return PrepareResult(out, meta)


class TokenData:
    """A prepared folder: its metadata, tokenizer and memory-mapped splits."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        meta_path = self.folder / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{self.folder} is not a prepared data folder (no {META_FILE}); create it with "
                f"`smdm prepare --corpus SOURCE --out {self.folder}`"
            )
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        self.tokenizer = Tokenizer.load(self.folder)
        if self.tokenizer.identity != self.meta["tokenizer"]["identity"]:
            raise ValueError(
                f"{self.folder}/tokenizer.json does not match the tokenizer recorded in {META_FILE}; "
                "prepare the data again"
            )
        self.dtype = np.dtype(self.meta["dtype"])

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; choose one of {SPLITS}")
        return np.memmap(self.folder / f"{name}.bin", dtype=self.dtype, mode="r")


def window_starts(n_tokens: int, window: int, count: int, seed: int, step: int) -> np.ndarray:
    """Return `count` window start offsets for optimiser step `step`.

    The offsets depend only on (seed, step), never on the process count or on
    what ran before, so a resumed run reads exactly the batches it would have
    read without the interruption.
    """
    if n_tokens <= window:
        raise ValueError(
            f"split has {n_tokens} tokens, fewer than one window of {window}; lower --seq-len or prepare more text"
        )
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n_tokens - window, size=count)


def read_windows(tokens: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
    """Gather windows (len(starts), window) of int64 ids."""
    return np.stack([np.asarray(tokens[s : s + window], dtype=np.int64) for s in starts])


def eval_windows(tokens: np.ndarray, window: int, max_windows: int) -> np.ndarray:
    """Return up to max_windows non-overlapping windows evenly spread over a split (deterministic)."""
    available = len(tokens) // window
    if available == 0:
        raise ValueError(f"validation split has {len(tokens)} tokens, fewer than one window of {window}")
    count = min(available, max_windows)
    picks = np.linspace(0, available - 1, count).round().astype(np.int64)
    return read_windows(tokens, picks * window, window)
