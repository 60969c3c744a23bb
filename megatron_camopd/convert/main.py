"""`camopd convert`: Megatron checkpoint <-> HuggingFace directory, in one CPU process.

    camopd convert --to-hf SRC DST [--dtype fp32|bf16|fp16]
        SRC: a checkpoint root of this project (its `latest`) or one `iter_*` directory, saved at any TP/PP;
        DST: HF safetensors + config.json + the tokenizer files recorded under SRC's `hf/`.
    camopd convert --from-hf SRC DST [--tp N --pp N] [--tokenizer DIR] [--dtype ...]
        SRC: an HF model directory; DST: a checkpoint root (`hf/` + `iter_0000000/`, model only) that training
        starts from with `model.checkpoint: DST`. --tp/--pp are checked against the architecture now.

The work is in `convert/megatron_hf.py`; this module only parses arguments.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from megatron_camopd.convert.megatron_hf import checkpoint_to_hf, hf_to_checkpoint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="camopd convert", description="Megatron checkpoint <-> HuggingFace.")
    way = parser.add_mutually_exclusive_group(required=True)
    way.add_argument("--to-hf", action="store_true", help="Megatron checkpoint (root or iter_* dir) -> HF dir")
    way.add_argument("--from-hf", action="store_true", help="HF dir -> checkpoint root of this project")
    parser.add_argument("src", help="source directory")
    parser.add_argument("dst", help="destination directory")
    parser.add_argument("--tp", type=int, default=1, help="(--from-hf) tensor-parallel size training will use")
    parser.add_argument("--pp", type=int, default=1, help="(--from-hf) pipeline-parallel size training will use")
    parser.add_argument("--tokenizer", default=None, help="(--from-hf) tokenizer dir when SRC has none")
    parser.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default=None,
        help="weight dtype of the output (default: as stored in SRC)",
    )
    return parser


def convert_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `camopd convert`; returns the exit code (CamopdError propagates to the CLI)."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    if args.to_hf:
        if args.tp != 1 or args.pp != 1 or args.tokenizer:
            build_parser().error("--tp/--pp/--tokenizer apply to --from-hf only (--to-hf reads any layout)")
        out = checkpoint_to_hf(args.src, args.dst, dtype=args.dtype)
    else:
        out = hf_to_checkpoint(args.src, args.dst, tp=args.tp, pp=args.pp, tokenizer=args.tokenizer, dtype=args.dtype)
    print(f"camopd convert: wrote {out}")
    return 0
