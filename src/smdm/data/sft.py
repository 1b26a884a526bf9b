"""Prompt/response data for supervised fine-tuning: reading, encoding and batching.

Shape legend: B batch, L sequence length.

A row is laid out as the model sees it at generation time. For an MDM the
canvas is `prompt, response, EOS, EOS, ...` up to L tokens, because the sampler
fills a fixed canvas after the prompt and the EOS padding teaches the model to
end early. For an ARM the row starts with EOS (the start of every document):
`EOS, prompt, response, EOS, pad ...`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from smdm.data.tokenizer import Tokenizer

# Field names of the common chat formats: OpenAI-style "messages" and ShareGPT-style "conversations".
CHAT_LIST_FIELDS = ("messages", "conversations")
USER_ROLES = ("user", "human")
ASSISTANT_ROLES = ("assistant", "gpt", "model")


@dataclass(frozen=True)
class PromptResponse:
    prompt: str
    response: str


def _first_turn(record: dict, path: Path, line_number: int) -> PromptResponse:
    """Return the first user turn and the assistant turn that follows it from a chat record."""
    field = next((name for name in CHAT_LIST_FIELDS if name in record), None)
    if field is None:
        raise ValueError(f"{path}:{line_number}: chat record has none of the fields {list(CHAT_LIST_FIELDS)}")
    turns = record[field]
    for index in range(len(turns) - 1):
        role = turns[index].get("role", turns[index].get("from"))
        next_role = turns[index + 1].get("role", turns[index + 1].get("from"))
        if role in USER_ROLES and next_role in ASSISTANT_ROLES:
            text = turns[index].get("content", turns[index].get("value"))
            reply = turns[index + 1].get("content", turns[index + 1].get("value"))
            return PromptResponse(str(text), str(reply))
    raise ValueError(f"{path}:{line_number}: chat record has no user turn followed by an assistant turn")


def read_prompt_response(
    path: str | Path,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    chat: bool = False,
    limit: int = 0,
) -> list[PromptResponse]:
    """Read prompt/response pairs from a JSONL file.

    With chat=False each record contains the two texts under prompt_field and
    response_field. With chat=True each record contains a "messages" list
    ({"role", "content"}) or a "conversations" list ({"from", "value"}), and
    the first user turn with its reply is used. limit > 0 keeps the first
    `limit` pairs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fine-tuning data not found: {path}")
    pairs = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: invalid JSON ({error}); expected one object per line") from error
            if chat:
                pairs.append(_first_turn(record, path, line_number))
            else:
                missing = [name for name in (prompt_field, response_field) if name not in record]
                if missing:
                    raise ValueError(
                        f"{path}:{line_number}: record has no field {missing[0]!r} (fields: {sorted(record)}); "
                        "set --prompt-field and --response-field, or pass --chat for a messages list"
                    )
                pairs.append(PromptResponse(str(record[prompt_field]), str(record[response_field])))
            if limit and len(pairs) >= limit:
                break
    if not pairs:
        raise ValueError(f"{path} contains no prompt/response records")
    return pairs


@dataclass
class SFTBatch:
    """Token rows and boolean masks (B, L) that mark the prompt, response and padding positions."""

    tokens: torch.Tensor
    prompt: torch.Tensor
    """True at prompt positions (for an ARM, also at the leading EOS)."""
    response: torch.Tensor
    """True at the response and at the EOS that ends it."""
    padding: torch.Tensor
    """True at the padding after the response's EOS."""

    def to(self, device: torch.device) -> SFTBatch:
        return SFTBatch(*(value.to(device) for value in (self.tokens, self.prompt, self.response, self.padding)))

    def __len__(self) -> int:
        return self.tokens.size(0)

    def __getitem__(self, rows: slice) -> SFTBatch:
        return SFTBatch(*(value[rows] for value in (self.tokens, self.prompt, self.response, self.padding)))


@dataclass
class EncodedPairs:
    """Encoded pairs that fit the sequence length, and how many did not."""

    prompts: list[list[int]]
    responses: list[list[int]]
    skipped: int


def encode_pairs(tokenizer: Tokenizer, pairs: Sequence[PromptResponse], seq_len: int, kind: str) -> EncodedPairs:
    """Encode pairs, keeping those whose row (prompt, response and one EOS) fits seq_len tokens."""
    if kind not in ("mdm", "arm"):
        raise ValueError(f"kind={kind!r} is invalid; use 'mdm' or 'arm'")
    prompts = tokenizer.encode_batch([pair.prompt for pair in pairs])
    responses = tokenizer.encode_batch([pair.response for pair in pairs])
    # Both layouts need prompt + response + one EOS within seq_len (an ARM row's extra leading EOS is input only).
    kept_prompts, kept_responses = [], []
    for prompt, response in zip(prompts, responses):
        if len(prompt) + len(response) + 1 <= seq_len:
            kept_prompts.append(prompt)
            kept_responses.append(response)
    if not kept_prompts:
        raise ValueError(
            f"none of the {len(pairs)} pairs fits seq_len={seq_len} tokens; raise --seq-len "
            f"(the shortest pair needs {min(len(p) + len(r) for p, r in zip(prompts, responses)) + 1})"
        )
    return EncodedPairs(kept_prompts, kept_responses, len(pairs) - len(kept_prompts))


def build_batch(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], length: int, eos_id: int, kind: str
) -> SFTBatch:
    """Lay out rows of `length` tokens (an ARM row has length + 1 tokens, inputs and shifted targets)."""
    width = length + 1 if kind == "arm" else length
    batch = len(prompts)
    tokens = torch.full((batch, width), eos_id, dtype=torch.long)
    prompt_mask = torch.zeros((batch, width), dtype=torch.bool)
    response_mask = torch.zeros((batch, width), dtype=torch.bool)
    padding_mask = torch.zeros((batch, width), dtype=torch.bool)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        start = 1 if kind == "arm" else 0  # an ARM row starts with EOS, which counts as prompt
        prompt_end = start + len(prompt)
        response_end = prompt_end + len(response) + 1  # the response's closing EOS
        if response_end > width:
            raise ValueError(f"row {row} needs {response_end} tokens but rows are {width} long; filter pairs with encode_pairs")
        tokens[row, start:prompt_end] = torch.tensor(prompt, dtype=torch.long)
        tokens[row, prompt_end : response_end - 1] = torch.tensor(response, dtype=torch.long)
        prompt_mask[row, :prompt_end] = True
        response_mask[row, prompt_end:response_end] = True
        padding_mask[row, response_end:] = True
    return SFTBatch(tokens, prompt_mask, response_mask, padding_mask)
