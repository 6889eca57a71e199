"""``macefield-convert IN OUT``: write any supported checkpoint in the native safe format."""

from __future__ import annotations

import argparse
import sys
from typing import Any



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="macefield-convert",
        description="Convert a MACE-Field / mace-torch checkpoint to the native safe format "
        "(tensors + JSON, loadable without running code). Plain MACE models are upgraded "
        "to FieldMACE with zero field response.",
    )
    parser.add_argument("input", help="native .pt, mace-torch .model or reference MACEField pickle")
    parser.add_argument("output", help="path of the native checkpoint to write")
    parser.add_argument("--trust-pickle", action="store_true", help="allow unpickling INPUT (runs code from it)")
    parser.add_argument("--dtype", choices=["float64", "float32"], default=None, help="cast before saving")
    args = parser.parse_args(argv)
    from ..engine.checkpoint import CheckpointError, load_model, save_model  # torch: only after the arguments

    try:
        model = load_model(args.input, trust_pickle=args.trust_pickle, dtype=args.dtype)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"macefield-convert: {exc}", file=sys.stderr)
        return 2
    save_model(model, args.output)
    heads = ", ".join(model.heads)
    numbers: Any = model.atomic_numbers  # a buffer (torch types module attributes loosely)
    elements = [int(z) for z in numbers]
    print(f"wrote {args.output}: FieldMACE, heads [{heads}], elements {elements}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
