"""Tokenizers: train a byte-level BPE on a corpus, or load an existing one.

Real ids are 0 .. vocab_size - 1 and include the special tokens EOS and pad.
The MDM's mask id is `vocab_size`, one past the last real id: it has an input
embedding row but no output column, and is never produced by `encode`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# Candidate spellings of EOS and pad in tokenizers trained elsewhere.
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|eos|>", "[SEP]")
PAD_CANDIDATES = (PAD_TOKEN, "<pad>", "[PAD]", "<unk>")
TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"
# SentencePiece piece types (sentencepiece_model.proto): UNKNOWN, CONTROL and USER_DEFINED.
_SPM_UNKNOWN, _SPM_CONTROL, _SPM_USER_DEFINED = 2, 3, 4
_SPM_UNIGRAM, _SPM_BPE = 1, 2

class Tokenizer:
    """A Hugging Face `tokenizers` tokenizer with the ids smdm needs: EOS, pad and mask."""

    def __init__(self, backend: HFTokenizer, source: str = "") -> None:
        self.backend = backend
        self.source = source
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find_special(EOS_CANDIDATES, "EOS")
        self.pad_id = self._find_special(PAD_CANDIDATES, "pad", fallback=self.eos_id)
        self.mask_id = self.vocab_size

    def _find_special(self, candidates: Sequence[str], what: str, fallback: int | None = None) -> int:
        for token in candidates:
            token_id = self.backend.token_to_id(token)
            if token_id is not None:
                return token_id
        if fallback is not None:
            return fallback
        raise ValueError(
            f"tokenizer {self.source or '(in memory)'} has no {what} token; expected one of {list(candidates)}. "
            f"Add one with tokenizer.add_special_tokens, or train a tokenizer with `smdm prepare`"
        )

    # Encoding and decoding.
    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Decode ids to text; ids that are not real tokens (the mask) are dropped."""
        kept = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self.backend.decode(kept, skip_special_tokens=skip_special)

    # Identity and persistence.
    def to_json(self) -> str:
        return self.backend.to_str()

    @property
    def identity(self) -> str:
        """SHA-256 of the serialised tokenizer: two tokenizers with the same identity encode identically."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def from_json(cls, text: str, source: str = "") -> "Tokenizer":
        return cls(HFTokenizer.from_str(text), source=source)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load a tokenizer.json or SentencePiece tokenizer.model file, or a folder with either.

        A folder's tokenizer.json is preferred. The mask id is one past the last id, so a
        LLaMA-2 tokenizer of 32,000 ids gets mask id 32,000.
        """
        path = Path(path)
        if path.is_dir() and not (path / TOKENIZER_FILE).is_file() and (path / SENTENCEPIECE_FILE).is_file():
            return load_sentencepiece(path / SENTENCEPIECE_FILE)
        if path.suffix == ".model":
            return load_sentencepiece(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"tokenizer not found at {path}: expected a tokenizer.json or SentencePiece tokenizer.model file, "
                "or a folder containing one"
            )
        try:
            backend = HFTokenizer.from_file(str(file))
        except Exception as error:  # the Rust backend raises a bare Exception on malformed files
            raise ValueError(f"could not read tokenizer {file}: {error}. Is it a Hugging Face tokenizer.json?") from error
        return cls(backend, source=str(file))

def load_sentencepiece(path: str | Path) -> Tokenizer:
    """Convert a SentencePiece BPE or unigram model file into a `tokenizers` tokenizer with the same ids.

    The pipeline is the legacy one of transformers' LlamaConverter: a "▁" is prepended (when the
    model adds a dummy prefix), spaces become "▁", and unknown characters fall back to byte pieces
    (when the model has byte fallback). Vocabulary and merges come from transformers'
    SentencePieceExtractor.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SentencePiece model not found: {path}")
    try:
        from tokenizers.models import BPE
        from transformers.convert_slow_tokenizer import SentencePieceExtractor
    except ImportError as error:
        raise ModuleNotFoundError(
            f"reading {path} needs transformers, sentencepiece and protobuf; install them with "
            "`pip install 'smdm[hf]'`"
        ) from error
    try:
        extractor = SentencePieceExtractor(str(path))
    except ImportError as error:  # raised when protobuf is missing
        raise ModuleNotFoundError(f"reading {path} needs protobuf: {error}. Run `pip install 'smdm[hf]'`") from error
    except Exception as error:  # protobuf's DecodeError on a file that is not a model
        raise ValueError(f"could not read {path} as a SentencePiece model: {error}") from error
    proto = extractor.proto
    trainer, normalizer_spec = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type == _SPM_BPE:
        extracted = extractor.extract(BPE)
        model = models.BPE(
            extracted["vocab"], extracted["merges"], unk_token=trainer.unk_piece, fuse_unk=True,
            byte_fallback=trainer.byte_fallback,
        )
    elif trainer.model_type == _SPM_UNIGRAM:
        vocab = [(piece.piece, piece.score) for piece in proto.pieces]
        model = models.Unigram(vocab, unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback)
    else:
        raise ValueError(
            f"{path} is a SentencePiece model of type {trainer.model_type}; only BPE and unigram are supported"
        )
    backend = HFTokenizer(model)

    steps = []
    if normalizer_spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(normalizer_spec.precompiled_charsmap))
    if normalizer_spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if normalizer_spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    backend.normalizer = normalizers.Sequence(steps)
    decoder_steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if normalizer_spec.add_dummy_prefix:
        decoder_steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(decoder_steps)

    # Unknown and control pieces (<unk>, <s>, </s>) never come out of normal text, so they are special.
    backend.add_special_tokens([
        AddedToken(piece.piece, normalized=False, special=True)
        for piece in proto.pieces if piece.type in (_SPM_UNKNOWN, _SPM_CONTROL)
    ])
    backend.add_tokens([
        AddedToken(piece.piece, normalized=False) for piece in proto.pieces if piece.type == _SPM_USER_DEFINED
    ])
    # Unigram scores are float32 in the model file but serialise with more digits; a JSON round trip
    # now keeps the identity hash the same after save and load.
    return Tokenizer(HFTokenizer.from_str(backend.to_str()), source=str(path))


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` ids (EOS and pad included) on an iterable of documents."""
    if vocab_size < 260:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE; use at least 260")
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend, source=f"byte-level BPE, {vocab_size} ids")

def tokenizer_summary(tokenizer: Tokenizer) -> dict:
    return {
        "identity": tokenizer.identity,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "mask_id": tokenizer.mask_id,
        "source": tokenizer.source,
    }

