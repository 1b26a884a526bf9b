"""Bad input gets an error that names the value and the fix."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model
from smdm.checkpoint import save_checkpoint
from smdm.cli import main
from smdm.config import ModelConfig, TrainConfig
from smdm.data.shards import prepare
from smdm.data.tokenizer import train_bpe
from smdm.generate import SampleConfig, arm_sample, mdm_sample
from smdm.train import Trainer

TEXT = "Now is the winter of our discontent made glorious summer by this sun of York. " * 40


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    source = folder / "source.txt"
    source.write_text(TEXT, encoding="utf-8")
    prepare(source, folder / "prepared", vocab_size=300, val_fraction=0.2)
    return folder / "prepared"


def test_missing_corpus(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus not found: .*nowhere.txt"):
        prepare(tmp_path / "nowhere.txt", tmp_path / "out")


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="contains no text"):
        prepare(tmp_path / "empty.txt", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # a failed prepare leaves no folder that looks prepared


def test_empty_folder(tmp_path):
    (tmp_path / "corpus").mkdir()
    with pytest.raises(ValueError, match="contains no text files"):
        prepare(tmp_path / "corpus", tmp_path / "out")


def test_binary_file(tmp_path):
    (tmp_path / "weights.txt").write_bytes(b"\x00\x01\x02binary\x00")
    with pytest.raises(ValueError, match="weights.txt looks like a binary file"):
        prepare(tmp_path / "weights.txt", tmp_path / "out")


def test_non_utf8_file(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not valid UTF-8 .*iconv"):
        prepare(tmp_path / "latin1.txt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_jsonl_missing_field(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "text"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"a.jsonl:1 has no field 'text' \(found \['body'\]\).*--text-field"):
        prepare(tmp_path / "a.jsonl", tmp_path / "out")


def test_jsonl_invalid_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{broken\n', encoding="utf-8")
    with pytest.raises(ValueError, match="a.jsonl:2 is not valid JSON"):
        prepare(tmp_path / "a.jsonl", tmp_path / "out")


def test_model_vocab_must_match_data(small_data, tmp_path):
    model = ModelConfig.from_name("tiny-0.1M", vocab_size=512, block_size=32)
    with pytest.raises(ValueError, match="vocab_size is 512 but the data's tokenizer has 300 ids"):
        Trainer(model, TrainConfig(seq_len=32, max_steps=1), small_data, tmp_path / "run")


def test_resume_with_other_model_is_rejected(small_data, tmp_path):
    config = TrainConfig(seq_len=16, global_batch=4, max_steps=2, eval_batches=1, eval_mc_samples=1)
    Trainer(ModelConfig.from_name("tiny-0.1M", vocab_size=300, block_size=16), config, small_data, tmp_path / "run").fit()
    other = ModelConfig.from_name("tiny-0.4M", vocab_size=300, block_size=16)
    with pytest.raises(ValueError, match="name: checkpoint 'tiny-0.1M', given 'tiny-0.4M'"):
        Trainer(other, config, small_data, tmp_path / "run", resume=True)
    with pytest.raises(FileExistsError, match="pass --resume"):
        Trainer(other, config, small_data, tmp_path / "run")


def test_evaluate_rejects_other_tokenizer(small_data, tmp_path, capsys):
    tokenizer = train_bpe([TEXT.upper()] * 5, vocab_size=300)
    save_checkpoint(tmp_path / "ckpt", tiny_model("mdm", vocab_size=300), tokenizer)
    code = main(["evaluate", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(small_data), "--device", "cpu"])
    assert code == 2
    assert "was trained with another tokenizer" in capsys.readouterr().err


def test_checkpoint_tokenizer_size_mismatch(tmp_path, capsys):
    tokenizer = train_bpe([TEXT] * 5, vocab_size=300)
    save_checkpoint(tmp_path / "ckpt", tiny_model("mdm", vocab_size=97), tokenizer)
    code = main(["sample", "--checkpoint", str(tmp_path / "ckpt"), "--device", "cpu"])
    assert code == 2
    assert "the tokenizer has 300 ids but the model expects vocab_size=97" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["mdm", "arm"])
def test_prompt_longer_than_context(kind):
    model = tiny_model(kind, block_size=16)
    prompt = torch.zeros(1, 12, dtype=torch.long)
    sampler = mdm_sample if kind == "mdm" else arm_sample
    with pytest.raises(ValueError, match="prompt 0 has 12 tokens.*max_new_tokens=8.*context of 16"):
        sampler(model, prompt, SampleConfig(max_new_tokens=8, steps=4))


def test_missing_checkpoint(tmp_path, capsys):
    code = main(["sample", "--checkpoint", str(tmp_path / "nothing"), "--device", "cpu"])
    assert code == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_budget_options_are_exclusive():
    with pytest.raises(ValueError, match="set only one of --max-steps, --max-tokens and --flops"):
        TrainConfig(max_steps=10, flops=1e12)
