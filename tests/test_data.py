"""Corpus reading, tokenizer training and packed shards."""

from __future__ import annotations

import json

import numpy as np
import pytest

from smdm.data.corpus import iter_documents, markdown_play_to_text
from smdm.data.shards import TokenData, prepare, smallest_dtype
from smdm.data.tokenizer import Tokenizer, train_bpe


@pytest.fixture(scope="module")
def shakespeare_lines():
    from conftest import shared_path

    text = shared_path("tinyshakespeare/input.txt").read_text(encoding="utf-8")
    return text.split("\n\n")


def test_prepare_round_trips_documents(tmp_path, shakespeare_lines):
    docs = shakespeare_lines[:300]
    source = tmp_path / "speeches.jsonl"
    source.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs), encoding="utf-8")
    result = prepare(source, tmp_path / "data", vocab_size=300, val_fraction=0.1, text_field="body")

    data = TokenData(tmp_path / "data")
    train, val = np.asarray(data.split("train")), np.asarray(data.split("val"))
    assert train.dtype == np.uint16
    assert result.meta["train_tokens"] == len(train)
    assert result.meta["val_tokens"] == len(val)
    assert result.meta["documents"] == 300
    assert abs(len(val) / (len(train) + len(val)) - 0.1) < 0.01

    # Splitting the joined stream at EOS gives back every document's text.
    stream = np.concatenate([train, val]).tolist()
    eos = data.tokenizer.eos_id
    assert stream.count(eos) == 300
    assert stream[-1] == eos
    pieces, current = [], []
    for token in stream:
        if token == eos:
            pieces.append(data.tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    assert pieces == docs


def test_tokenizer_special_ids_are_distinct(shakespeare_lines):
    tokenizer = train_bpe(shakespeare_lines[:200], vocab_size=320)
    assert tokenizer.vocab_size == 320
    assert len({tokenizer.eos_id, tokenizer.pad_id, tokenizer.mask_id}) == 3
    assert tokenizer.mask_id == 320
    ids = tokenizer.encode("First Citizen: Before we proceed any further, hear me speak.")
    assert max(ids) < 320
    assert tokenizer.decode(ids) == "First Citizen: Before we proceed any further, hear me speak."


def test_tokenizer_loads_from_file_and_folder(tmp_path, shakespeare_lines):
    tokenizer = train_bpe(shakespeare_lines[:100], vocab_size=300)
    file = tokenizer.save(tmp_path)
    assert Tokenizer.load(file).identity == tokenizer.identity
    assert Tokenizer.load(tmp_path).identity == tokenizer.identity


def test_smallest_dtype():
    assert smallest_dtype(256) == np.uint8
    assert smallest_dtype(257) == np.uint16
    assert smallest_dtype(65536) == np.uint16
    assert smallest_dtype(65537) == np.uint32


def test_text_folder_reads_every_file(tmp_path):
    (tmp_path / "a.txt").write_text("first document", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second document", encoding="utf-8")
    texts = [d.text for d in iter_documents(tmp_path)]
    assert texts == ["first document", "second document"]


def test_default_corpus_is_plain_text():
    docs = list(iter_documents("shakespeare"))
    assert len(docs) == 38
    hamlet = next(d.text for d in docs if "hamlet" in d.source)
    assert "HAMLET:\n" in hamlet
    assert "**" not in hamlet
    assert "To be, or not to be" in hamlet


def test_markdown_play_stripping():
    markdown = "# Play\n\n## ACT I\n\n_Enter GHOST_\n\n**HORATIO**  \nStay! speak,  \nspeak!\n"
    assert markdown_play_to_text(markdown) == "Play\n\nACT I\n\nEnter GHOST\n\nHORATIO:\nStay! speak,\nspeak!\n"
