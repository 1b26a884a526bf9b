"""`smdm convert`: import and export checkpoints in the reference and Hugging Face layouts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from smdm.config import ROPE_TABLE_DTYPES


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="conversion", required=True, metavar="CONVERSION")
    overwrite = argparse.ArgumentParser(add_help=False)
    overwrite.add_argument("--overwrite", action="store_true", help="replace --out when it already exists")

    reference = sub.add_parser(
        "import-reference", parents=[overwrite], help="import a released reference (lit-gpt style) checkpoint")
    reference.add_argument("source", help="reference .safetensors file, or a folder with exactly one")
    reference.add_argument("--tokenizer", required=True,
                           help="tokenizer.json, SentencePiece tokenizer.model, or a folder with either")
    reference.add_argument("--out", required=True, help="smdm checkpoint folder to write")
    reference.add_argument("--kind", choices=("mdm", "arm"), default=None,
                           help="expected kind; detected from the embedding rows when omitted")
    reference.add_argument("--n-head", type=int, default=None,
                           help="attention heads; needed only when the shapes match no named size")
    reference.add_argument("--block-size", type=int, default=None, help="context length (default: 2048)")
    reference.add_argument("--rope-table-dtype", choices=ROPE_TABLE_DTYPES, default="float32",
                           help="bfloat16 rounds the RoPE tables as the reference code does, for exact parity")
    reference.set_defaults(conversion_run=run_import_reference)

    export_reference = sub.add_parser(
        "export-reference", parents=[overwrite], help="write an smdm checkpoint in the reference layout")
    export_reference.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
    export_reference.add_argument("--out", required=True, help=".safetensors file to write")
    export_reference.set_defaults(conversion_run=run_export_reference)

    export_hf = sub.add_parser(
        "export-hf", parents=[overwrite], help="write an smdm checkpoint as a Hugging Face folder")
    export_hf.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
    export_hf.add_argument("--out", required=True, help="folder to write")
    export_hf.set_defaults(conversion_run=run_export_hf)

    import_hf = sub.add_parser(
        "import-hf", parents=[overwrite], help="import a Hugging Face folder (LLaMA ARM or smdm MDM)")
    import_hf.add_argument("source", help="local folder, or a hub repo id with --hub")
    import_hf.add_argument("--out", required=True, help="smdm checkpoint folder to write")
    import_hf.add_argument("--hub", action="store_true", help="download SOURCE from the Hugging Face hub")
    import_hf.add_argument("--revision", default=None, help="hub branch, tag or commit (with --hub)")
    import_hf.set_defaults(conversion_run=run_import_hf)


def run_convert(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    return args.conversion_run(args)


def _report(model, tokenizer, **extra) -> None:
    config = model.config
    print(json.dumps({"kind": config.kind, "name": config.name, "n_layer": config.n_layer, "n_head": config.n_head,
                      "n_embd": config.n_embd, "vocab_size": config.vocab_size, "mask_id": config.mask_id,
                      "tokenizer_vocab_size": tokenizer.vocab_size, **extra}, indent=2))


def run_import_reference(args: argparse.Namespace) -> int:
    from smdm.checkpoint import save_checkpoint
    from smdm.data.tokenizer import Tokenizer
    from smdm.interop import check_vocabulary, from_reference, read_reference

    tensors = read_reference(args.source)
    tokenizer = Tokenizer.load(args.tokenizer)
    model = from_reference(tensors, n_head=args.n_head, block_size=args.block_size, kind=args.kind,
                           rope_table_dtype=args.rope_table_dtype, source=str(args.source))
    check_vocabulary(model.config, tokenizer, str(args.source))
    save_checkpoint(args.out, model, tokenizer, trainer_state={"imported_from": str(args.source)})
    _report(model, tokenizer, out=args.out)
    return 0


def run_export_reference(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from smdm.checkpoint import load_model
    from smdm.interop import to_reference

    model, tokenizer, _ = load_model(args.checkpoint)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in to_reference(model).items()}, out,
              metadata={"format": "pt"})
    _report(model, tokenizer, out=str(out))
    return 0


def run_export_hf(args: argparse.Namespace) -> int:
    from smdm.checkpoint import load_model
    from smdm.interop import export_hf

    model, tokenizer, _ = load_model(args.checkpoint)
    export_hf(model, tokenizer, args.out)
    _report(model, tokenizer, out=args.out)
    return 0


def run_import_hf(args: argparse.Namespace) -> int:
    from smdm.checkpoint import save_checkpoint
    from smdm.interop import load_hf

    model, tokenizer = load_hf(args.source, hub=args.hub, revision=args.revision)
    save_checkpoint(args.out, model, tokenizer, trainer_state={"imported_from": str(args.source)})
    _report(model, tokenizer, out=args.out)
    return 0
